"""GET /v1/images/{sha256}, GET /v1/models, /healthz, /readyz and the OpenAPI document, over HTTP."""

from __future__ import annotations

from datetime import datetime

import pytest

from iqa.service import DEMO_NAME
from tests.api.conftest import LiveServer, error_of, png, sha256, unique_seed


def test_image_metadata_and_its_predictions(server: LiveServer) -> None:
    data = png(unique_seed(), w=40, h=30)
    sha = sha256(data)
    first = server.score(data, samples=2).json()["results"][0]
    second = server.score(data, samples=3).json()["results"][0]

    response = server.http.get(f"/v1/images/{sha}")

    assert response.status_code == 200, response.text
    body = response.json()
    row = server.image_row(sha)
    assert body["sha256"] == sha
    assert (body["width"], body["height"], body["format"], body["byte_size"]) == (40, 30, "PNG", len(data))
    assert body["times_seen"] == row.times_seen == 2
    assert body["source"] == "score"
    first_seen = datetime.fromisoformat(body["first_seen_at"])
    last_seen = datetime.fromisoformat(body["last_seen_at"])
    assert first_seen.utcoffset() is not None  # aware UTC, on both backends
    assert first_seen == row.first_seen_at and last_seen == row.last_seen_at
    assert first_seen <= last_seen
    # Most recent first, each as logged.
    assert [p["id"] for p in body["predictions"]] == [second["prediction_id"], first["prediction_id"]]
    by_id = {p.id: p for p in server.predictions(sha)}
    for prediction in body["predictions"]:
        logged = by_id[prediction["id"]]
        assert prediction["score"] == pytest.approx(logged.score)
        assert prediction["std"] == pytest.approx(logged.score_std, abs=1e-12)
        assert (prediction["samples"], prediction["valid_samples"]) == (logged.samples, logged.valid_samples)
        assert prediction["model_version_id"] == logged.model_version_id
        assert datetime.fromisoformat(prediction["created_at"]) == logged.created_at
    assert body["predictions"][0]["score"] == pytest.approx(second["score"])


def test_unknown_image_is_a_404_json_error(server: LiveServer) -> None:
    sha = sha256(b"bytes nobody ever uploaded")

    response = server.http.get(f"/v1/images/{sha}")

    assert response.status_code == 404
    error = error_of(response)
    assert error["type"] == "not_found"
    assert sha in error["message"]
    assert server.image_row(sha) is None


@pytest.mark.parametrize(
    "bad",
    ["abc", "0" * 63, "0" * 65, "g" * 64, "ABCDEF" + "0" * 58, "0" * 60 + "%20ab"],
    ids=["short", "63-hex", "65-hex", "not-hex", "upper-case", "space"],
)
def test_malformed_sha256_is_a_422(server: LiveServer, bad: str) -> None:
    response = server.http.get(f"/v1/images/{bad}")

    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request"
    assert "sha256" in error["message"]


def test_models_names_the_active_version(server: LiveServer) -> None:
    response = server.http.get("/v1/models")

    assert response.status_code == 200, response.text
    active = server.active_version()
    assert response.json() == {
        "active": {"id": active.id, "name": DEMO_NAME, "untrained": True},
        "kind": "base",
        "engine": "local",
        "prompt_profile": "evoquality",
    }
    assert active.kind == "base" and active.path == server.settings.model


def test_healthz(server: LiveServer) -> None:
    response = server.http.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_and_engine(server: LiveServer) -> None:
    response = server.http.get("/readyz")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["database"] == "ok"
    assert body["engine"]["engine"] == "local"
    assert body["engine"]["model"] == DEMO_NAME
    assert body["engine"]["queued"] == 0


# ---- the OpenAPI document ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(server: LiveServer) -> dict:
    response = server.http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _schema(openapi: dict, ref_or_schema: dict) -> dict:
    ref = ref_or_schema.get("$ref")
    return openapi["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else ref_or_schema


def _form_fields(openapi: dict, path: str) -> dict:
    content = openapi["paths"][path]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data"}
    return _schema(openapi, content["multipart/form-data"]["schema"])["properties"]


def _response_schema(openapi: dict, path: str) -> dict:
    ok = openapi["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    return _schema(openapi, ok)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/score", "images"),
        ("/v1/score", "samples"),
        ("/v1/score", "return_reasoning"),
        ("/v1/compare", "image_a"),
        ("/v1/compare", "image_b"),
        ("/v1/compare", "votes"),
        ("/v1/compare", "return_reasoning"),
    ],
)
def test_openapi_describes_every_request_field(openapi: dict, path: str, field: str) -> None:
    fields = _form_fields(openapi, path)
    assert field in fields
    assert fields[field].get("description", "").strip(), f"{path} {field} has no description"


def test_openapi_score_images_field_is_a_list_of_files(openapi: dict) -> None:
    images = _form_fields(openapi, "/v1/score")["images"]
    assert images["type"] == "array"
    assert images["items"].get("format") == "binary" or images["items"].get("contentMediaType")


RESPONSE_FIELDS = {
    "/v1/score": {
        "sha256", "score", "std", "valid_samples", "samples", "cached", "prediction_id",
        "model_version", "reasoning", "mode", "distribution",
    },
    "/v1/compare": {
        "sha256_a", "sha256_b", "prob_a_better", "winner", "votes_a", "votes_b", "invalid_votes",
        "votes", "comparison_id", "model_version", "reasoning", "mode",
    },
}  # fmt: skip


@pytest.mark.parametrize("path", list(RESPONSE_FIELDS))
def test_openapi_describes_every_response_field(openapi: dict, path: str) -> None:
    response = _response_schema(openapi, path)
    schemas = [response, openapi["components"]["schemas"]["ModelVersionOut"]]
    if path == "/v1/score":
        schemas.append(_schema(openapi, response["properties"]["results"]["items"]))
    item = schemas[-1] if path == "/v1/score" else response
    assert set(item["properties"]) == RESPONSE_FIELDS[path]

    missing = [
        f"{schema['title']}.{name}"
        for schema in schemas
        for name, prop in schema["properties"].items()
        if not prop.get("description", "").strip()
    ]
    assert not missing, f"response fields without a description: {missing}"
