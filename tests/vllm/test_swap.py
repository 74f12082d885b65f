"""Hot-swap under traffic: every answer, during and after the swap, comes from the version it names.

Traffic runs through the API at temperature 0 while versions are activated; each logged completion is
compared with the local engine's greedy completion for the version the answer reports. The versions
give different completions for every test image, so a wrong model cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iqa.engines.base import EngineUnavailable, GenerationRequest, ModelSpec, Sampling
from iqa.engines.vllm import VLLMEngine
from iqa.models import Prediction
from iqa.prompts import prompt_set
from iqa.service import IQAService
from tests.vllm.conftest import TinyModels
from tests.vllm.server import VLLMServer
from tests.vllm.support import (
    ADMIN,
    LocalReference,
    api_settings,
    fixed_point_image,
    png,
    register_version,
    running_api,
    same_completion,
)

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

WORKERS = 3
TRAFFIC_S = 1.5  # of traffic on each side of a swap
SCORE_TEXT = prompt_set("evoquality").score_text


@dataclass(frozen=True)
class Answer:
    started: float
    finished: float
    status: int
    version_id: int | None
    prediction_id: int | None
    sha256: str


class Traffic:
    """Score requests from a few concurrent clients until stopped; `samples` varies to avoid the cache."""

    def __init__(self, client: httpx.AsyncClient, images: dict[str, bytes]) -> None:
        self.client = client
        self.uploads = list(images.items())
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, first: int) -> None:
        loop = asyncio.get_running_loop()
        i = first
        while not self._stop.is_set():
            sha, data = self.uploads[i % len(self.uploads)]
            samples = 1 + (i // len(self.uploads)) % 8
            started = loop.time()
            files = [("images", ("img.png", data, "image/png"))]
            response = await self.client.post("/v1/score", files=files, data={"samples": str(samples)})
            item = response.json()["results"][0] if response.status_code == 200 else {}
            version = item.get("model_version", {}).get("id")
            self.answers.append(
                Answer(started, loop.time(), response.status_code, version, item.get("prediction_id"), sha)
            )
            i += WORKERS

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(WORKERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def expected_completions(
    reference: LocalReference, specs: list[ModelSpec], images: dict[str, object]
) -> dict[tuple[int, str], str]:
    """(version id, image sha256) -> the local engine's greedy completion; versions must all differ."""
    expected = {}
    for sha, image in images.items():
        for spec in specs:
            expected[(spec.version_id, sha)] = await reference.complete(spec, (image,), SCORE_TEXT)  # type: ignore[arg-type]
        outputs = [expected[(spec.version_id, sha)] for spec in specs]
        assert len(set(outputs)) == len(specs), (
            f"versions agree on an image; the test could not tell: {outputs}"
        )
    return expected


async def swap_under_traffic(
    client: httpx.AsyncClient, target: ModelSpec, uploads: dict[str, bytes]
) -> tuple[list[Answer], float, float]:
    """Activate `target` through the admin API while traffic flows; the answers and the swap's span."""
    loop = asyncio.get_running_loop()
    traffic = Traffic(client, uploads)
    traffic.start()
    await asyncio.sleep(TRAFFIC_S)
    swap_started = loop.time()
    response = await client.post(f"/admin/models/{target.version_id}/activate", headers=ADMIN)
    swap_done = loop.time()
    assert response.status_code == 200, response.text
    await asyncio.sleep(TRAFFIC_S)
    await traffic.stop()
    return traffic.answers, swap_started, swap_done


def check_answers(
    service: IQAService,
    answers: list[Answer],
    expected: dict[tuple[int, str], str],
    old: ModelSpec,
    new: ModelSpec,
    swap: tuple[float, float],
) -> None:
    assert answers and all(a.status == 200 for a in answers), {a.status for a in answers}
    with service.sessions() as session:
        logged = {a.prediction_id: session.get_one(Prediction, a.prediction_id) for a in answers}
        rows = {k: (p.model_version_id, list(p.completions)) for k, p in logged.items()}
    for answer in answers:
        version_id, completions = rows[answer.prediction_id]
        assert answer.version_id == version_id in (old.version_id, new.version_id)
        want = expected[(version_id, answer.sha256)]
        assert completions and all(same_completion(want, c) for c in completions), (version_id, completions)
    swap_started, swap_done = swap
    after = [a for a in answers if a.started > swap_done]
    assert after and all(a.version_id == new.version_id for a in after)
    assert any(a.version_id == old.version_id for a in answers)
    assert any(a.started < swap_done and a.finished > swap_started for a in answers), (
        "no traffic during the swap"
    )


async def served_adapters(server: VLLMServer) -> set[str]:
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{server.url}/v1/models")).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def upload_set(seeds: list[int]) -> tuple[dict[str, bytes], dict[str, object]]:
    """PNG uploads of transport-exact images, and the images, both keyed by the upload's sha256."""
    uploads, images = {}, {}
    for seed in seeds:
        image = fixed_point_image(96, 64, seed)
        data = png(image)
        sha = hashlib.sha256(data).hexdigest()
        uploads[sha], images[sha] = data, image
    return uploads, images


async def test_lora_swap_and_rollback_under_traffic(
    vllm_server: VLLMServer, tiny_models: TinyModels, local_reference: LocalReference, tmp_path: Path
) -> None:
    settings = api_settings(tmp_path, vllm_server.url, tiny_models.base)
    async with running_api(settings) as (client, service):
        base = service.engine.active
        lora_a = register_version(service, "tiny-lora-a", "lora", tiny_models.lora_a, tiny_models.base)
        lora_b = register_version(service, "tiny-lora-b", "lora", tiny_models.lora_b, tiny_models.base)
        steps = [(base, lora_a, [11, 12, 13]), (lora_a, lora_b, [14, 15, 16]), (lora_b, base, [17, 18, 19])]
        for old, new, seeds in steps:  # base -> LoRA A -> LoRA B -> rollback to the base
            uploads, images = upload_set(seeds)
            expected = await expected_completions(local_reference, [old, new], images)
            old_adapter = (await service.engine.health())["adapter"]
            answers, started, done = await swap_under_traffic(client, new, uploads)
            check_answers(service, answers, expected, old, new, (started, done))
            adapters = await served_adapters(vllm_server)
            assert (await service.engine.health())["adapter"] in adapters
            assert old_adapter not in adapters  # unloaded once its requests were done


async def test_full_weight_swap_and_rollback_under_traffic(
    vllm_server: VLLMServer, tiny_models: TinyModels, local_reference: LocalReference, tmp_path: Path
) -> None:
    settings = api_settings(tmp_path, vllm_server.url, tiny_models.base)
    async with running_api(settings) as (client, service):
        base = service.engine.active
        full = register_version(service, "tiny-full", "full", tiny_models.full, None)
        for old, new, seeds in [(base, full, [21, 22, 23]), (full, base, [24, 25, 26])]:
            uploads, images = upload_set(seeds)
            expected = await expected_completions(local_reference, [old, new], images)
            answers, started, done = await swap_under_traffic(client, new, uploads)
            check_answers(service, answers, expected, old, new, (started, done))
            async with httpx.AsyncClient() as direct:
                version = (await direct.get(f"{vllm_server.url}/weight_info")).json()["weight_version"]
            assert version == new.path  # any other process can tell which weights the server holds


async def test_a_full_reload_by_another_process_is_never_mislabelled(
    vllm_server: VLLMServer, tiny_models: TinyModels, local_reference: LocalReference, tmp_path: Path
) -> None:
    """Two processes share the server; one reloads full weights while the other serves.

    The other process must never label an answer of the new weights with the old version: it gets
    503 from the moment the weights may have changed until its own follower activates the new version.
    """
    base = ModelSpec(1, "tiny-base", "base", str(tiny_models.base), untrained=True)
    full = ModelSpec(2, "tiny-full", "full", str(tiny_models.full), untrained=True)
    images = [fixed_point_image(96, 64, seed) for seed in (31, 32)]
    expected = {}
    for i, image in enumerate(images):
        for spec in (base, full):
            expected[(spec.version_id, i)] = await local_reference.complete(spec, (image,), SCORE_TEXT)
    owner = VLLMEngine(base, base_url=vllm_server.url, adapter_dir=tmp_path / "a")
    other = VLLMEngine(base, base_url=vllm_server.url, adapter_dir=tmp_path / "b")
    await owner.start()
    await other.start()
    outcomes: list[tuple[int, int | None, str]] = []  # (image, version id or None for 503, text)
    stop = asyncio.Event()

    async def serve(first: int) -> None:
        i = first
        while not stop.is_set():
            request = GenerationRequest((images[i % 2],), SCORE_TEXT, 1, Sampling(temperature=0.0))
            try:
                result = await other.generate(request)
                outcomes.append((i % 2, result.model.version_id, result.texts[0]))
            except EngineUnavailable:
                outcomes.append((i % 2, None, ""))
                await asyncio.sleep(0.1)
            i += 1

    try:
        workers = [asyncio.create_task(serve(w)) for w in range(WORKERS)]
        await asyncio.sleep(TRAFFIC_S)
        await owner.activate(full)  # the owner's round promoted a full-weight version
        await asyncio.sleep(TRAFFIC_S)
        await other.activate(full)  # the other process's follower catches up
        followed = len(outcomes)
        await asyncio.sleep(TRAFFIC_S)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        await other.close()
        await owner.close()
    answered = [(i, v, t) for i, v, t in outcomes if v is not None]
    assert all(same_completion(expected[(v, i)], t) for i, v, t in answered), answered
    assert {v for _, v, _ in answered} == {1, 2}
    assert all(v == 2 for _, v, _ in outcomes[followed + WORKERS :])
