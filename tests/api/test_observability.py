"""What an operator sees, over HTTP: Prometheus metrics at /metrics and a request id on every answer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.observability import JsonFormatter, RequestIdFilter
from iqa.models import Image
from tests.api.conftest import LiveServer, jpeg, unique_seed


def scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = server.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(metrics: dict, metric: str, **labels: str) -> float:
    return metrics.get((metric, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def live(start_server, tmp_path: Path) -> LiveServer:
    return start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path)


def test_metrics_count_requests_samples_cache_hits_and_read_the_shared_state(live: LiveServer) -> None:
    before = scrape(live)
    image = jpeg(unique_seed())
    assert live.score(image, samples=3).status_code == 200
    assert live.score(image, samples=3).json()["results"][0]["cached"] is True
    assert live.compare(jpeg(unique_seed()), jpeg(unique_seed()), votes=4).status_code == 200
    assert live.http.post("/v1/score", data={"samples": "2"}).status_code == 422  # no image
    assert live.http.get("/nowhere").status_code == 404
    after = scrape(live)

    def grew(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert grew("evoq_http_requests_total", route="/v1/score", method="POST", status="200") == 2
    assert grew("evoq_http_requests_total", route="/v1/score", method="POST", status="422") == 1
    assert grew("evoq_http_requests_total", route="/v1/compare", method="POST", status="200") == 1
    assert grew("evoq_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert grew("evoq_http_request_duration_seconds_count", route="/v1/score") == 3
    assert grew("evoq_samples_generated_total", kind="score") == 3  # the cached answer generated none
    assert grew("evoq_samples_generated_total", kind="vote") == 4
    assert grew("evoq_cache_hits_total") == 1
    assert grew("evoq_engine_batch_rows_count") >= 1
    # The model thread's CPU: some for the two generations, none for the cache hit or the 422.
    assert 0 < grew("evoq_engine_model_cpu_seconds_total") < 60
    # Read from the database and the engine at scrape time.
    assert value(after, "evoq_images_stored") == live.count(Image) == 3
    assert value(after, "evoq_rounds", state="succeeded") == 0
    active = live.http.get("/v1/models").json()["active"]
    assert value(after, "evoq_active_model_version", name=active["name"]) == active["id"]
    assert ("evoq_engine_queue_depth", (("queue", "queued"),)) in after


def test_every_answer_has_a_request_id_and_a_sane_one_is_kept(live: LiveServer) -> None:
    generated = live.http.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert live.http.get("/healthz").headers["X-Request-ID"] != generated
    kept = live.http.get("/healthz", headers={"X-Request-ID": "client-42.a"})
    assert kept.headers["X-Request-ID"] == "client-42.a"
    odd = live.http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["X-Request-ID"]
    assert len(odd) == 32
    error = live.http.post("/v1/score", headers={"X-Request-ID": "err-1"})
    assert error.status_code == 422 and error.headers["X-Request-ID"] == "err-1"


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("iqa.service", logging.INFO, __file__, 1, "scored %d images", (2,), None)
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "scored 2 images" and line["request_id"] == "-"
    assert line["level"] == "INFO" and line["logger"] == "iqa.service"
