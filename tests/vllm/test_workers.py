"""`evoq serve --workers 2` on the vLLM engine: two real API processes on one port, one database."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from iqa.models import Image, Prediction
from tests.api.conftest import jpeg, unique_seed
from tests.api.test_cli_serve import free_port, stop_serve, wait_until_ready
from tests.vllm.conftest import TinyModels
from tests.vllm.server import VLLMServer
from tests.vllm.test_rounds import loaded_adapters

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EVOQ = Path(sys.executable).parent / "evoq"
T = TypeVar("T")


def spawned_workers(parent: psutil.Process) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing spawn children, not its resource tracker)."""
    return [
        child
        for child in parent.children()
        if "spawn_main" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline())
    ]


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """The first truthy value of `condition`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.25)
    pytest.fail(f"not within {timeout_s:.0f} s: {what}")


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_two_workers_each_serve_with_their_own_adapter_and_share_database_and_metrics(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOQ_", "PROMETHEUS_"))}
    env |= {
        "EVOQ_DATA_DIR": str(tmp_path / "data"),  # a fresh SQLite database: migrated once, by the parent
        "EVOQ_ENGINE": "vllm",
        "EVOQ_VLLM_URL": vllm_server.url,
        "EVOQ_MODEL": str(tiny_models.base),
        "EVOQ_MODEL_NAME": "tiny-base",
        "EVOQ_TEMPERATURE": "0",
        "EVOQ_CONSTRAIN_ANSWERS": "true",  # the untrained tiny model answers parsably
    }
    before = set(loaded_adapters(vllm_server))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(EVOQ), "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    parent = psutil.Process(process.pid)
    try:
        wait_until_ready(process, url, log)
        workers = wait_for(lambda: (w := spawned_workers(parent)) and len(w) == 2 and w, 60, "two workers")
        ours = wait_for(
            lambda: (new := set(loaded_adapters(vllm_server)) - before) and len(new) == 2 and new,
            60,
            f"an adapter per worker on vLLM:\n{log.read_text()[-3000:]}",
        )

        # Each worker alone (the other stopped): it answers, logs, and serves on its own adapter.
        served_by: set[str] = set()
        shas: list[str] = []
        for alone in workers:
            others = [w for w in workers if w.pid != alone.pid]
            for other in others:
                other.send_signal(signal.SIGSTOP)
            try:
                with httpx.Client(base_url=url, timeout=60) as client:  # new connections: to `alone`
                    for _ in range(2):
                        data = jpeg(unique_seed())
                        response = client.post(
                            "/v1/score",
                            files=[("images", ("x.jpg", data, "image/jpeg"))],
                            data={"samples": "2"},
                        )
                        assert response.status_code == 200, response.text
                        [item] = response.json()["results"]
                        assert item["cached"] is False and 1.0 <= item["score"] <= 5.0
                        shas.append(item["sha256"])
                    served_by.add(client.get("/readyz").json()["engine"]["adapter"])
            finally:
                for other in others:
                    other.send_signal(signal.SIGCONT)
        assert served_by == ours, (served_by, ours)

        # A scrape reaches one worker but counts both workers' requests.
        with httpx.Client(base_url=url, timeout=30) as client:
            again = client.post("/v1/score", files=[("images", ("x.jpg", jpeg(unique_seed()), "image/jpeg"))])
            assert again.status_code == 200, again.text
            text = client.get("/metrics").text
        scored = metric_total(text, "evoq_http_requests_total", route="/v1/score", status="200")
        assert scored == 5, text
        assert metric_total(text, "evoq_samples_generated_total", kind="score") == 4 * 2 + 8
    finally:
        returncode = stop_serve(process, log, timeout=60)
    served = log.read_text()
    assert returncode in (0, -signal.SIGTERM), served[-4000:]
    assert "Traceback" not in served, served[-4000:]
    assert served.count("Application startup complete") == 2, served[-4000:]
    assert not (set(loaded_adapters(vllm_server)) & ours), "the workers unload their adapters at exit"

    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'evoq.db'}")
    try:
        with Session(engine) as session:
            assert session.scalar(select(func.count(Prediction.id))) == 5
            logged = set(session.scalars(select(Image.sha256)).all())
        assert set(shas) <= logged and len(logged) == 5
    finally:
        engine.dispose()
