"""The live-server fixtures of the API tests, shared with the round tests, and a pool-logging helper."""

from sqlalchemy.orm import Session, sessionmaker

from iqa import records
from iqa.images import decode_image
from iqa.store import ImageStore
from tests import imagegen
from tests.api.conftest import demo_model_dir, start_server  # noqa: F401


def log_photos(sessions: sessionmaker[Session], store: ImageStore, count: int) -> None:
    """Store and log `count` distinct generated photos, as the API would: a round's unlabeled pool."""
    with sessions.begin() as session:
        for seed in range(count):
            decoded = decode_image(
                imagegen.encode(imagegen.photo(64, 48, seed=seed), "PNG"),
                max_bytes=10**7,
                max_pixels=10**7,
                min_side=8,
            )
            records.upsert_image(session, decoded, store.put(decoded.data).key, "score")
