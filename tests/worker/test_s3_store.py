"""The image store on S3: a real S3-compatible server (moto's server mode, over HTTP) behind s3fs.

The store itself (dedup, idempotent writes, hash validation, delete), then the service on it: the API
stores uploads there and only there, and a round (the API's in-process runner, and the worker's
`execute_round`) reads its pool back from it, with nothing of the images on the local disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select

from iqa import registry
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.models import EvolutionRound, ModelVersion, PseudoLabel
from iqa.settings import Settings
from iqa.store import RemoteImageStore, open_store
from tests.api.conftest import jpeg
from tests.worker.conftest import log_photos
from tests.worker.test_inprocess_rounds import AUTH, PASSING_GATE, TINY_ROUND, TOKEN, wait_for_round
from trainer.config import RoundOverrides
from trainer.lifecycle import WorkerEngines, create_round, execute_round

BUCKET = "evoq-images"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 server on a free port, with the bucket; credentials from the environment, as in production."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    patch = pytest.MonkeyPatch()
    for name, value in CREDENTIALS.items():
        patch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    patch.undo()


def objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, read with an independent S3 client (boto3, not the store's s3fs)."""
    client = boto3.client("s3", endpoint_url=endpoint)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_the_s3_store_is_content_addressed_idempotent_and_validated(s3_endpoint: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{BUCKET}/unit", {"endpoint_url": s3_endpoint})
    assert isinstance(store, RemoteImageStore)
    data = b"bytes of an image"
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha)
    first, second = store.put(data), store.put(data, sha)
    assert (first.created, second.created) == (True, False) and first.key == f"{sha[:2]}/{sha[2:4]}/{sha}"
    assert objects(s3_endpoint, "unit/") == {f"unit/{first.key}": data}  # one object, the right bytes
    assert store.exists(sha) and store.read(sha) == data
    store.copy_to(sha, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    with pytest.raises(ValueError, match="SHA-256"):
        store.put(data, "../" + sha[3:])
    assert store.delete(sha) and not store.delete(sha)  # deleting twice is harmless
    assert objects(s3_endpoint, "unit/") == {}
    with pytest.raises(FileNotFoundError):
        store.read(sha)


def test_the_api_stores_uploads_on_s3_and_an_in_process_round_votes_on_them(
    s3_endpoint: str, start_server, tmp_path: Path
) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}",
        data_dir=tmp_path,
        image_store=f"s3://{BUCKET}/api",
        image_store_options={"endpoint_url": s3_endpoint},
        admin_token=TOKEN,
        **TINY_ROUND,
        **PASSING_GATE,
    )
    uploads = [jpeg(seed=900 + i) for i in range(5)]
    for data in uploads:
        assert server.score(data).status_code == 200
    stored = objects(s3_endpoint, "api/")
    assert sorted(stored.values()) == sorted(uploads)  # the original bytes, each once
    assert not (tmp_path / "images").exists()  # and nothing on the local disk

    round_id = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 1}).json()["id"]
    done = wait_for_round(server, round_id)
    assert done["state"] == "succeeded", done
    with server.session() as session:
        labels = session.scalar(select(func.count()).where(PseudoLabel.round_id == round_id))
        assert labels == TINY_ROUND["round_pairs"]  # voted on the images read back from S3


def test_a_worker_round_reads_its_pool_from_s3(
    s3_endpoint: str, demo_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'evoq.db'}"
    upgrade_database(url)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=url,
        model=str(demo_model_dir),
        device="cpu",
        image_store=f"s3://{BUCKET}/worker",
        image_store_options={"endpoint_url": s3_endpoint},
        **TINY_ROUND,
    )
    sessions = make_sessionmaker(make_engine(url))
    log_photos(sessions, open_store(settings.image_store, settings.image_store_options), 5)
    assert len(objects(s3_endpoint, "worker/")) == 5
    with sessions() as session:
        base = registry.ensure_base_version(session, "demo (untrained)", str(demo_model_dir), True)
        round_id = create_round(session, "manual", RoundOverrides(seed=0), base.id).id

    state = asyncio.run(execute_round(round_id, settings, sessions, WorkerEngines(settings, sessions)))

    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert state in ("succeeded", "rejected"), row.error
        labels = session.scalar(select(func.count()).where(PseudoLabel.round_id == round_id))
        pool = session.get_one(ModelVersion, row.result_version_id).manifest["pool"]
        assert labels == TINY_ROUND["round_pairs"] and (pool["images"], pool["rejected"]) == (5, 0)
