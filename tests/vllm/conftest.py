"""Fixtures of the vLLM integration tests: ONE vLLM server per test session, on the tiny demo model.

The server comes from `.venv-vllm` (built by `scripts/build_vllm_venv.sh`, which CI runs). A missing
venv fails these tests with the command to run; it never skips them, or CI would silently lose them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iqa.demo_model import build_demo_model
from tests.vllm.server import MAX_LORA_RANK, VLLMServer, missing_venv_message
from tests.vllm.support import LocalReference, make_lora


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs the vLLM venv (.venv-vllm); starts a vLLM server")


@dataclass(frozen=True)
class TinyModels:
    """Checkpoints of the tiny model: the base, a full-weight version and two LoRA adapters of the base."""

    base: Path
    full: Path
    lora_a: Path
    lora_b: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    base = build_demo_model(root / "base", seed=0)
    return TinyModels(
        base=base,
        full=build_demo_model(root / "full", seed=1),  # same architecture and tokenizer, other weights
        lora_a=make_lora(base, root / "lora-a", seed=1, rank=MAX_LORA_RANK),
        lora_b=make_lora(base, root / "lora-b", seed=2, rank=4),
    )


@pytest.fixture(scope="session")
def vllm_server(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A vLLM server on the tiny base model for the whole session, stopped by PID at the end."""
    if problem := missing_venv_message():
        pytest.fail(problem, pytrace=False)
    server = VLLMServer(tiny_models.base, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        seconds = server.start()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    print(f"\nvLLM server on {server.url} healthy after {seconds:.1f} s (log: {server.log_path})")
    try:
        yield server
    finally:
        started = time.perf_counter()
        server.stop()
        print(f"\nvLLM server stopped in {time.perf_counter() - started:.1f} s")


@pytest.fixture(scope="session")
async def local_reference() -> AsyncIterator[LocalReference]:
    """The local engine's greedy completions, the reference vLLM's outputs are checked against."""
    reference = LocalReference()
    try:
        yield reference
    finally:
        await reference.close()
