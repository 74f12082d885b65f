"""The real `evoq serve` console script: no model configured, so it builds the demo model itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from iqa.models import Image, ModelVersion, Prediction
from iqa.service import DEMO_NAME
from tests.api.conftest import jpeg, sha256, unique_seed

EVOQ = Path(sys.executable).parent / "evoq"
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"evoq serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"evoq serve was not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def stop_serve(process: subprocess.Popen, log: Path, timeout: float) -> int:
    """SIGTERM `evoq serve` and wait for its exit code; fail (after killing it) if it does not stop."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"evoq serve did not stop on SIGTERM:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_evoq_serve_builds_the_demo_model_and_scores(tmp_path: Path) -> None:
    assert EVOQ.is_file(), f"console script missing: {EVOQ}"
    data_dir = tmp_path / "data"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOQ_")}  # so no EVOQ_MODEL
    env["EVOQ_DATA_DIR"] = str(data_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"

    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(EVOQ), "serve", "--port", str(port), "--log-level", "info"],
            cwd=workdir,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(process, url, log)
            data = jpeg(unique_seed())
            sha = sha256(data)

            response = httpx.post(
                f"{url}/v1/score",
                files=[("images", ("photo.jpg", data, "image/jpeg"))],
                data={"samples": "2"},
                timeout=60,
            )

            assert response.status_code == 200, response.text
            [item] = response.json()["results"]
            assert 1.0 <= item["score"] <= 5.0
            assert item["model_version"]["name"] == DEMO_NAME
            assert item["model_version"]["untrained"] is True
            assert item["valid_samples"] == item["samples"] == 2
            request_id = response.headers["X-Request-ID"]
            assert len(request_id) == 32
        finally:
            returncode = stop_serve(process, log, timeout=30)

    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit says SIGTERM.
    served = log.read_text()
    assert returncode in (0, -signal.SIGTERM), served[-4000:]
    assert "Application shutdown complete" in served, served[-4000:]
    assert "Traceback" not in served, served[-4000:]
    # The app's own log lines are shown, and the request's lines carry its id.
    assert f"api.app [-] serving {DEMO_NAME} (version 1) with the local engine" in served, served[-4000:]
    assert any(f"[{request_id}]" in line and "POST /v1/score" in line for line in served.splitlines())
    # Everything went under the data dir, none into the working folder.
    assert (data_dir / "models" / "demo" / "evoq_demo.json").is_file()
    assert list(workdir.iterdir()) == []
    engine = create_engine(f"sqlite:///{data_dir / 'evoq.db'}")
    try:
        with Session(engine) as session:
            [image] = session.scalars(select(Image).where(Image.sha256 == sha)).all()
            assert (image.source, image.times_seen, image.byte_size) == ("score", 1, len(data))
            [prediction] = session.scalars(select(Prediction).where(Prediction.image_id == image.id)).all()
            assert prediction.id == item["prediction_id"]
            assert prediction.score == pytest.approx(item["score"])
            version = session.get_one(ModelVersion, prediction.model_version_id)
            assert (version.name, version.untrained, version.status) == (DEMO_NAME, True, "active")
            assert Path(version.path) == (data_dir / "models" / "demo").resolve()
    finally:
        engine.dispose()
    assert (data_dir / "images" / sha[:2] / sha[2:4] / sha).read_bytes() == data


@pytest.mark.parametrize(
    ("extra_env", "message"),
    [
        ({}, "need EVOQ_ENGINE=vllm"),
        ({"EVOQ_ENGINE": "vllm", "EVOQ_RATE_LIMIT": "10/minute"}, "EVOQ_RATE_LIMIT_STORAGE"),
    ],
)
def test_evoq_serve_refuses_workers_it_cannot_run_alike(
    tmp_path: Path, extra_env: dict[str, str], message: str
) -> None:
    """Several workers with the local engine would load the model in each; an in-memory rate limit would
    give each worker its own quota. Both are refused before anything starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOQ_")}
    env |= {"EVOQ_DATA_DIR": str(tmp_path / "data"), **extra_env}
    result = subprocess.run(
        [str(EVOQ), "serve", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the check"
