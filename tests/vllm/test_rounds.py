"""Rounds on the production engine: with `EVOQ_ENGINE=vllm`, every vote and held-out score of a round is
served by a real vLLM server (counted from vLLM's own /metrics), the worker process never loads a
transformers model (only its training child does), and the LoRA candidate is evaluated on vLLM under a
provisional adapter name, then promoted or unloaded.

The Celery loop is real too: PostgreSQL, Redis, a `celery worker` process, the API over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from iqa.models import ModelVersion
from tests.api.conftest import demo_model_dir, jpeg, start_server  # noqa: F401
from tests.vllm.conftest import TinyModels
from tests.vllm.server import MAX_LORA_RANK, VLLMServer
from tests.vllm.support import api_settings, png, running_api
from tests.worker.test_celery_loop import Worker, broker_url, database_url  # noqa: F401
from tests.worker.test_inprocess_rounds import AUTH, PASSING_GATE, TINY_ROUND, TOKEN, wait_for_round

pytestmark = [pytest.mark.vllm, pytest.mark.postgres, pytest.mark.slow]

# Loaded by every Python process the worker starts (sitecustomize): it appends "pid class path" to
# $EVOQ_TEST_MODEL_LOADS for every transformers model loaded with from_pretrained.
MODEL_LOAD_RECORDER = """
import importlib.abc
import os
import sys

LOG = os.environ.get("EVOQ_TEST_MODEL_LOADS")


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        original = module.PreTrainedModel.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            with open(LOG, "a") as log:
                log.write(f"{os.getpid()} {cls.__name__} {args[0] if args else ''}\\n")
            return original(cls, *args, **kwargs)

        module.PreTrainedModel.from_pretrained = classmethod(from_pretrained)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.modeling_utils":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if LOG:
    sys.meta_path.insert(0, _Finder())
"""


def finished_requests(server: VLLMServer) -> float:
    """vLLM's own count of finished requests (`vllm:request_success_total`, all labels)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def loaded_adapters(server: VLLMServer) -> list[str]:
    """Names of the LoRA adapters the server holds now."""
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in models if m.get("parent")]


def count_per_completion(server: VLLMServer, adapter: str) -> float:
    """How much `finished_requests` grows for one completion (vLLM counts each of n samples, or not)."""
    before = finished_requests(server)
    body = {"model": adapter, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 3}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    time.sleep(0.5)
    grown = finished_requests(server) - before
    assert grown in (1, 3), grown
    return grown / 3  # per completion: 1 (counted per sample) or 1/3 (per request)


def test_a_celery_round_votes_and_evaluates_on_vllm_and_the_worker_loads_no_model(
    vllm_server: VLLMServer,
    tiny_models: TinyModels,
    start_server,  # noqa: F811
    broker_url: str,  # noqa: F811
    database_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    shared = {
        "database_url": database_url,
        "broker_url": broker_url,
        "data_dir": tmp_path,
        "image_store": tmp_path / "images",
        "checkpoints_dir": tmp_path / "checkpoints",
        "model": str(tiny_models.base),
        "model_name": "tiny-base",
        "device": "cpu",
        "engine": "vllm",
        "vllm_url": vllm_server.url,
        "round_lora_rank": MAX_LORA_RANK,
        "round_stale_after_s": 120,
        "round_min_new_images": 1000,
        **TINY_ROUND,
        **PASSING_GATE,
    }
    server = start_server(
        database_url,
        data_dir=tmp_path,
        rounds_backend="celery",
        admin_token=TOKEN,
        active_version_poll_s=0.2,
        **{k: v for k, v in shared.items() if k not in ("database_url", "data_dir")},
    )
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(MODEL_LOAD_RECORDER)
    loads = tmp_path / "model-loads.txt"
    loads.touch()
    env = {"PYTHONPATH": str(hook), "EVOQ_TEST_MODEL_LOADS": str(loads)}
    workers: list[Worker] = []

    def start_worker(**overrides: object) -> Worker:
        worker = Worker({**shared, **overrides}, tmp_path / f"worker{len(workers)}.log", False, env)
        workers.append(worker)
        worker.wait_ready()
        return worker

    try:
        worker = start_worker()
        for i in range(5):
            assert server.score(jpeg(seed=2100 + i)).status_code == 200
        base = server.http.get("/v1/models").json()["active"]
        serving = loaded_adapters(vllm_server)
        assert len(serving) == 1  # the API's route to the base (a zero adapter)
        per_completion = count_per_completion(vllm_server, serving[0])

        before = finished_requests(vllm_server)
        started = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 1})
        assert started.status_code == 202, started.text
        done = wait_for_round(server, started.json()["id"])
        assert done["state"] == "succeeded", done.get("error")
        served = finished_requests(vllm_server) - before

        # Every vote and held-out score of the round was a vLLM completion.
        with server.session() as session:
            manifest = session.get_one(ModelVersion, done["result_version_id"]).manifest
        votes = manifest["pseudo_labels"]["votes"]
        scores = manifest["metrics"]["before"]["samples"] + manifest["metrics"]["after"]["samples"]
        assert votes == TINY_ROUND["round_pairs"] * TINY_ROUND["round_votes"] and scores > 0
        # Requests: 2 per voted pair (one per image order), 1 per scored image, 5 one-token reads per
        # scored image (the first digit, then the tenths after 1. to 4.), 1 check per adapter the worker
        # loaded (parent, candidate) and 1 for the API loading the promoted version.
        images = manifest["metrics"]["before"]["images"] + manifest["metrics"]["after"]["images"]
        per_request = 1 / 3 if per_completion == 1 / 3 else None
        if per_request is None:  # vLLM counts completions: votes + score samples + reads + the checks
            expected = votes + scores + 5 * images
        else:  # vLLM counts requests
            expected = 2 * manifest["pseudo_labels"]["pairs"] + images + 5 * images
        assert manifest["metrics"]["after"]["holdout_read_pairs"], "the candidate was not read"
        print(
            f"\nround: {served:g} finished on vLLM, expected {expected:g} + 2-3 checks "
            f"(per completion: {per_completion:g}); model loads: {loads.read_text()!r}"
        )
        assert expected + 2 <= served <= expected + 3, (served, expected)

        # The worker process never loaded a model; its training child did (so the recorder works).
        records = [line.split() for line in loads.read_text().splitlines()]
        assert records, "the training child's model load was not recorded"
        assert not [r for r in records if int(r[0]) == worker.process.pid], records
        assert {r[1] for r in records} <= {"Qwen2_5_VLForConditionalGeneration"}

        # Promoted: the API serves the new version; the worker's evaluation adapters are unloaded.
        new_id = done["result_version_id"]
        deadline = time.monotonic() + 30
        while server.http.get("/v1/models").json()["active"]["id"] != new_id:
            assert time.monotonic() < deadline, "the API did not follow the promoted version"
            time.sleep(0.2)
        assert server.score(jpeg(seed=2190)).json()["results"][0]["model_version"]["id"] == new_id
        assert len(loaded_adapters(vllm_server)) == 1, loaded_adapters(vllm_server)

        # Rolled back.
        assert server.http.post(f"/admin/models/{base['id']}/activate", headers=AUTH).status_code == 200
        assert server.score(jpeg(seed=2191)).json()["results"][0]["model_version"]["id"] == base["id"]

        # A rejected candidate (a gate no model can pass) leaves no adapter behind on vLLM.
        worker.stop()
        start_worker(gate_min_spread=100.0)
        rejected = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 2})
        done = wait_for_round(server, rejected.json()["id"])
        assert done["state"] == "rejected" and "collapsed" in done["error"], done
        time.sleep(1.0)
        adapters = loaded_adapters(vllm_server)
        assert len(adapters) == 1 and not any("candidate" in a for a in adapters), adapters
        assert server.http.get("/v1/models").json()["active"]["id"] == base["id"]
        assert not [
            r
            for r in (line.split() for line in loads.read_text().splitlines())
            if int(r[0]) in {w.process.pid for w in workers}
        ]
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_in_process_the_candidate_is_staged_on_the_serving_engine_and_promoted_without_a_second_load(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    settings = api_settings(
        tmp_path,
        vllm_server.url,
        tiny_models.base,
        temperature=1.0,
        constrain_answers=None,
        round_lora_rank=MAX_LORA_RANK,
        **TINY_ROUND,
        **PASSING_GATE,
    )
    async with running_api(settings) as (client, service):
        for i in range(5):
            files = [("images", ("p.png", png_photo(i), "image/png"))]
            assert (await client.post("/v1/score", files=files)).status_code == 200
        started = await client.post("/admin/evolutions", headers=AUTH_VLLM, json={"seed": 3})
        assert started.status_code == 202, started.text
        done = await wait_in_process(client, started.json()["id"])
        assert done["state"] == "succeeded", done
        # The adapter the candidate was evaluated under is the one the engine now serves.
        route = service.engine._route
        assert route.spec.version_id == done["result_version_id"]
        assert route.adapter.startswith("evoq-candidate-"), route.adapter
        assert loaded_adapters(vllm_server) == [route.adapter]
        answer = (
            await client.post("/v1/score", files=[("images", ("q.png", png_photo(9), "image/png"))])
        ).json()
        assert answer["results"][0]["model_version"]["id"] == done["result_version_id"]


AUTH_VLLM = {"Authorization": "Bearer vllm-tests"}


def png_photo(seed: int) -> bytes:
    from tests.imagegen import photo

    return png(photo(64, 48, seed=2300 + seed))


async def wait_in_process(client: httpx.AsyncClient, round_id: int) -> dict:
    async with asyncio.timeout(600):
        while True:
            body = (await client.get(f"/admin/evolutions/{round_id}", headers=AUTH_VLLM)).json()
            if body["state"] in ("succeeded", "rejected", "failed", "cancelled"):
                return body
            await asyncio.sleep(0.5)
