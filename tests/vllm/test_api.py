"""Score and compare through the HTTP API with the vLLM engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from iqa.models import Comparison, Prediction
from iqa.prompts import prompt_set
from tests.imagegen import encode, photo
from tests.vllm.conftest import TinyModels
from tests.vllm.server import VLLMServer
from tests.vllm.support import (
    LocalReference,
    api_settings,
    fixed_point_image,
    png,
    running_api,
    same_completion,
)

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

EVOQ = prompt_set("evoquality")


async def test_score_and_compare_are_logged_and_match_the_local_engine(
    vllm_server: VLLMServer, tiny_models: TinyModels, local_reference: LocalReference, tmp_path: Path
) -> None:
    settings = api_settings(tmp_path, vllm_server.url, tiny_models.base)
    image_a, image_b = fixed_point_image(224, 224, 0), fixed_point_image(96, 64, 1)
    async with running_api(settings) as (client, service):
        base = service.engine.active
        assert (await client.get("/v1/models")).json()["engine"] == "vllm"
        assert (await client.get("/readyz")).json()["engine"]["engine"] == "vllm"

        response = await client.post(
            "/v1/score", files=[("images", ("a.png", png(image_a), "image/png"))], data={"samples": "3"}
        )
        assert response.status_code == 200, response.text
        item = response.json()["results"][0]
        assert item["model_version"] == {"id": base.version_id, "name": "tiny-base", "untrained": True}
        assert item["samples"] == 3 and item["cached"] is False

        response = await client.post(
            "/v1/compare",
            files={"image_a": ("a.png", png(image_a), "image/png"), "image_b": ("b.png", png(image_b))},
            data={"votes": "4"},
        )
        assert response.status_code == 200, response.text
        pair = response.json()
        assert pair["votes"] == 4 and pair["model_version"]["id"] == base.version_id

        with service.sessions() as session:
            prediction = session.get_one(Prediction, item["prediction_id"])
            comparison = session.get_one(Comparison, pair["comparison_id"])
            logged = (prediction.model_version_id, prediction.completions, comparison.model_version_id)
            votes_logged = list(comparison.completions)
        assert logged[0] == logged[2] == base.version_id
        expected = await local_reference.complete(base, (image_a,), EVOQ.score_text)
        assert len(logged[1]) == 3 and all(same_completion(expected, c) for c in logged[1])
        ab = await local_reference.complete(base, (image_a, image_b), EVOQ.compare_text)
        ba = await local_reference.complete(base, (image_b, image_a), EVOQ.compare_text)
        assert [same_completion(e, c) for e, c in zip([ab, ab, ba, ba], votes_logged, strict=True)] == [
            True
        ] * 4

        again = await client.post(
            "/v1/score", files=[("images", ("a.png", png(image_a)))], data={"samples": "3"}
        )
        assert again.json()["results"][0]["cached"] is True


async def test_the_demo_model_gets_parsable_answers_from_vllm(
    vllm_server: VLLMServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """The service's defaults for the untrained demo model: sampled, constrained answers."""
    settings = api_settings(
        tmp_path, vllm_server.url, tiny_models.base, temperature=1.0, constrain_answers=None
    )
    async with running_api(settings) as (client, _):
        jpeg = encode(photo(320, 240, 7), "JPEG")
        response = await client.post("/v1/score", files=[("images", ("p.jpg", jpeg, "image/jpeg"))])
        item = response.json()["results"][0]
        assert response.status_code == 200 and item["valid_samples"] == item["samples"] == 8
        assert 1.0 <= item["score"] <= 5.0
        files = {"image_a": ("a.jpg", jpeg), "image_b": ("b.png", png(photo(96, 64, 8)))}
        pair = (await client.post("/v1/compare", files=files)).json()
        assert pair["invalid_votes"] == 0 and pair["votes_a"] + pair["votes_b"] == 8
