"""In-process transformers engine with a dynamic batcher and atomic hot-swap.

Requests queue up; a batcher task takes everything that arrives within a short window (or while the
previous batch runs) and answers it with one `generate` call per sampling setting, each request
expanded to its n rows. Generation runs on one dedicated thread, so the event loop never blocks.
A swap loads the new weights on another thread beside the old ones and then replaces one reference;
a batch already started finishes on the model it started with, and every result names its version.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import GenerationConfig, LogitsProcessorList

from iqa.engines.base import (
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    Sampling,
)
from iqa.engines.constraint import AnswerConstraint, AnswerGrammar
from iqa.engines.hf_loading import LoadedModel, load_model
from iqa.images import downscale_for_model
from iqa.prompts import chat_messages
from iqa.settings import PromptProfile

log = logging.getLogger(__name__)

FALLBACK_MAX_NEW_TOKENS = 1024


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class _Vocabulary:
    """Per-model data for constrained decoding, built once on first use."""

    def __init__(self, loaded: LoadedModel) -> None:
        tokenizer = loaded.processor.tokenizer
        self.tokenizer = tokenizer
        self.texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        eos = loaded.model.generation_config.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]

    @lru_cache(maxsize=8)  # noqa: B019 - one instance per loaded model, freed with it
    def grammar(self, profile: PromptProfile, kind: str) -> AnswerGrammar:
        return AnswerGrammar.build(self.tokenizer, profile, kind, self.eos_ids)


class LocalEngine:
    """Engine on in-process transformers; see the module docstring."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        profile: PromptProfile = "evoquality",
        device: str = "auto",
        dtype: str = "auto",
        max_pixels: int = 1280 * 28 * 28,
        batch_window_ms: float = 5.0,
        max_batch_rows: int = 64,
    ) -> None:
        self._initial = model
        self.profile = profile
        self.device = device
        self.dtype = dtype
        self.max_pixels = max_pixels
        self.batch_window = batch_window_ms / 1000
        self.max_batch_rows = max_batch_rows
        self._loaded: LoadedModel | None = None
        self._vocab: dict[int, _Vocabulary] = {}
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()  # serving requests
        self._background: asyncio.Queue[_Pending] = asyncio.Queue()  # round work (votes, evaluation)
        self._arrived = asyncio.Event()
        self.background_rows = max(1, max_batch_rows // 4)
        self._generate_thread = ThreadPoolExecutor(1, thread_name_prefix="evoq-generate")
        self._swap_lock = asyncio.Lock()
        self._batcher: asyncio.Task | None = None
        self.batches_run = 0  # observable for tests and benchmarks

    @property
    def active(self) -> ModelSpec:
        if self._loaded is None:
            raise EngineUnavailable("the model is still loading")
        return self._loaded.spec

    @property
    def default_max_new_tokens(self) -> int:
        """The loaded model's own completion length, else a generous fallback."""
        loaded = self._loaded
        return (loaded and loaded.default_max_new_tokens) or FALLBACK_MAX_NEW_TOKENS

    async def start(self) -> None:
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(load_model, self._initial, self.device, self.dtype)
        if self._batcher is None:
            self._batcher = asyncio.create_task(self._batch_loop(), name="evoq-batcher")

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            self._batcher = None
        for queue in (self._queue, self._background):
            while not queue.empty():
                pending = queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(EngineUnavailable("the engine is shutting down"))
        self._generate_thread.shutdown(wait=True)
        self._loaded = None

    async def health(self) -> dict:
        spec = self.active
        if self._batcher is None or self._batcher.done():
            raise EngineUnavailable("the local engine's batcher is not running")
        queued = {"queued": self._queue.qsize(), "queued_background": self._background.qsize()}
        return {"engine": "local", "model": spec.name, **queued}

    async def activate(self, model: ModelSpec) -> None:
        async with self._swap_lock:
            loaded = await asyncio.to_thread(load_model, model, self.device, self.dtype)
            self._loaded = loaded
            log.info("local engine now serves %s", model.name)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if request.n < 1:
            raise ValueError("n must be at least 1")
        if self._batcher is None:
            raise EngineUnavailable("the local engine is not started")
        future = asyncio.get_running_loop().create_future()
        queue = self._background if request.sampling.background else self._queue
        await queue.put(_Pending(request, future))
        self._arrived.set()
        return await future

    async def _next_batch(self) -> list[_Pending]:
        """Serving requests first (batched within the window); round work only when none waits,
        and in smaller batches, so a round slows serving by at most one small batch."""
        while self._queue.empty():
            if not self._background.empty():
                batch, rows = [], 0
                while not self._background.empty() and rows < self.background_rows:
                    batch.append(self._background.get_nowait())
                    rows += batch[-1].request.n
                return [p for p in batch if not p.future.done()]
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.get_nowait()]
        rows = batch[0].request.n
        deadline = asyncio.get_running_loop().time() + self.batch_window
        while rows < self.max_batch_rows:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                item = (
                    self._queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(item)
            rows += item.request.n
        return [p for p in batch if not p.future.done()]

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            loaded = self._loaded  # the whole batch runs on one model version
            groups = itertools.groupby(
                sorted(batch, key=lambda p: p.request.sampling.key()), key=lambda p: p.request.sampling
            )
            for sampling, members in groups:
                group = list(members)
                try:
                    texts = await loop.run_in_executor(
                        self._generate_thread, self._generate_group, loaded, sampling, group
                    )
                except Exception as error:  # a failed batch fails its requests, not the batcher
                    log.exception("generation failed")
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(EngineUnavailable(f"generation failed: {error}"))
                    continue
                for pending, out in zip(group, texts, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(GenerationResult(out, loaded.spec))

    def _vocabulary(self, loaded: LoadedModel) -> _Vocabulary:
        key = id(loaded)
        if key not in self._vocab:
            self._vocab = {key: _Vocabulary(loaded)}
        return self._vocab[key]

    def _generate_group(
        self, loaded: LoadedModel, sampling: Sampling, group: list[_Pending]
    ) -> list[list[str]]:
        """Generate every row of a group in chunks of at most `max_batch_rows`; runs on the worker thread."""
        processor = loaded.processor
        rows: list[tuple[int, str, list]] = []
        for index, pending in enumerate(group):
            req = pending.request
            text = processor.apply_chat_template(
                chat_messages(req.text, len(req.images)), add_generation_prompt=True, tokenize=False
            )
            images = [downscale_for_model(im, self.max_pixels) for im in req.images]
            rows.extend((index, text, images) for _ in range(req.n))
        outputs: list[list[str]] = [[] for _ in group]
        max_new = sampling.max_new_tokens or loaded.default_max_new_tokens or FALLBACK_MAX_NEW_TOKENS
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=None,
            repetition_penalty=None,
            eos_token_id=loaded.model.generation_config.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            inputs = processor(
                text=[r[1] for r in chunk],
                images=[im for r in chunk for im in r[2]],
                return_tensors="pt",
                padding=True,
            ).to(loaded.device)
            processors = LogitsProcessorList()
            if sampling.constrain:
                vocab = self._vocabulary(loaded)
                grammar = vocab.grammar(self.profile, sampling.constrain)
                processors.append(AnswerConstraint(grammar, vocab.texts, max_new))
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + start)
            with torch.inference_mode():
                out = loaded.model.generate(**inputs, generation_config=config, logits_processor=processors)
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for (index, _, _), text in zip(chunk, texts, strict=True):
                outputs[index].append(text)
        self.batches_run += 1
        return outputs
