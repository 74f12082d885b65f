"""vLLM killed mid-test: clear 503s, nothing accepted is lost, and service resumes when vLLM is back."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from tests.imagegen import encode, photo
from tests.vllm.conftest import TinyModels
from tests.vllm.server import VLLMServer
from tests.vllm.support import api_settings, running_api

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]


async def test_vllm_down_gives_503_keeps_the_images_and_recovers(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    try:
        # Sampled (n=64) so that a request is still running when the server dies.
        settings = api_settings(tmp_path, vllm_server.url, tiny_models.base, temperature=1.0)
        async with running_api(settings) as (client, service):
            first = encode(photo(96, 64, 41), "PNG")
            response = await client.post("/v1/score", files=[("images", ("a.png", first))])
            assert response.status_code == 200, response.text

            slow = encode(photo(128, 96, 42), "PNG")
            in_flight = asyncio.create_task(
                client.post("/v1/score", files=[("images", ("b.png", slow))], data={"samples": "64"})
            )
            # Kill as soon as the request is at vLLM (a fixed wait raced with its answer on a fast machine).
            for _ in range(2000):
                if service.engine.queue_depth()["in_flight"] or in_flight.done():
                    break
                await asyncio.sleep(0.005)
            assert not in_flight.done(), "the request finished before vLLM was killed; make it longer"
            await asyncio.to_thread(vllm_server.kill)

            answers = [await in_flight]
            other = encode(photo(96, 64, 43), "PNG")
            answers.append(await client.post("/v1/score", files=[("images", ("c.png", other))]))
            files = {"image_a": ("a.png", first), "image_b": ("c.png", other)}
            answers.append(await client.post("/v1/compare", files=files))
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert int(answer.headers["Retry-After"]) > 0
                error = answer.json()["error"]
                assert error["type"] == "engine_unavailable" and "vLLM" in error["message"], error
            assert (await client.get("/readyz")).status_code == 503

            for data in (slow, other):  # accepted before the engine failed: stored and logged
                image = await client.get(f"/v1/images/{hashlib.sha256(data).hexdigest()}")
                assert image.status_code == 200 and image.json()["predictions"] == []
                assert service.store.path_for(hashlib.sha256(data).hexdigest()).is_file()

            restarted = await asyncio.to_thread(vllm_server.start)
            started = time.perf_counter()
            response = await client.post("/v1/score", files=[("images", ("c.png", other))])
            assert response.status_code == 200, response.text  # the engine re-installed its adapter
            item = response.json()["results"][0]
            assert item["model_version"]["id"] == service.engine.active.version_id
            assert item["valid_samples"] >= 0 and item["cached"] is False
            assert (await client.get("/readyz")).status_code == 200
            print(
                f"\nvLLM back after {restarted:.1f} s; "
                f"first answer {time.perf_counter() - started:.2f} s later"
            )
    finally:  # a failure mid-outage must not leave the session's server dead for the tests after it
        if vllm_server.process is None or vllm_server.process.poll() is not None:
            await asyncio.to_thread(vllm_server.start)
