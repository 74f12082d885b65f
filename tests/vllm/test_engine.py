"""The vLLM engine against a real vLLM server: agreement with the local engine, requests, failures."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from iqa.engines import vllm as vllm_engine
from iqa.engines.base import EngineUnavailable, GenerationRequest, ModelSpec, Sampling
from iqa.engines.local import LocalEngine
from iqa.engines.vllm import VLLMEngine
from iqa.prompts import parse_score, parse_vote, prompt_set
from iqa.reading import read_compare, read_score
from iqa.scoring import compare_images, score_image
from tests.imagegen import photo
from tests.vllm.conftest import TinyModels
from tests.vllm.server import VLLMServer, free_port
from tests.vllm.support import LocalReference, fixed_point_image, same_completion

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

EVOQ = prompt_set("evoquality")


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real transport, plus a record of every request body sent (to count and inspect them)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[str, dict | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.url.path, body))
        return await self.inner.handle_async_request(request)

    def chats(self) -> list[dict]:
        """Chat requests other than the one-token check each adapter gets when loaded."""
        chats = [body for path, body in self.sent if path == "/v1/chat/completions" and body]
        return [body for body in chats if body["messages"][0]["content"] != "ping"]


def spec_of(models: TinyModels, kind: str) -> ModelSpec:
    return {
        "base": ModelSpec(1, "tiny-base", "base", str(models.base), untrained=True),
        "lora": ModelSpec(2, "tiny-lora-a", "lora", str(models.lora_a), str(models.base), untrained=True),
        "full": ModelSpec(3, "tiny-full", "full", str(models.full), untrained=True),
    }[kind]


def engine_for(server: VLLMServer, spec: ModelSpec, tmp_path: Path, **kwargs: object) -> VLLMEngine:
    return VLLMEngine(spec, base_url=server.url, adapter_dir=tmp_path / "adapters", **kwargs)  # type: ignore[arg-type]


# ---- agreement with the local engine --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "lora", "full"])
async def test_greedy_completions_match_the_local_engine(
    kind: str,
    vllm_server: VLLMServer,
    tiny_models: TinyModels,
    local_reference: LocalReference,
    tmp_path: Path,
) -> None:
    """Same prompt and image at temperature 0 in fp32: vLLM and transformers give the same completion.

    Covers the chat template, image placement, the image processor (a 640x480 image is resized by
    it, 96x64 is not on the 28-pixel grid) and, for LoRA and full versions, the swap itself.
    """
    spec = spec_of(tiny_models, kind)
    engine = engine_for(vllm_server, spec, tmp_path)
    await engine.start()
    try:
        sizes = [(224, 224, 0), (96, 64, 1), (640, 480, 3)]
        images = [fixed_point_image(*size) for size in sizes]
        cases = [((im,), EVOQ.score_text) for im in images]
        cases += [((images[0], images[1]), EVOQ.compare_text), ((images[2], images[0]), EVOQ.compare_text)]
        greedy = Sampling(temperature=0.0)
        for pictures, text in cases:
            result = await engine.generate(GenerationRequest(pictures, text, 2, greedy))
            expected = await local_reference.complete(spec, pictures, text)
            assert result.model == spec
            assert len(result.texts) == 2
            for got in result.texts:
                assert same_completion(expected, got), (expected, got)
    finally:
        await engine.close()


@pytest.mark.parametrize("kind", ["base", "lora", "full"])
async def test_one_pass_readings_match_the_local_engine(
    kind: str, vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """The answer-digit distribution read through vLLM (`logprob_token_ids`, the assistant turn
    continued) is the local engine's, for every version kind: the untrained demo puts about 1% of its
    probability on the digits, far outside vLLM's top tokens, so this also shows the exact-id read."""
    spec = spec_of(tiny_models, kind)
    engine = engine_for(vllm_server, spec, tmp_path)
    local = LocalEngine(spec, device="cpu", dtype="float32")
    await engine.start()
    await local.start()
    try:
        images = [fixed_point_image(224, 224, 0), fixed_point_image(96, 64, 1)]
        for image in images:
            remote, reference = (
                await read_score(engine, image, "evoquality"),
                await read_score(local, image, "evoquality"),
            )
            assert remote.model == spec
            assert remote.score == pytest.approx(reference.score, abs=2e-3)
            assert remote.coverage == pytest.approx(reference.coverage, rel=2e-2)
            assert list(remote.first_digit.values()) == pytest.approx(
                list(reference.first_digit.values()), abs=2e-3
            )
        remote_vote = await read_compare(engine, images[0], images[1], "evoquality")
        local_vote = await read_compare(local, images[0], images[1], "evoquality")
        assert remote_vote.prob_first_ab == pytest.approx(local_vote.prob_first_ab, abs=2e-3)
        assert remote_vote.prob_a_better == pytest.approx(local_vote.prob_a_better, abs=2e-3)
    finally:
        await engine.close()
        await local.close()


# ---- what goes over the wire -----------------------------------------------------------------------
async def test_n_samples_go_in_one_request_and_votes_in_two(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    transport = RecordingTransport()
    engine = engine_for(vllm_server, spec_of(tiny_models, "base"), tmp_path, transport=transport)
    await engine.start()
    try:
        image_a, image_b = photo(96, 64, 1), photo(96, 64, 2)
        sampling = Sampling(temperature=1.0, constrain="score")
        scored = await score_image(engine, image_a, 8, sampling, "evoquality")
        assert [c["n"] for c in transport.chats()] == [8]
        assert scored.samples == 8 and scored.valid == 8  # constrained: every answer parses
        transport.sent.clear()
        votes = Sampling(temperature=1.0, constrain="vote")
        compared = await compare_images(engine, image_a, image_b, 8, votes, "evoquality")
        assert sorted(c["n"] for c in transport.chats()) == [4, 4]
        assert compared.votes_a + compared.votes_b == 8 and compared.invalid == 0
        transport.sent.clear()
        greedy = await engine.generate(GenerationRequest((image_a,), EVOQ.score_text, 4, Sampling(0.0)))
        assert [c["n"] for c in transport.chats()] == [1]  # vLLM refuses n > 1 when greedy
        assert len(greedy.texts) == 4 and len(set(greedy.texts)) == 1
        transport.sent.clear()
        background = Sampling(temperature=1.0, constrain="score", background=True)
        assert (await score_image(engine, image_a, 2, background, "evoquality")).valid == 2
        assert [c.get("priority") for c in transport.chats()] == [1]  # round work after clients
    finally:
        await engine.close()


async def test_a_huge_image_is_sent_downscaled(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    transport = RecordingTransport()
    max_pixels = 1280 * 28 * 28
    engine = engine_for(vllm_server, spec_of(tiny_models, "base"), tmp_path, transport=transport)
    await engine.start()
    try:
        huge = photo(5000, 4000, 5)  # 20 MP
        await engine.generate(GenerationRequest((huge,), EVOQ.score_text, 1, Sampling(temperature=0.0)))
        url = transport.chats()[0]["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        data = base64.b64decode(url.split(",", 1)[1])
        sent = Image.open(io.BytesIO(data))
        assert sent.width * sent.height <= max_pixels and abs(sent.width / sent.height - 1.25) < 0.01
        assert len(data) < 1_000_000
    finally:
        await engine.close()


@pytest.mark.parametrize("profile", ["evoquality", "visualquality-r1"])
async def test_constrained_answers_always_parse(
    profile: str, vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    engine = engine_for(vllm_server, spec_of(tiny_models, "base"), tmp_path, profile=profile)
    await engine.start()
    try:
        texts = prompt_set(profile)  # type: ignore[arg-type]
        image = photo(96, 64, 4)
        scores = await engine.generate(
            GenerationRequest((image,), texts.score_text, 16, Sampling(temperature=1.0, constrain="score"))
        )
        votes = await engine.generate(
            GenerationRequest((image, image), texts.compare_text, 16, Sampling(1.0, constrain="vote"))
        )
        assert all(parse_score(t, profile) is not None for t in scores.texts), scores.texts  # type: ignore[arg-type]
        assert all(parse_vote(t, profile) is not None for t in votes.texts), votes.texts  # type: ignore[arg-type]
        assert len(set(scores.texts)) > 1  # sampled, not one answer repeated
    finally:
        await engine.close()


# ---- round work yields to clients ------------------------------------------------------------------
async def test_round_work_yields_to_clients_and_runs_wide_without_them(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving engine running a round (the embedded runner): while its client requests come, at
    most BACKGROUND_WHILE_CLIENTS round requests are at the server; once clients are quiet for
    CLIENT_ACTIVE_S, the round goes wide again. A round worker's engine, another process, sees the
    same clients in the server's gauges."""
    monkeypatch.setattr(vllm_engine, "CLIENT_ACTIVE_S", 1.0)
    spec = spec_of(tiny_models, "base")
    engine = engine_for(vllm_server, spec, tmp_path / "api")
    worker = engine_for(vllm_server, spec, tmp_path / "worker")
    await engine.start()
    await worker.start()
    image = photo(96, 64, 1)
    client = GenerationRequest((image,), EVOQ.score_text, 4, Sampling(max_new_tokens=200))
    vote = GenerationRequest(
        (image, image), EVOQ.compare_text, 2, Sampling(max_new_tokens=200, background=True)
    )
    stop = asyncio.Event()

    async def client_loop() -> int:
        sent = 0
        while not stop.is_set():
            await engine.generate(client)
            sent += 1
        return sent

    async def widest(requests: int) -> int:
        seen = 0
        task = asyncio.ensure_future(asyncio.gather(*(engine.generate(vote) for _ in range(requests))))  # noqa: RUF006
        while not task.done():
            seen = max(seen, engine._background_in_flight)
            await asyncio.sleep(0.005)
        await task
        return seen

    try:
        clients = asyncio.gather(*(client_loop() for _ in range(3)))
        await asyncio.sleep(0.1)
        while_clients = await widest(8)
        deadline = asyncio.get_running_loop().time() + 30
        while not await worker._clients_active():  # the other process's view: vLLM's gauges
            assert asyncio.get_running_loop().time() < deadline, "the worker never saw the clients"
            await asyncio.sleep(0.1)
        stop.set()
        assert sum(await clients) > 3
        await asyncio.sleep(2.0)  # clients quiet for longer than CLIENT_ACTIVE_S
        alone = await widest(8)
    finally:
        await engine.close()
        await worker.close()
    assert while_clients <= vllm_engine.BACKGROUND_WHILE_CLIENTS, while_clients
    assert alone > vllm_engine.BACKGROUND_WHILE_CLIENTS, alone  # (the gauges may lag a probe or two)


async def test_round_work_alone_is_never_taken_for_a_client(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """With no client anywhere, a round's own sequences in vLLM's gauges (read a step late, while its
    requests come and go) must not look like someone else's: measured before the fix, a round alone
    took them for clients hundreds of times per 30 pairs and voted at 0.5x its speed."""
    worker = engine_for(vllm_server, spec_of(tiny_models, "base"), tmp_path / "worker")
    await worker.start()
    deadline = asyncio.get_running_loop().time() + 60
    while await worker._server_adapters():  # the shared server still finishing an earlier test's work
        assert asyncio.get_running_loop().time() < deadline, "the server never went idle"
        await asyncio.sleep(0.2)
    image = photo(96, 64, 1)
    vote = GenerationRequest(
        (image, image), EVOQ.compare_text, 4, Sampling(max_new_tokens=60, background=True)
    )
    widest = 0
    slots = asyncio.Semaphore(12)

    async def one() -> None:
        nonlocal widest
        async with slots:  # a steady stream, as a round's voting: requests end while others start
            await worker.generate(vote)
            widest = max(widest, worker._background_in_flight)

    try:
        await asyncio.gather(*(one() for _ in range(60)))
    finally:
        await worker.close()
    assert worker._client_seen_at == float("-inf")  # no client was ever seen
    assert widest > vllm_engine.BACKGROUND_WHILE_CLIENTS


async def test_an_image_sent_again_is_not_encoded_again(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A comparison sends its images in both orders, and a round's image meets several partners: the
    data URL of an image object is made once; another object (even at a reused address) gets its own."""
    encoded: list[int] = []
    original = vllm_engine.image_data_url

    def counting(image: Image.Image, max_pixels: int) -> str:
        encoded.append(id(image))
        return original(image, max_pixels)

    monkeypatch.setattr(vllm_engine, "image_data_url", counting)
    engine = VLLMEngine(spec_of(tiny_models, "base"), base_url="http://127.0.0.1:9", adapter_dir=tmp_path)
    a, b = photo(64, 48, 1), photo(64, 48, 2)
    first = await engine._urls((a, b))
    assert await engine._urls((b, a)) == first[::-1] and len(encoded) == 2
    del a
    c = photo(64, 48, 3)  # may take the freed address: the weak reference tells them apart
    assert (await engine._urls((c,)))[0] != first[0] and len(encoded) == 3
    alive = [photo(16, 16, 100 + k) for k in range(vllm_engine.URL_CACHE_SIZE + 5)]
    for image in alive:  # bounded: the oldest are dropped
        await engine._urls((image,))
    # the live images have distinct addresses (one of them may reuse a's): the newest are kept, exactly
    assert set(engine._url_cache) == {id(image) for image in alive[-vllm_engine.URL_CACHE_SIZE :]}


# ---- failures --------------------------------------------------------------------------------------
async def test_an_unreachable_server_is_unavailable_after_bounded_retries(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    transport = RecordingTransport()
    spec = spec_of(tiny_models, "base")
    url = f"http://127.0.0.1:{free_port()}"
    engine = VLLMEngine(spec, base_url=url, adapter_dir=tmp_path, transport=transport, timeout_s=5)
    await engine.start()  # does not fail: the first request sets the server up once it is there
    try:
        transport.sent.clear()
        with pytest.raises(EngineUnavailable, match="not answering") as caught:
            await engine.generate(GenerationRequest((photo(),), EVOQ.score_text, 2, Sampling()))
        assert caught.value.retry_after > 0
        assert 1 < len(transport.sent) <= 3  # retried, but not forever
        with pytest.raises(EngineUnavailable):
            await engine.health()
    finally:
        await engine.close()
