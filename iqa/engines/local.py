"""In-process transformers engine with a dynamic batcher and atomic hot-swap.

Requests queue up; a batcher task takes everything that arrives within a short window (or while the
previous batch runs) and answers it with one `generate` call per sampling setting, each request
expanded to its n rows. Generation runs on one dedicated thread, so the event loop never blocks.
A swap loads the new weights on another thread beside the old ones and then replaces one reference;
a batch already started finishes on the model it started with, and every result names its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import torch
from transformers import GenerationConfig, LogitsProcessorList

from iqa.engines.base import (
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    ReadingRequest,
    ReadingResult,
    Sampling,
)
from iqa.engines.constraint import AnswerConstraint, AnswerGrammar
from iqa.engines.hf_loading import LoadedModel, load_model
from iqa.images import downscale_for_model
from iqa.metrics import BATCH_ROWS, MODEL_CPU
from iqa.prompts import chat_messages
from iqa.settings import PromptProfile

log = logging.getLogger(__name__)
Result = TypeVar("Result")

FALLBACK_MAX_NEW_TOKENS = 1024
CLIENT_ACTIVE_S = 5.0
ADAPTIVE_WAIT_SHARE = 0.2
ADAPTIVE_WAIT_CAP_S = 0.1


def _timed(work: Callable[..., Result], *args: object) -> Result:
    """Run `work` on the model thread and count that thread's CPU time (`evoq_engine_model_cpu_seconds`)."""
    started = time.thread_time()
    try:
        return work(*args)
    finally:
        MODEL_CPU.inc(time.thread_time() - started)


@dataclass
class _Pending:
    request: GenerationRequest | ReadingRequest
    future: asyncio.Future

    @property
    def rows(self) -> int:
        """What the request adds to a batch: its samples, or one prompt for a reading."""
        return self.request.n if isinstance(self.request, GenerationRequest) else 1

    @property
    def background(self) -> bool:
        request = self.request
        return request.sampling.background if isinstance(request, GenerationRequest) else request.background

    def group(self) -> tuple[str, ...]:
        """Requests with the same group run in one call: same sampling, or readings of the same kind."""
        request = self.request
        if isinstance(request, GenerationRequest):
            return ("generate", request.sampling.key())
        return ("read", request.text, *request.prefixes, "|", *request.candidates, str(len(request.images)))


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
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()  # serving requests
        self._background: asyncio.Queue[_Pending] = asyncio.Queue()  # round work (votes, evaluation)
        self._arrived = asyncio.Event()
        self.background_rows = max(1, max_batch_rows // 8)  # bounds how long a client waits for round work
        self._last_client_request = float("-inf")  # monotonic time of the last foreground request
        self._last_batch_requests = 1  # client requests in the last client batch, and its duration
        self._last_batch_seconds = 0.0
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
            batcher, self._batcher = self._batcher, None
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher  # fails the requests of the batch in flight
        for queue in (self._queue, self._background):
            while not queue.empty():
                pending = queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(EngineUnavailable("the engine is shutting down"))
        # The running batch (if any) finishes on its thread without blocking the event loop.
        await asyncio.to_thread(self._generate_thread.shutdown, wait=True)
        self._loaded = None

    async def health(self) -> dict:
        spec = self.active
        if self._batcher is None or self._batcher.done():
            raise EngineUnavailable("the local engine's batcher is not running")
        queued = self.queue_depth()
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
        return await self._submit(_Pending(request, asyncio.get_running_loop().create_future()))

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """Readings queue and batch like generation: concurrent readings of one kind share a forward."""
        if self._batcher is None:
            raise EngineUnavailable("the local engine is not started")
        loaded = self._loaded
        if loaded is None:
            raise EngineUnavailable("the model is still loading")
        self._candidate_ids(loaded, request)  # a bad request fails alone, before it joins a batch
        return await self._submit(_Pending(request, asyncio.get_running_loop().create_future()))

    async def _submit(self, pending: _Pending):
        queue = self._background if pending.background else self._queue
        if not pending.background:
            self._last_client_request = time.monotonic()
        await queue.put(pending)
        self._arrived.set()
        return await pending.future

    @staticmethod
    def _candidate_ids(loaded: LoadedModel, request: ReadingRequest) -> list[int]:
        """The answer tokens a reading reads, tokenized once per model (every reading asks the same)."""
        known = loaded.candidate_ids.get(request.candidates)
        if known is not None:
            return known
        tokenizer = loaded.processor.tokenizer
        encoded = [tokenizer.encode(c, add_special_tokens=False) for c in request.candidates]
        if any(len(ids) != 1 for ids in encoded):
            raise ValueError(f"every candidate must be one token: {request.candidates}")
        first_ids = [ids[0] for ids in encoded]
        loaded.candidate_ids[request.candidates] = first_ids
        return first_ids

    def _read_group(self, loaded: LoadedModel, group: list[_Pending]) -> list[ReadingResult]:
        """Readings of one kind, at most `max_batch_rows` prompt and prefix rows per forward."""
        first = group[0].request
        per_call = max(1, self.max_batch_rows // len(first.prefixes))
        logprobs: list[list[list[float | None]]] = []
        for start in range(0, len(group), per_call):
            chunk = [p.request for p in group[start : start + per_call]]
            BATCH_ROWS.observe(len(chunk) * len(first.prefixes))
            logprobs.extend(self._read(loaded, chunk))
        self.batches_run += 1
        return [ReadingResult(rows, loaded.spec) for rows in logprobs]

    def _read(self, loaded: LoadedModel, requests: list[ReadingRequest]) -> list[list[list[float | None]]]:
        """Readings of one kind (same text, prefixes and candidates; their own images). Every prompt
        (with its images) and the prefixes' common part run once, left-padded in one batch; each
        prefix's own tokens then continue from that KV cache (a score reading: one prefill, not five)."""
        request = requests[0]
        processor = loaded.processor
        tokenizer = processor.tokenizer
        chosen_ids = self._candidate_ids(loaded, request)
        prompt = processor.apply_chat_template(
            chat_messages(request.text, len(request.images)), add_generation_prompt=True, tokenize=False
        )
        images = [[downscale_for_model(im, self.max_pixels) for im in r.images] for r in requests]
        # The prefixes' own tokens, found on the text alone (the images expand inside the prompt only).
        ids = [tokenizer.encode(prompt + prefix, add_special_tokens=False) for prefix in request.prefixes]
        shared = min(len(row) for row in ids)
        while shared and any(row[:shared] != ids[0][:shared] for row in ids):
            shared -= 1
        tails = [torch.tensor(row[shared:]) for row in ids]
        if len({len(tail) for tail in tails if len(tail)}) > 1:  # tails of mixed lengths
            return [
                self._read_rows(loaded, r, prompt, ims, chosen_ids)
                for r, ims in zip(requests, images, strict=True)
            ]
        first = processor(
            text=[prompt + request.prefixes[0]] * len(requests),
            images=[im for ims in images for im in ims],
            return_tensors="pt",
            padding=True,
        )
        shared = first["input_ids"].shape[1] - len(tails[0])  # the same place, counted with the images
        per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
        common = {
            key: (value[:, :shared] if key in per_token else value).to(loaded.device)
            for key, value in first.items()
        }
        with torch.inference_mode():
            out = loaded.model(**common, use_cache=True)
            at_common = torch.log_softmax(out.logits[:, -1].float(), -1)[:, chosen_ids].cpu().tolist()
            continuing = [k for k, tail in enumerate(tails) if len(tail)]
            continued: list[dict[int, list[float | None]]] = [{} for _ in requests]
            if continuing:
                k = len(continuing)
                out.cache.batch_repeat_interleave(k)
                suffix = (
                    torch.stack([tails[j] for j in continuing]).repeat(len(requests), 1).to(loaded.device)
                )
                # Left padding stays masked; positions go on from each prompt's own end: its unpadded
                # length plus Qwen's mrope offset, which the model keeps from the prefill.
                mask = common["attention_mask"].repeat_interleave(k, 0)
                mask = torch.cat([mask, torch.ones_like(suffix)], 1)
                lengths = common["attention_mask"].sum(1, keepdim=True).repeat_interleave(k, 0)
                deltas = loaded.model.model.rope_deltas.repeat_interleave(k, 0).to(loaded.device)
                steps = torch.arange(suffix.shape[1], device=loaded.device)[None, :]
                positions = (lengths + deltas + steps).unsqueeze(0).expand(3, -1, -1)
                logits = (
                    loaded.model(
                        input_ids=suffix,
                        attention_mask=mask,
                        position_ids=positions,
                        cache=out.cache,
                        use_cache=True,
                    )
                    .logits[:, -1]
                    .float()
                )
                read = torch.log_softmax(logits, -1)[:, chosen_ids].cpu().tolist()
                for row, values in enumerate(read):
                    continued[row // k][continuing[row % k]] = values
        return [[continued[r].get(j, at_common[r]) for j in range(len(tails))] for r in range(len(requests))]

    def _read_rows(
        self, loaded: LoadedModel, request: ReadingRequest, prompt: str, images: list, chosen_ids: list[int]
    ) -> list[list[float | None]]:
        """Every prefix as a row of one batch (prefixes whose own tokens differ in length)."""
        inputs = loaded.processor(
            text=[prompt + prefix for prefix in request.prefixes],
            images=images * len(request.prefixes),
            return_tensors="pt",
            padding=True,
        ).to(loaded.device)
        with torch.inference_mode():
            logits = loaded.model(**inputs).logits[:, -1, :].float()
        return torch.log_softmax(logits, -1)[:, chosen_ids].cpu().tolist()

    def queue_depth(self) -> dict[str, int]:
        """Requests waiting for the model: client requests and round work."""
        return {"queued": self._queue.qsize(), "queued_background": self._background.qsize()}

    async def _next_batch(self) -> list[_Pending]:
        """Serving requests first (batched within the window); round work only when none waits, and,
        while clients are active (a request in the last few seconds), in small batches, so a round
        delays a client by at most one small batch. With no clients, round work runs at full size."""
        while self._queue.empty():
            if not self._background.empty():
                clients_active = time.monotonic() - self._last_client_request < CLIENT_ACTIVE_S
                limit = self.background_rows if clients_active else self.max_batch_rows
                batch, rows = [], 0
                while not self._background.empty() and rows < limit:
                    batch.append(self._background.get_nowait())
                    rows += batch[-1].rows
                return [p for p in batch if not p.future.done()]
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.get_nowait()]
        rows = batch[0].rows
        # Adaptive window: clients answered by the last batch come back staggered (upload, decode,
        # storage), so while fewer requests than the last batch held are here, wait a little longer
        # (a share of that batch's time, capped) instead of splitting them into small batches.
        now = asyncio.get_running_loop().time
        base_end = now() + self.batch_window
        patient_end = base_end + min(ADAPTIVE_WAIT_CAP_S, ADAPTIVE_WAIT_SHARE * self._last_batch_seconds)
        while rows < self.max_batch_rows:
            end = base_end if len(batch) >= self._last_batch_requests else patient_end
            timeout = end - now()
            try:
                item = (
                    self._queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(item)
            rows += item.rows
        return [p for p in batch if not p.future.done()]

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            loaded = self._loaded  # the whole batch runs on one model version
            started = time.monotonic()
            for _, members in itertools.groupby(sorted(batch, key=_Pending.group), key=_Pending.group):
                group = list(members)
                request = group[0].request
                try:
                    if isinstance(request, GenerationRequest):
                        results = await loop.run_in_executor(
                            self._generate_thread,
                            _timed,
                            self._generate_group,
                            loaded,
                            request.sampling,
                            group,
                        )
                    else:
                        results = await loop.run_in_executor(
                            self._generate_thread, _timed, self._read_group, loaded, group
                        )
                except asyncio.CancelledError:  # closing: nobody will wait for this batch
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(EngineUnavailable("the engine is shutting down"))
                    raise
                except Exception as error:  # a failed batch fails its requests, not the batcher
                    log.exception("generation failed")
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(EngineUnavailable(f"generation failed: {error}"))
                    continue
                for pending, result in zip(group, results, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)
            if not batch[0].background:
                self._last_batch_requests = len(batch)
                self._last_batch_seconds = time.monotonic() - started

    @staticmethod
    def _vocabulary(loaded: LoadedModel) -> _Vocabulary:
        if loaded.vocabulary is None:
            loaded.vocabulary = _Vocabulary(loaded)
        return loaded.vocabulary

    def _generate_group(
        self, loaded: LoadedModel, sampling: Sampling, group: list[_Pending]
    ) -> list[GenerationResult]:
        """All completions of a group; runs on the generation thread.

        Each request is encoded once and expanded to its n samples inside `generate`
        (`num_return_sequences`), so images are preprocessed once per request, not once per sample.
        Requests with the same n share a call of at most `max_batch_rows` rows.
        """
        processor = loaded.processor
        prompts = [
            (
                processor.apply_chat_template(
                    chat_messages(p.request.text, len(p.request.images)),
                    add_generation_prompt=True,
                    tokenize=False,
                ),
                [downscale_for_model(im, self.max_pixels) for im in p.request.images],
            )
            for p in group
        ]
        # (request index, samples) units: a request larger than a batch is split over several calls;
        # greedy samples are all the same, so a greedy request is decoded once and repeated
        greedy = sampling.temperature == 0
        units: dict[int, list[int]] = {}
        for index, pending in enumerate(group):
            left = 1 if greedy else pending.request.n
            while left > 0:
                m = min(left, self.max_batch_rows)
                units.setdefault(m, []).append(index)
                left -= m
        outputs: list[list[str]] = [[] for _ in group]
        grammar = None
        max_new = sampling.max_new_tokens or loaded.default_max_new_tokens or FALLBACK_MAX_NEW_TOKENS
        if sampling.constrain:
            vocab = self._vocabulary(loaded)
            grammar = vocab.grammar(self.profile, sampling.constrain)
            max_new = max(max_new, grammar.min_tokens)  # room for the whole forced answer
        for m, indices in sorted(units.items()):
            per_call = max(1, self.max_batch_rows // m)
            for start in range(0, len(indices), per_call):
                chunk = indices[start : start + per_call]
                BATCH_ROWS.observe(len(chunk) * m)
                texts = self._generate_call(
                    loaded, sampling, grammar, max_new, [prompts[i] for i in chunk], m
                )
                for position, index in enumerate(chunk):
                    outputs[index].extend(texts[position * m : (position + 1) * m])
        if greedy:
            outputs = [texts * pending.request.n for texts, pending in zip(outputs, group, strict=True)]
        self.batches_run += 1
        return [GenerationResult(texts, loaded.spec) for texts in outputs]

    def _generate_call(
        self,
        loaded: LoadedModel,
        sampling: Sampling,
        grammar: AnswerGrammar | None,
        max_new: int,
        prompts: list[tuple[str, list]],
        samples: int,
    ) -> list[str]:
        """One `generate`: `samples` completions of each prompt, prompt by prompt."""
        greedy = sampling.temperature == 0
        processor = loaded.processor
        inputs = processor(
            text=[text for text, _ in prompts],
            images=[im for _, images in prompts for im in images],
            return_tensors="pt",
            padding=True,
        ).to(loaded.device)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            repetition_penalty=None,
            num_return_sequences=samples,
            eos_token_id=loaded.model.generation_config.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        processors = LogitsProcessorList()
        if grammar is not None:
            processors.append(AnswerConstraint(grammar, self._vocabulary(loaded).texts, max_new))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, generation_config=config, logits_processor=processors)
        return processor.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
