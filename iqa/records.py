"""Database rows the API writes: images seen, predictions (also the result cache) and comparisons."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import Insert, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from iqa.images import DecodedImage
from iqa.models import Comparison, Image, Prediction, utcnow
from iqa.scoring import CompareResult, ScoreResult


@lru_cache(maxsize=4)
def _upsert_image_statement(dialect: str, columns: tuple[str, ...]) -> Insert:
    """INSERT ... ON CONFLICT (sha256) DO UPDATE ... RETURNING id, built once per dialect with bound
    parameters: built per request through the ORM it cost about 1 ms of CPU, a share of every request."""
    table = Image.__table__
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table).values({name: bindparam(name) for name in columns})
    return statement.on_conflict_do_update(
        index_elements=[table.c.sha256],
        set_={"times_seen": table.c.times_seen + 1, "last_seen_at": statement.excluded.last_seen_at},
    ).returning(table.c.id)


def upsert_image(session: Session, decoded: DecodedImage, storage_key: str, source: str) -> int:
    """Insert the image, or count one more sighting of it; safe under concurrent requests."""
    now = utcnow()
    values = {
        "sha256": decoded.sha256,
        "storage_key": storage_key,
        "width": decoded.width,
        "height": decoded.height,
        "format": decoded.format,
        "byte_size": decoded.byte_size,
        "first_seen_at": now,
        "last_seen_at": now,
        "times_seen": 1,
        "source": source,
    }
    statement = _upsert_image_statement(session.get_bind().dialect.name, tuple(values))
    return session.connection().execute(statement, values).scalar_one()


def touch_image(session: Session, image_id: int) -> None:
    """Count one more sighting of an image already known (a cache hit)."""
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(times_seen=Image.times_seen + 1, last_seen_at=utcnow())
    )


def cached_prediction(
    session: Session, sha256: str, model_version_id: int, sampling_key: str
) -> tuple[Image, Prediction] | None:
    """The latest prediction for this image, version and sampling, if any."""
    row = session.execute(
        select(Image, Prediction)
        .join(Prediction, Prediction.image_id == Image.id)
        .where(
            Image.sha256 == sha256,
            Prediction.model_version_id == model_version_id,
            Prediction.sampling_key == sampling_key,
        )
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None


@lru_cache(maxsize=8)
def _insert_returning_id(table: Table) -> Insert:
    """A plain INSERT ... RETURNING id: the ORM's add and flush cost several times its CPU per row."""
    return table.insert().returning(table.c.id)


def add_prediction(
    session: Session,
    image_id: int,
    result: ScoreResult,
    profile: str,
    sampling_key: str,
    latency_ms: float,
    api_key_id: int | None = None,
    distribution: dict[str, float] | None = None,
) -> int:
    """Log one scoring, with its raw completions (or, for a one-pass reading, the distribution of the
    answer's first digit) and the version that produced it; returns its id."""
    values = dict(
        image_id=image_id,
        model_version_id=result.model.version_id,
        api_key_id=api_key_id,
        score=result.score,
        score_std=result.std,
        valid_samples=result.valid,
        samples=result.samples,
        prompt_profile=profile,
        sampling_key=sampling_key,
        latency_ms=latency_ms,
        completions=result.completions,
        distribution=distribution,
    )
    return session.connection().execute(_insert_returning_id(Prediction.__table__), values).scalar_one()


def add_comparison(
    session: Session,
    image_a_id: int,
    image_b_id: int,
    result: CompareResult,
    profile: str,
    sampling_key: str,
    latency_ms: float,
    api_key_id: int | None = None,
) -> int:
    """Log one comparison with its vote counts and raw completions; returns its id."""
    values = dict(
        image_a_id=image_a_id,
        image_b_id=image_b_id,
        model_version_id=result.model.version_id,
        api_key_id=api_key_id,
        votes_a=result.votes_a,
        votes_b=result.votes_b,
        invalid_votes=result.invalid,
        prob_a_better=result.prob_a_better,
        prompt_profile=profile,
        sampling_key=sampling_key,
        latency_ms=latency_ms,
        completions=result.completions,
    )
    return session.connection().execute(_insert_returning_id(Comparison.__table__), values).scalar_one()


def image_with_predictions(
    session: Session, sha256: str, limit: int = 20
) -> tuple[Image, list[Prediction]] | None:
    """An image row and its most recent predictions."""
    image = session.scalars(select(Image).where(Image.sha256 == sha256)).first()
    if image is None:
        return None
    predictions = session.scalars(
        select(Prediction)
        .where(Prediction.image_id == image.id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    ).all()
    return image, list(predictions)
