"""Voting shards on the production engine, through a vLLM crash: a real `celery worker -Q voting` votes
on the vLLM server, which is killed while a shard runs and started again; the shard is voted again and
every pair's label lands once. PostgreSQL, Redis, the worker and vLLM are all real."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from iqa import registry
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.models import EvolutionRound, PseudoLabel, VoteShard
from iqa.settings import Settings
from iqa.store import ImageStore
from tests.vllm.conftest import TinyModels
from tests.vllm.server import MAX_LORA_RANK, VLLMServer
from tests.worker.conftest import log_photos
from tests.worker.test_celery_loop import Worker, broker_url, database_url  # noqa: F401
from tests.worker.test_inprocess_rounds import TINY_ROUND
from trainer.config import RoundOverrides
from trainer.lifecycle import WorkerEngines, create_round, execute_round
from worker.celery_app import VOTE_SHARD_TASK, make_celery

pytestmark = [pytest.mark.vllm, pytest.mark.postgres, pytest.mark.slow]

PAIRS = 16


def test_a_vllm_restart_mid_round_has_the_lost_shard_voted_again(
    vllm_server: VLLMServer,
    tiny_models: TinyModels,
    broker_url: str,  # noqa: F811
    database_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    values = {
        "database_url": database_url,
        "broker_url": broker_url,
        "data_dir": tmp_path,
        "image_store": tmp_path / "images",
        "checkpoints_dir": tmp_path / "checkpoints",
        "model": str(tiny_models.base),
        "device": "cpu",
        "engine": "vllm",
        "vllm_url": vllm_server.url,
        "round_lora_rank": MAX_LORA_RANK,
        **TINY_ROUND,
        "round_pairs": PAIRS,
        "round_votes": 16,
        "voting_shards": 4,
        "voting_shard_timeout_s": 10,
        "voting_shard_attempts": 30,  # vLLM's restart outlasts a few attempts
    }
    upgrade_database(database_url)
    settings = Settings(_env_file=None, **values)
    sessions = make_sessionmaker(make_engine(database_url))
    log_photos(sessions, ImageStore(tmp_path / "images"), 8)
    with sessions() as session:
        base = registry.ensure_base_version(session, "tiny-base", str(tiny_models.base), True)
        round_id = create_round(session, "manual", RoundOverrides(seed=0), base.id).id
    celery = make_celery(settings)
    voter = Worker(values, tmp_path / "voter.log", beat=False, queues="voting")
    crashed: list[float] = []

    def shards() -> list[VoteShard]:
        with sessions() as session:
            rows = list(session.scalars(select(VoteShard).where(VoteShard.round_id == round_id)))
            session.expunge_all()
            return sorted(rows, key=lambda r: r.shard)

    def crash_vllm_while_voting() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if any(row.state == "running" for row in shards()):
                vllm_server.kill()
                crashed.append(vllm_server.start())  # seconds until healthy again
                return
            time.sleep(0.05)

    def send(round_id: int, shard: int) -> None:
        celery.send_task(VOTE_SHARD_TASK, args=[round_id, shard])

    try:
        voter.wait_ready()
        crasher = threading.Thread(target=crash_vllm_while_voting)
        crasher.start()
        state = asyncio.run(
            execute_round(round_id, settings, sessions, WorkerEngines(settings, sessions), send)
        )
        crasher.join()
    finally:
        voter.kill()

    assert crashed, "vLLM was never crashed mid-shard"
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert state in ("succeeded", "rejected"), row.error
        labels = list(session.scalars(select(PseudoLabel).where(PseudoLabel.round_id == round_id)))
        assert (
            len({frozenset((label.image_a_id, label.image_b_id)) for label in labels}) == len(labels) == PAIRS
        )
        total = session.scalar(
            select(func.sum(PseudoLabel.votes_a + PseudoLabel.votes_b + PseudoLabel.invalid_votes))
        )
        assert total == PAIRS * 16
    rows = shards()
    assert all(r.state == "done" for r in rows)
    assert max(r.attempt for r in rows) > 1  # the shard that vLLM's crash broke was voted again
    print(f"\nvLLM back after {crashed[0]:.1f} s; shard attempts {[r.attempt for r in rows]}")
