"""A round's votes fanned out over two real Celery voting workers (PostgreSQL, Redis, the demo model).

The round itself runs here (`execute_round`, as the training worker runs it) and sends its shards to
the `voting` queue; the workers are real `celery worker -Q voting` processes, one of them killed
mid-shard in the fault test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from iqa import registry
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.models import EvolutionRound, PseudoLabel, VoteShard
from iqa.settings import Settings
from iqa.store import service_store
from tests.worker.conftest import log_photos
from tests.worker.test_celery_loop import Worker, broker_url, database_url  # noqa: F401
from tests.worker.test_inprocess_rounds import TINY_ROUND
from tests.worker.test_s3_store import BUCKET, objects, s3_endpoint  # noqa: F401
from trainer.config import RoundOverrides
from trainer.lifecycle import WorkerEngines, create_round, execute_round, request_cancel
from trainer.shards import split
from worker.celery_app import VOTE_SHARD_TASK, make_celery

pytestmark = pytest.mark.postgres

PAIRS = 24
QUICK_TIMEOUT_S = 10  # short enough to wait for, long enough for heartbeats on a loaded machine


def test_split_gives_balanced_contiguous_shards() -> None:
    assert split(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split(2, 5) == [range(0, 1), range(1, 2)]  # never an empty shard
    assert [len(r) for r in split(PAIRS, 4)] == [6, 6, 6, 6]


@pytest.fixture
def make_fanout(demo_model_dir: Path, tmp_path: Path, database_url: str):  # noqa: F811
    """Factory: for a broker URL, (settings, sessions, round id, start a voting worker, run the round
    here, sending its shards to the `voting` queue)."""
    workers: list[Worker] = []

    def make(broker: str, store: str | None = None, store_options: dict | None = None, timeout_s: float = 30):
        values = {
            "database_url": database_url,
            "broker_url": broker,
            "data_dir": tmp_path,
            "image_store": store or tmp_path / "images",
            "image_store_options": json.dumps(store_options or {}),  # as the environment carries it
            "checkpoints_dir": tmp_path / "checkpoints",
            "model": str(demo_model_dir),
            "device": "cpu",
            **TINY_ROUND,
            "round_pairs": PAIRS,
            "round_votes": 4,
            "voting_shards": 4,
            "voting_shard_timeout_s": timeout_s,  # short where a test waits for it on purpose
        }
        upgrade_database(database_url)
        settings = Settings(_env_file=None, **{**values, "image_store_options": store_options or {}})
        sessions = make_sessionmaker(make_engine(database_url))
        log_photos(sessions, service_store(settings), 10)
        with sessions() as session:
            base = registry.ensure_base_version(session, "demo (untrained)", str(demo_model_dir), True)
            round_id = create_round(session, "manual", RoundOverrides(seed=0), base.id).id
        celery = make_celery(settings)

        def start_worker(extra_env: dict[str, str] | None = None) -> Worker:
            log = tmp_path / f"voter{len(workers)}.log"
            worker = Worker(values, log, beat=False, extra_env=extra_env, queues="voting")
            workers.append(worker)
            return worker

        def run_round() -> str:
            def send(round_id: int, shard: int) -> None:
                celery.send_task(VOTE_SHARD_TASK, args=[round_id, shard])

            engines = WorkerEngines(settings, sessions)
            return asyncio.run(execute_round(round_id, settings, sessions, engines, send))

        return settings, sessions, round_id, start_worker, run_round

    yield make
    for worker in workers:
        worker.kill()


@pytest.fixture
def fanout(make_fanout, broker_url: str):  # noqa: F811
    return make_fanout(broker_url)


@pytest.fixture
def quick_fanout(make_fanout, broker_url: str):  # noqa: F811
    """A shard timeout of 10 s, for the tests that wait for it."""
    return make_fanout(broker_url, timeout_s=QUICK_TIMEOUT_S)


def shards(sessions, round_id: int) -> list[VoteShard]:
    with sessions() as session:
        rows = list(session.scalars(select(VoteShard).where(VoteShard.round_id == round_id)))
        session.expunge_all()
        return sorted(rows, key=lambda r: r.shard)


def check_labels(sessions, round_id: int) -> None:
    """Every voted pair landed once, as a pseudo-label of the round."""
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert row.state in ("succeeded", "rejected"), row.error
        labels = list(session.scalars(select(PseudoLabel).where(PseudoLabel.round_id == round_id)))
        assert len(labels) == PAIRS
        assert len({frozenset((label.image_a_id, label.image_b_id)) for label in labels}) == PAIRS
        votes = session.scalar(
            select(func.sum(PseudoLabel.votes_a + PseudoLabel.votes_b + PseudoLabel.invalid_votes))
        )
        assert votes == PAIRS * 4


def test_a_round_fans_its_votes_out_over_two_voting_workers(fanout) -> None:
    _, sessions, round_id, start_worker, run_round = fanout
    voters = [start_worker(), start_worker()]
    for voter in voters:
        voter.wait_ready()

    assert run_round() in ("succeeded", "rejected")

    rows = shards(sessions, round_id)
    assert [(r.state, r.attempt, len(r.votes or [])) for r in rows] == [("done", 1, 6)] * 4
    took = {int(r.worker.rsplit(":", 1)[1]) for r in rows}
    assert took == {voter.process.pid for voter in voters}  # both workers voted
    check_labels(sessions, round_id)


def test_a_voting_worker_killed_mid_shard_has_its_shard_voted_again(quick_fanout) -> None:
    _, sessions, round_id, start_worker, run_round = quick_fanout
    victim, survivor = start_worker(), start_worker()
    victim.wait_ready()
    survivor.wait_ready()
    killed: list[int] = []

    def kill_when_voting() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for row in shards(sessions, round_id):
                if row.state == "running" and row.worker and row.worker.endswith(f":{victim.process.pid}"):
                    victim.kill()
                    killed.append(row.shard)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_voting)
    killer.start()
    state = run_round()
    killer.join()

    assert killed, "the victim never took a shard"
    assert state in ("succeeded", "rejected")
    rows = shards(sessions, round_id)
    lost = rows[killed[0]]
    assert lost.state == "done" and lost.attempt == 2 and lost.worker.endswith(f":{survivor.process.pid}")
    assert all(r.state == "done" and len(r.votes or []) == 6 for r in rows)
    check_labels(sessions, round_id)


def test_cancelling_the_round_stops_its_shards(fanout) -> None:
    _, sessions, round_id, start_worker, run_round = fanout
    voter = start_worker()
    voter.wait_ready()

    def cancel_when_voting() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(row.state == "running" for row in shards(sessions, round_id)):
                with sessions() as session:
                    request_cancel(session, round_id)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_voting)
    canceller.start()
    assert run_round() == "cancelled"
    canceller.join()
    deadline = time.monotonic() + 60  # a heartbeat later the worker has seen it
    while "'superseded'" not in voter.log.read_text():  # it stopped voting instead of finishing
        assert time.monotonic() < deadline, voter.log.read_text()[-2000:]
        time.sleep(0.2)
    rows = shards(sessions, round_id)
    assert rows and all(row.state == "cancelled" for row in rows)  # no shard's votes landed
    with sessions() as session:
        assert session.scalar(select(func.count()).where(PseudoLabel.round_id == round_id)) == 0


def test_a_round_with_no_voting_worker_fails_cleanly(quick_fanout) -> None:
    settings, sessions, round_id, _, run_round = quick_fanout
    started = time.monotonic()
    assert run_round() == "failed"  # no shard moved for attempts x timeout
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert "voting shard" in (row.error or "") and row.result_version_id is None
    assert all(r.state == "cancelled" for r in shards(sessions, round_id))
    stall = settings.voting_shard_attempts * settings.voting_shard_timeout_s
    assert stall <= time.monotonic() - started < stall + 40


def test_a_voting_worker_whose_engine_fails_hands_its_shards_back_at_once(fanout) -> None:
    """Its vLLM is not there (a fault injected on purpose: a closed port). Each failed attempt hands
    the shard back at once, so the round fails after the attempts in seconds, naming the error,
    instead of waiting a heartbeat timeout per attempt (at least 3 x 30 s here before)."""
    settings, sessions, round_id, start_worker, run_round = fanout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    voter = start_worker({"EVOQ_ENGINE": "vllm", "EVOQ_VLLM_URL": dead, "EVOQ_ROUND_VLLM_URL": dead})
    voter.wait_ready()
    started = time.monotonic()

    assert run_round() == "failed"

    elapsed = time.monotonic() - started
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        assert "was lost" in (row.error or "") and "failed: EngineUnavailable" in row.error, row.error
        assert row.result_version_id is None
    assert elapsed < settings.voting_shard_timeout_s, f"{elapsed:.0f} s"
    assert max(r.attempt for r in shards(sessions, round_id)) == settings.voting_shard_attempts


def test_a_redis_restart_mid_round_loses_no_shard(make_fanout, tmp_path: Path) -> None:
    """A broker of this test's own, without persistence, killed while a shard is voted and started
    again empty: the queued shards' messages are gone, and the round sends them again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]

    def start_redis() -> subprocess.Popen:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                return server
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    broker = start_redis()
    try:
        _, sessions, round_id, start_worker, run_round = make_fanout(
            f"redis://127.0.0.1:{port}/0", timeout_s=6
        )
        voter = start_worker()
        voter.wait_ready()
        lost: list[int] = []

        def restart_when_voting() -> None:
            nonlocal broker
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(row.state == "running" for row in shards(sessions, round_id)):
                    lost.append(redis.Redis(port=port).llen("voting"))  # messages about to be lost
                    broker.kill()
                    broker.wait()
                    time.sleep(2)
                    broker = start_redis()
                    return
                time.sleep(0.05)

        restarter = threading.Thread(target=restart_when_voting)
        restarter.start()
        state = run_round()
        restarter.join()
        assert lost and lost[0] > 0, "no queued shard was lost with the broker"
        assert state in ("succeeded", "rejected")
        assert all(row.state == "done" for row in shards(sessions, round_id))
        check_labels(sessions, round_id)
    finally:
        broker.kill()
        broker.wait()


def test_voting_workers_read_the_pool_from_an_s3_store(
    make_fanout,
    broker_url: str,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """API replicas and workers on other hosts share one store: the voting workers (real Celery
    processes) read every image they vote on from S3, and nothing of the pool is on their disk."""
    _, sessions, round_id, start_worker, run_round = make_fanout(
        broker_url, f"s3://{BUCKET}/shards", {"endpoint_url": s3_endpoint}
    )
    voters = [start_worker(), start_worker()]
    for voter in voters:
        voter.wait_ready()
    assert len(objects(s3_endpoint, "shards/")) == 10
    assert run_round() in ("succeeded", "rejected")
    assert all(row.state == "done" for row in shards(sessions, round_id))
    check_labels(sessions, round_id)
    assert not (tmp_path / "images").exists()  # no local image folder anywhere
