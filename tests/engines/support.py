"""Helpers for the engine tests: a running engine, and a recorder around the model's `generate`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from iqa.engines.base import ModelSpec
from iqa.engines.local import LocalEngine


@asynccontextmanager
async def running_engine(spec: ModelSpec, **options) -> AsyncIterator[LocalEngine]:
    """A started LocalEngine on CPU, closed afterwards."""
    engine = LocalEngine(spec, device="cpu", **options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@dataclass
class GenerateCall:
    """What one `model.generate` call was asked and what it returned."""

    rows: int  # sequences generated: prompts x num_return_sequences
    prompt_len: int
    do_sample: bool
    temperature: float | None
    max_new_tokens: int
    output: torch.Tensor | None = None


class GenerateRecorder:
    """Wraps the loaded model's `generate` to record every call; `fault` may raise to inject a failure."""

    def __init__(self, engine: LocalEngine, fault: Callable[[GenerateCall], None] | None = None) -> None:
        self.model = engine._loaded.model  # the model the engine serves now
        self.original = self.model.generate
        self.fault = fault
        self.calls: list[GenerateCall] = []
        self.model.generate = self._generate

    def _generate(self, *args, **kwargs):
        config = kwargs["generation_config"]
        call = GenerateCall(
            rows=kwargs["input_ids"].shape[0] * (config.num_return_sequences or 1),
            prompt_len=kwargs["input_ids"].shape[1],
            do_sample=bool(config.do_sample),
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
        )
        self.calls.append(call)
        if self.fault is not None:
            self.fault(call)
        call.output = self.original(*args, **kwargs)
        return call.output

    def restore(self) -> None:
        self.model.generate = self.original
