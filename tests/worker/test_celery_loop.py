"""The production loop with real parts: PostgreSQL, Redis, a real Celery worker process (+ its beat),
and the API over HTTP. Rounds run in the worker; the API follows the active version from the database.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from iqa.models import EvolutionRound
from tests.api.conftest import LiveServer, fresh_database, jpeg
from tests.worker.test_inprocess_rounds import (
    AUTH,
    PASSING_GATE,
    TINY_ROUND,
    TOKEN,
    wait_for_model,
    wait_for_round,
)

pytestmark = pytest.mark.postgres

REDIS = "redis://127.0.0.1:6379"
STALE_AFTER_S = 6


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A Redis database of this test's own (flushed before and after)."""
    db = random.randint(1, 15)
    client = redis.Redis.from_url(f"{REDIS}/{db}")
    try:
        client.flushdb()
    except redis.ConnectionError as error:
        pytest.fail(f"Redis is not running at {REDIS} ({error}); start it with scripts/services.sh")
    yield f"{REDIS}/{db}"
    client.flushdb()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgres", tmp_path) as url:
        yield url


def _env(settings: dict[str, object]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOQ_")}
    env.update({f"EVOQ_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Worker:
    """`celery worker` (+ embedded beat) as a real process group, killable like a crashed machine."""

    def __init__(
        self,
        settings: dict[str, object],
        log: Path,
        beat: bool,
        extra_env: dict[str, str] | None = None,
        queues: str = "training,maintenance",
    ) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
            "-Q", queues, "--pool", "solo", "--prefetch-multiplier", "1", "-n", f"{log.stem}@%h",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        if beat:
            command += ["-B", "-s", str(log.with_suffix(".beat"))]
        self.log = log
        self.process = subprocess.Popen(
            command,
            env={**_env(settings), **(extra_env or {})},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "ready." not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Celery worker did not start"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole group (main process, pool child, training child)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def loop(start_server, demo_model_dir: Path, tmp_path: Path, broker_url: str, database_url: str):
    """Factory of (API server, worker) on one database, image store and broker."""
    workers: list[Worker] = []
    servers: list[LiveServer] = []

    def make(beat: bool = False, **overrides: object) -> tuple[LiveServer, Callable[[], Worker]]:
        shared = {
            "database_url": database_url,
            "broker_url": broker_url,
            "data_dir": tmp_path,
            "image_store": tmp_path / "images",
            "checkpoints_dir": tmp_path / "checkpoints",
            "model": str(demo_model_dir),
            "model_name": "demo (untrained)",
            "device": "cpu",
            "round_stale_after_s": STALE_AFTER_S,
            "round_min_new_images": 1000,
            **TINY_ROUND,
            **PASSING_GATE,
            **overrides,
        }
        server = start_server(
            database_url,
            data_dir=tmp_path,
            rounds_backend="celery",
            admin_token=TOKEN,
            active_version_poll_s=0.2,
            **{k: v for k, v in shared.items() if k not in ("database_url", "data_dir")},
        )
        servers.append(server)

        def start_worker() -> Worker:
            worker = Worker(shared, tmp_path / f"worker{len(workers)}.log", beat)
            workers.append(worker)
            worker.wait_ready()
            return worker

        return server, start_worker

    yield make
    for worker in workers:
        worker.stop()
    for server in servers:  # before the database fixture drops the database
        server.stop()


def test_full_loop_round_in_a_celery_worker_then_rollback(loop) -> None:
    server, start_worker = loop()
    replica, _ = loop()  # a second API process on the same database
    start_worker()
    for i in range(5):
        assert server.score(jpeg(seed=1100 + i)).status_code == 200
    base = server.http.get("/v1/models").json()["active"]

    started = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 1})
    assert started.status_code == 202, started.text
    round_id = started.json()["id"]
    assert server.http.post("/admin/evolutions", headers=AUTH).status_code == 409

    done = wait_for_round(server, round_id)
    assert done["state"] == "succeeded", done
    assert done["worker"] and done["worker"].split(":")[1] != str(os.getpid())  # ran in the worker
    new_id = done["result_version_id"]
    new_name = next(
        m["name"] for m in server.http.get("/admin/models", headers=AUTH).json() if m["id"] == new_id
    )
    for api in (server, replica):  # every API process follows the database within its poll interval
        wait_for_model(api, new_name)
        answer = api.score(jpeg(seed=1190)).json()["results"][0]
        assert answer["model_version"]["id"] == new_id

    assert server.http.post(f"/admin/models/{base['id']}/activate", headers=AUTH).status_code == 200
    assert server.score(jpeg(seed=1191)).json()["results"][0]["model_version"]["id"] == base["id"]
    wait_for_model(replica, base["name"])
    assert replica.score(jpeg(seed=1192)).json()["results"][0]["model_version"]["id"] == base["id"]


def test_a_killed_worker_fails_its_round_keeps_the_model_and_the_next_round_runs(loop) -> None:
    server, start_worker = loop()
    worker = start_worker()
    for i in range(5):
        server.score(jpeg(seed=1200 + i))
    active = server.http.get("/v1/models").json()["active"]
    round_id = server.http.post("/admin/evolutions", headers=AUTH, json={"steps": 200}).json()["id"]
    deadline = time.monotonic() + 180
    while server.http.get(f"/admin/evolutions/{round_id}", headers=AUTH).json()["state"] != "training":
        assert time.monotonic() < deadline, "the round never reached training"
        time.sleep(0.2)
    worker.kill()

    time.sleep(STALE_AFTER_S + 1)
    second = server.http.post("/admin/evolutions", headers=AUTH)  # reaps the dead round first
    assert second.status_code == 202, second.text
    with server.session() as session:
        dead = session.get_one(EvolutionRound, round_id)
        assert dead.state == "failed" and "stopped reporting during training" in dead.error
    assert server.http.get("/v1/models").json()["active"]["id"] == active["id"]

    start_worker()
    done = wait_for_round(server, second.json()["id"])
    assert done["state"] == "succeeded", done


def test_redis_down_makes_the_trigger_503_while_scoring_works(start_server, tmp_path: Path) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}",
        data_dir=tmp_path,
        rounds_backend="celery",
        broker_url="redis://127.0.0.1:1/0",
        admin_token=TOKEN,
    )
    response = server.http.post("/admin/evolutions", headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "broker" in response.json()["error"]["message"]
    with server.session() as session:
        assert session.scalars(select(EvolutionRound)).all() == []  # nothing half-started
    assert server.score(jpeg(seed=1300)).status_code == 200


def test_beat_starts_a_round_only_when_enough_new_images_arrived(loop) -> None:
    server, start_worker = loop(
        beat=True, round_min_new_images=4, round_every_hours=0.0001, round_check_interval_s=1
    )
    start_worker()
    for i in range(3):
        server.score(jpeg(seed=1400 + i))
    time.sleep(6)  # several beat ticks with too few new images
    assert server.http.get("/admin/evolutions", headers=AUTH).json() == []
    server.score(jpeg(seed=1403))
    deadline = time.monotonic() + 60
    while not (listed := server.http.get("/admin/evolutions", headers=AUTH).json()):
        assert time.monotonic() < deadline, "the schedule never started a round"
        time.sleep(0.5)
    assert listed[0]["trigger"] == "schedule"
    done = wait_for_round(server, listed[0]["id"])
    assert done["state"] == "succeeded", done
