"""Fixtures for the engine tests: two tiny demo models (different seeds), built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from iqa.demo_model import build_demo_model
from iqa.engines.base import ModelSpec
from iqa.engines.hf_loading import load_processor


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model is faster on one thread; on a busy 2-core machine, several threads spin and thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo-a") / "model", seed=0)


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo-b") / "model", seed=1)


@pytest.fixture(scope="session")
def spec_a(demo_model_dir: Path) -> ModelSpec:
    return ModelSpec(1, "demo-a (untrained)", "base", str(demo_model_dir), untrained=True)


@pytest.fixture(scope="session")
def spec_b(second_model_dir: Path) -> ModelSpec:
    return ModelSpec(2, "demo-b (seed 1)", "full", str(second_model_dir), untrained=True)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    return load_processor(str(demo_model_dir)).tokenizer
