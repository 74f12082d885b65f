"""The OpenAPI document tells the truth: schemathesis (all checks, all phases) against the live app,
admin routes with and without the token, finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer
from tests.worker.test_inprocess_rounds import PASSING_GATE, TINY_ROUND, TOKEN

ST = Path(sys.executable).parent / "st"
CONFIG = Path(__file__).parent / "schemathesis.toml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(start_server, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    folder = tmp_path_factory.mktemp("openapi")
    # Stateful tests start (and cancel) rounds: tiny ones, in this process.
    return start_server(
        f"sqlite:///{folder / 'evoq.db'}", data_dir=folder, admin_token=TOKEN, **TINY_ROUND, **PASSING_GATE
    )


@pytest.mark.parametrize("token", [True, False], ids=["with-token", "without-token"])
def test_schemathesis_finds_nothing(live: LiveServer, token: bool, tmp_path: Path) -> None:
    command = [
        str(ST), "--config-file", str(CONFIG), "run", f"{live.url}/openapi.json",
        "--checks", "all", "--max-examples", "25", "--seed", "1", "--workers", "1",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    if token:
        command += ["--header", f"Authorization: Bearer {TOKEN}"]
    # In the test's folder: schemathesis keeps a cache (.schemathesis/) where it runs.
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert "No issues found" in done.stdout or "passed" in done.stdout, done.stdout[-3000:]
