"""Who may call /v1/* (client API keys) and how much at once (load shedding), over HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from iqa.models import ApiKey, Comparison, Image, Prediction
from tests.api.conftest import LiveServer, jpeg, sha256, unique_seed

TOKEN = "keys-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def score(
    server: LiveServer, headers: dict[str, str] | None = None, data: bytes | None = None
) -> httpx.Response:
    files = [("images", ("p.jpg", data or jpeg(unique_seed()), "image/jpeg"))]
    return server.http.post("/v1/score", files=files, data={"samples": "1"}, headers=headers or {})


def test_keys_gate_v1_once_one_exists_are_recorded_revocable_and_survive_a_restart(
    start_server, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'evoq.db'}"
    server = start_server(url, data_dir=tmp_path, admin_token=TOKEN)
    assert score(server).status_code == 200  # open until the first key exists (the embedded default)

    created = server.http.post("/admin/keys", headers=ADMIN, json={"name": "alice"})
    assert created.status_code == 201, created.text
    alice = created.json()
    assert alice["key"].startswith("evoq_") and alice["name"] == "alice"
    with server.session() as session:
        stored = session.get_one(ApiKey, alice["id"])
        assert stored.key_hash != alice["key"] and alice["key"] not in stored.key_hash  # only the hash
    listed = server.http.get("/admin/keys", headers=ADMIN).json()
    assert [k["id"] for k in listed] == [alice["id"]] and "key" not in listed[0]

    for headers in ({}, {"Authorization": "Bearer evoq_wrong"}, {"X-API-Key": "evoq_wrong"}):
        denied = score(server, headers)
        assert denied.status_code == 401, headers
        assert denied.json()["error"]["type"] == "unauthorized"
    assert server.http.get("/v1/models").status_code == 401
    assert server.http.get("/healthz").status_code == 200  # probes stay open

    by_bearer = score(server, {"Authorization": f"Bearer {alice['key']}"})
    assert by_bearer.status_code == 200
    by_header = server.http.post(
        "/v1/compare",
        files={"image_a": ("a.jpg", jpeg(unique_seed())), "image_b": ("b.jpg", jpeg(unique_seed()))},
        data={"votes": "2"},
        headers={"X-API-Key": alice["key"]},
    )
    assert by_header.status_code == 200
    with server.session() as session:
        prediction = session.get_one(Prediction, by_bearer.json()["results"][0]["prediction_id"])
        comparison = session.get_one(Comparison, by_header.json()["comparison_id"])
        assert prediction.api_key_id == comparison.api_key_id == alice["id"]

    bob = server.http.post("/admin/keys", headers=ADMIN, json={"name": "bob"}).json()
    assert server.http.delete(f"/admin/keys/{alice['id']}", headers=ADMIN).json()["revoked_at"]
    assert score(server, {"X-API-Key": alice["key"]}).status_code == 401  # revoked
    assert server.http.delete("/admin/keys/999", headers=ADMIN).status_code == 404
    server.stop()

    restarted = start_server(url, data_dir=tmp_path, admin_token=TOKEN)
    assert score(restarted, {"X-API-Key": bob["key"]}).status_code == 200
    assert score(restarted).status_code == 401
    assert score(restarted, {"X-API-Key": alice["key"]}).status_code == 401


def test_keys_can_be_required_before_any_exists(start_server, tmp_path: Path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, require_api_keys=True)
    assert score(server).status_code == 401


def test_beyond_the_queue_bound_requests_get_503_at_once_and_nothing_accepted_is_lost(
    start_server, tmp_path: Path
) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, max_queued_requests=2, batch_window_ms=50
    )
    images = [jpeg(unique_seed()) for _ in range(12)]

    async def burst() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(data: bytes) -> tuple[httpx.Response, float]:
                started = time.perf_counter()
                files = [("images", ("p.jpg", data, "image/jpeg"))]
                response = await client.post("/v1/score", files=files, data={"samples": "4"})
                return response, time.perf_counter() - started

            return await asyncio.gather(*(one(data) for data in images))

    answers = asyncio.run(burst())
    accepted = [(r, s) for r, s in answers if r.status_code == 200]
    shed = [(r, s) for r, s in answers if r.status_code == 503]
    assert len(accepted) + len(shed) == len(images), [r.status_code for r, _ in answers]
    assert accepted and shed
    for response, seconds in shed:
        assert response.headers["Retry-After"] == "1" and "capacity" in response.json()["error"]["message"]
        assert seconds < max(s for _, s in accepted)  # refused at once, not after a wait
    with server.session() as session:
        stored = {row.sha256 for row in session.query(Image).all()}
    # Every accepted request was stored and logged; no refused one left a trace.
    assert stored == {sha256(images[k]) for k, (r, _) in enumerate(answers) if r.status_code == 200}
    assert server.count(Prediction) == len(accepted)
    metrics = server.http.get("/metrics").text
    assert "evoq_requests_shed_total" in metrics and "evoq_requests_at_engine" in metrics


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVOQ_REQUIRE_API_KEYS", raising=False)
