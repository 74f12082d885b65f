"""The embedded default evolves too: rounds run inside the API process (no broker), over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from iqa.models import EvolutionRound, PseudoLabel
from tests.api.conftest import LiveServer, jpeg

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_ROUND = {
    "round_pairs": 6,
    "round_votes": 2,
    "round_generations": 2,
    "round_steps": 1,
    "round_holdout_fraction": 0.34,
    "max_new_tokens": 16,
}
PASSING_GATE = {"gate_min_agreement_gain": -1.0, "gate_min_spread": 0.0, "gate_max_parse_failure": 1.0}


def wait_for_round(server: LiveServer, round_id: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = server.http.get(f"/admin/evolutions/{round_id}", headers=AUTH).json()
        if body["state"] in ("succeeded", "rejected", "failed", "cancelled"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"round {round_id} did not finish in {timeout} s: {body}")


def wait_for_model(server: LiveServer, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.http.get("/v1/models").json()["active"]["name"] != name:
        assert time.monotonic() < deadline, f"{name} did not become active"
        time.sleep(0.2)


@pytest.fixture
def server(start_server, tmp_path: Path) -> LiveServer:
    url = f"sqlite:///{tmp_path / 'evoq.db'}"
    return start_server(
        url, data_dir=tmp_path, admin_token=TOKEN, active_version_poll_s=0.2, **TINY_ROUND, **PASSING_GATE
    )


def test_admin_api_needs_the_token_and_is_off_without_one(
    server: LiveServer, start_server, tmp_path: Path
) -> None:
    assert server.http.get("/admin/evolutions").status_code == 401
    wrong = server.http.get("/admin/evolutions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    assert server.http.get("/admin/models", headers=AUTH).status_code == 200
    off = start_server(f"sqlite:///{tmp_path / 'off.db'}", data_dir=tmp_path / "off")
    response = off.http.get("/admin/evolutions", headers=AUTH)
    assert response.status_code == 404 and "EVOQ_ADMIN_TOKEN" in response.json()["error"]["message"]
    bad = server.http.post("/admin/evolutions", headers=AUTH, json={"pairs": 1})
    assert bad.status_code == 422 and "pairs" in bad.json()["error"]["message"]
    unknown = server.http.post("/admin/evolutions", headers=AUTH, json={"bogus": 1})
    assert unknown.status_code == 422


def test_a_round_evolves_swaps_in_place_and_rolls_back(server: LiveServer) -> None:
    images = [jpeg(seed=500 + i) for i in range(6)]
    for image in images[:5]:
        assert server.score(image).status_code == 200
    base = server.http.get("/v1/models").json()["active"]

    started = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 3})
    assert started.status_code == 202, started.text
    round_id = started.json()["id"]
    assert started.json()["state"] == "queued" and started.json()["parent_version_id"] == base["id"]
    again = server.http.post("/admin/evolutions", headers=AUTH)
    assert again.status_code == 409 and f"round {round_id}" in again.json()["error"]["message"]

    done = wait_for_round(server, round_id)
    assert done["state"] == "succeeded", done
    assert done["gate"]["passed"] is True and done["result_version_id"] is not None
    assert set(done["timings"]) >= {"voting_s", "training_s", "round_s"}
    with server.session() as session:
        labels = session.scalar(
            select(func.count()).select_from(PseudoLabel).where(PseudoLabel.round_id == round_id)
        )
        assert labels == 6
        assert session.get(EvolutionRound, round_id).lock is None

    models = server.http.get("/admin/models", headers=AUTH).json()
    new = next(m for m in models if m["id"] == done["result_version_id"])
    assert new["status"] == "active" and new["parent_id"] == base["id"] and new["kind"] == "lora"
    wait_for_model(server, new["name"])
    answer = server.score(images[5]).json()["results"][0]
    assert answer["model_version"]["id"] == new["id"] and not answer["cached"]

    rolled = server.http.post(f"/admin/models/{base['id']}/activate", headers=AUTH)
    assert rolled.status_code == 200 and rolled.json()["status"] == "active"
    assert server.http.get("/v1/models").json()["active"]["id"] == base["id"]
    again = server.score(jpeg(seed=599)).json()["results"][0]
    assert again["model_version"]["id"] == base["id"]


def test_cancel_a_running_round_keeps_the_active_model(server: LiveServer) -> None:
    for i in range(5):
        server.score(jpeg(seed=700 + i))
    active = server.http.get("/v1/models").json()["active"]
    round_id = server.http.post("/admin/evolutions", headers=AUTH, json={"steps": 50}).json()["id"]
    deadline = time.monotonic() + 120
    while server.http.get(f"/admin/evolutions/{round_id}", headers=AUTH).json()["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = server.http.post(f"/admin/evolutions/{round_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"] is True
    done = wait_for_round(server, round_id)
    assert done["state"] == "cancelled", done
    assert server.http.get("/v1/models").json()["active"]["id"] == active["id"]
    assert server.http.post("/admin/evolutions/999/cancel", headers=AUTH).status_code == 404


def test_a_checkpoint_that_does_not_load_is_refused_and_the_old_model_serves(
    server: LiveServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    from iqa import registry

    with server.session() as session:
        version = registry.register_version(session, "broken", "lora", str(broken), None, None, False)
        session.commit()
        broken_id = version.id
    active = server.http.get("/v1/models").json()["active"]
    response = server.http.post(f"/admin/models/{broken_id}/activate", headers=AUTH)
    assert response.status_code == 409 and "cannot be loaded" in response.json()["error"]["message"]
    assert server.http.get("/v1/models").json()["active"]["id"] == active["id"]
    assert server.score(jpeg(seed=901)).status_code == 200
    assert server.http.post("/admin/models/12345/activate", headers=AUTH).status_code == 404
