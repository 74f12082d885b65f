"""Per-client rate limits over HTTP: 429 with Retry-After past the limit, other clients unaffected, and
one limit shared by two API replicas through a real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, fresh_database
from tests.worker.test_celery_loop import broker_url  # noqa: F401

TOKEN = "limits-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def test_a_client_over_its_rate_gets_429_and_another_client_is_unaffected(
    start_server, tmp_path: Path
) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, admin_token=TOKEN, rate_limit="3/minute"
    )
    answers = [server.http.get("/v1/models") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
    assert all(a.headers["X-RateLimit-Limit"] == "3" for a in answers)
    over = server.http.get("/v1/models")
    assert over.status_code == 429 and over.json()["error"]["type"] == "too_many_requests"
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert server.http.get("/healthz").status_code == 200  # probes are not limited

    alice = server.http.post("/admin/keys", headers=ADMIN, json={"name": "alice"}).json()["key"]
    bob = server.http.post("/admin/keys", headers=ADMIN, json={"name": "bob"}).json()["key"]
    for _ in range(3):
        assert server.http.get("/v1/models", headers={"X-API-Key": alice}).status_code == 200
    assert server.http.get("/v1/models", headers={"X-API-Key": alice}).status_code == 429
    assert server.http.get("/v1/models", headers={"X-API-Key": bob}).status_code == 200  # its own limit
    assert server.http.get("/v1/models", headers={"X-API-Key": "evoq_wrong"}).status_code == 401  # key first


@pytest.mark.postgres
def test_two_replicas_share_one_limit_through_redis(start_server, tmp_path: Path, broker_url: str) -> None:  # noqa: F811
    with fresh_database("postgres", tmp_path) as url:
        shared = {"rate_limit": "4/minute", "rate_limit_storage": broker_url}
        replicas: list[LiveServer] = [
            start_server(url, data_dir=tmp_path, **shared),
            start_server(url, data_dir=tmp_path, **shared),
        ]
        try:
            statuses = [replicas[k % 2].http.get("/v1/models").status_code for k in range(4)]
            assert statuses == [200, 200, 200, 200]
            assert [r.http.get("/v1/models").status_code for r in replicas] == [429, 429]
        finally:
            for replica in replicas:
                replica.stop()


def test_a_rate_limit_store_that_is_down_gives_503_not_an_open_door(start_server, tmp_path: Path) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}",
        data_dir=tmp_path,
        rate_limit="100/minute",
        rate_limit_storage="redis://127.0.0.1:1/0",
    )
    down = server.http.get("/v1/models")
    assert down.status_code == 503 and down.headers["Retry-After"] == "5"
    assert "rate-limit store" in down.json()["error"]["message"]
