"""What the service keeps, and for how long: deleting an image (its bytes, every row that names it, its
cached results) on request, and the images older than the retention period.

A running round never breaks: it votes and trains on a snapshot of its pool (hard links, see
`trainer.lifecycle`), so deleted bytes disappear from disk when the round ends, and the round records
how many of its pairs named an image deleted meanwhile instead of storing labels for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from iqa.models import Comparison, Image, Prediction, PseudoLabel, utcnow
from iqa.store import ImageStore


@dataclass(frozen=True)
class Deleted:
    """What went with one image."""

    sha256: str
    predictions: int
    comparisons: int
    pseudo_labels: int
    bytes_removed: bool


def delete_image(session: Session, store: ImageStore, sha256: str) -> Deleted | None:
    """Remove the image's rows (predictions, i.e. its cached results; comparisons; pseudo-labels; the
    image), then its bytes once the rows are committed. None when no such image is logged."""
    image_id = session.scalar(select(Image.id).where(Image.sha256 == sha256))
    if image_id is None:
        return None
    counts = [
        session.execute(statement).rowcount
        for statement in (
            delete(Prediction).where(Prediction.image_id == image_id),
            delete(Comparison).where(
                or_(Comparison.image_a_id == image_id, Comparison.image_b_id == image_id)
            ),
            delete(PseudoLabel).where(
                or_(PseudoLabel.image_a_id == image_id, PseudoLabel.image_b_id == image_id)
            ),
        )
    ]
    session.execute(delete(Image).where(Image.id == image_id))
    session.commit()  # rows first: a crash before the unlink leaves bytes without rows, never the reverse
    return Deleted(sha256, *counts, store.delete(sha256))


def expired_images(session: Session, older_than: timedelta, limit: int = 1000) -> list[str]:
    """Hashes of images not seen for `older_than` (oldest first)."""
    cutoff = utcnow() - older_than
    return list(
        session.scalars(
            select(Image.sha256).where(Image.last_seen_at < cutoff).order_by(Image.last_seen_at).limit(limit)
        )
    )


def purge_expired(session: Session, store: ImageStore, older_than: timedelta) -> list[Deleted]:
    """Delete every image not seen for `older_than`, in batches."""
    removed: list[Deleted] = []
    while batch := expired_images(session, older_than):
        removed += [d for sha in batch if (d := delete_image(session, store, sha)) is not None]
    return removed
