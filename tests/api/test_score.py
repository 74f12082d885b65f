"""POST /v1/score over HTTP against a real server, database and demo model.

Every test checks the response, the database rows and the stored files. Shared servers see many tests'
images, so each test uses images of its own (`unique_seed`) and looks rows up by their SHA-256.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from iqa import registry
from iqa.models import ModelVersion
from iqa.prompts import parse_score, reasoning_of
from iqa.service import DEMO_NAME
from tests import imagegen
from tests.api.conftest import (
    BACKENDS,
    LiveServer,
    error_of,
    fresh_database,
    jpeg,
    png,
    sha256,
    unique_seed,
)
from tests.conftest import POSTGRES_SERVER_URL


def only_result(response) -> dict:
    assert response.status_code == 200, response.text
    [item] = response.json()["results"]
    return item


# ---- one image, end to end ----------------------------------------------------------------------------


def test_score_jpeg_logs_the_image_the_prediction_and_stores_the_bytes(server: LiveServer) -> None:
    data = jpeg(unique_seed(), w=64, h=48)
    sha = sha256(data)
    active = server.active_version()

    item = only_result(server.score(data, samples=3))

    assert item["sha256"] == sha
    assert 1.0 <= item["score"] <= 5.0
    assert item["std"] is not None and item["std"] >= 0.0
    assert item["valid_samples"] == item["samples"] == 3
    assert item["cached"] is False
    assert item["model_version"] == {"id": active.id, "name": DEMO_NAME, "untrained": True}
    assert item["reasoning"] is None
    assert active.untrained and active.name == DEMO_NAME

    [image] = server.image_rows(sha)
    assert (image.width, image.height, image.format) == (64, 48, "JPEG")
    assert image.byte_size == len(data)
    assert image.source == "score"
    assert image.times_seen == 1
    assert image.storage_key == f"{sha[:2]}/{sha[2:4]}/{sha}"

    [prediction] = server.predictions(sha)
    assert prediction.id == item["prediction_id"]
    assert prediction.score == pytest.approx(item["score"], rel=1e-12)
    assert prediction.score_std == pytest.approx(item["std"], rel=1e-12, abs=1e-12)
    assert prediction.model_version_id == active.id
    assert prediction.samples == prediction.valid_samples == 3
    assert len(prediction.completions) == 3
    assert prediction.sampling_key and "n=3" in prediction.sampling_key
    assert prediction.prompt_profile == "evoquality"
    assert prediction.latency_ms > 0
    # The score is the mean of what the logged completions say.
    parsed = [parse_score(c) for c in prediction.completions]
    assert None not in parsed
    assert item["score"] == pytest.approx(statistics.fmean(parsed))
    assert item["std"] == pytest.approx(statistics.pstdev(parsed), abs=1e-9)

    stored = server.stored_path(sha)
    assert stored.read_bytes() == data


def test_exif_rotated_jpeg_is_logged_with_its_upright_size(server: LiveServer) -> None:
    plain = jpeg(unique_seed(), w=64, h=48)
    rotated = imagegen.with_exif_orientation(plain, 6)  # displayed turned by 90 degrees
    sha = sha256(rotated)

    item = only_result(server.score(rotated, samples=2))

    assert item["sha256"] == sha
    [image] = server.image_rows(sha)
    assert (image.width, image.height) == (48, 64)
    assert server.stored_path(sha).read_bytes() == rotated  # the original bytes, EXIF and all


def test_several_images_are_answered_in_request_order(server: LiveServer) -> None:
    seed = unique_seed()
    images = [jpeg(seed), png(seed + 1, w=40, h=40), jpeg(seed + 2, w=32, h=80)]

    response = server.score(*images, samples=2)

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["sha256"] for r in results] == [sha256(d) for d in images]
    assert len({r["prediction_id"] for r in results}) == 3
    for data, result, (width, height, fmt) in zip(
        images, results, [(64, 48, "JPEG"), (40, 40, "PNG"), (32, 80, "JPEG")], strict=True
    ):
        sha = sha256(data)
        assert 1.0 <= result["score"] <= 5.0
        assert result["samples"] == result["valid_samples"] == 2
        image = server.image_row(sha)
        assert image is not None
        assert (image.width, image.height, image.format, image.byte_size) == (width, height, fmt, len(data))
        [prediction] = server.predictions(sha)
        assert prediction.id == result["prediction_id"]
        assert prediction.score == pytest.approx(result["score"])
        assert server.stored_path(sha).read_bytes() == data


def test_return_reasoning_gives_one_text_per_sample_also_from_the_cache(server: LiveServer) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    first = only_result(server.score(data, samples=3, return_reasoning=True))
    cached = only_result(server.score(data, samples=3, return_reasoning=True))

    [prediction] = server.predictions(sha)
    assert isinstance(first["reasoning"], list) and len(first["reasoning"]) == 3
    assert all(isinstance(r, str) for r in first["reasoning"])
    assert first["reasoning"] == [reasoning_of(c) for c in prediction.completions]
    assert cached["cached"] is True
    assert cached["reasoning"] == first["reasoning"]


# ---- deduplication and the result cache -----------------------------------------------------------------


def test_same_bytes_twice_is_one_image_one_file_and_a_cached_answer(server: LiveServer) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    first = only_result(server.score(data, samples=2))
    time.sleep(0.01)  # so last_seen_at can move
    second = only_result(server.score(data, samples=2))

    assert first["cached"] is False
    assert second["cached"] is True
    for field in ("sha256", "prediction_id", "score", "std", "valid_samples", "samples", "model_version"):
        assert second[field] == first[field], field
    [image] = server.image_rows(sha)
    assert image.times_seen == 2
    assert image.last_seen_at > image.first_seen_at
    [prediction] = server.predictions(sha)  # no second prediction row
    assert prediction.id == first["prediction_id"]
    stored = server.stored_path(sha)
    assert [p.name for p in stored.parent.iterdir()] == [sha]  # one file, no temp leftovers
    assert stored.read_bytes() == data


def test_concurrent_requests_for_new_bytes_make_one_image_row(server: LiveServer) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: server.score(data, samples=2), range(4)))

    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    results = [only_result(r) for r in responses]
    [image] = server.image_rows(sha)
    assert image.times_seen == 4
    predictions = server.predictions(sha)
    # Each request was either scored (its own row) or answered from a row another one logged.
    assert {r["prediction_id"] for r in results} == {p.id for p in predictions}
    assert sum(not r["cached"] for r in results) == len(predictions)
    assert server.stored_path(sha).read_bytes() == data
    assert [p.name for p in server.stored_path(sha).parent.iterdir()] == [sha]


def test_different_samples_is_a_cache_miss(server: LiveServer) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    two = only_result(server.score(data, samples=2))
    three = only_result(server.score(data, samples=3))
    two_again = only_result(server.score(data, samples=2))

    assert three["cached"] is False
    assert three["prediction_id"] != two["prediction_id"]
    assert three["samples"] == 3
    assert two_again["cached"] is True and two_again["prediction_id"] == two["prediction_id"]
    predictions = server.predictions(sha)
    assert [(p.id, p.samples) for p in predictions] == [
        (two["prediction_id"], 2),
        (three["prediction_id"], 3),
    ]
    assert predictions[0].sampling_key != predictions[1].sampling_key
    assert server.image_row(sha).times_seen == 3


def test_a_fast_score_is_one_deterministic_reading_cached_apart_from_sampled_ones(server: LiveServer) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    fast = only_result(server.score(data, mode="fast"))
    assert fast["mode"] == "fast" and fast["cached"] is False
    assert 1.0 <= fast["score"] <= 5.0 and fast["std"] > 0
    assert fast["samples"] == 0 and fast["valid_samples"] == 0
    assert sorted(fast["distribution"]) == ["1", "2", "3", "4", "5"]
    assert sum(fast["distribution"].values()) == pytest.approx(1.0)

    sampled = only_result(server.score(data, samples=2))
    assert sampled["mode"] == "sampled" and sampled["cached"] is False and sampled["distribution"] is None
    again = only_result(server.score(data, mode="fast"))
    assert again["cached"] is True and again["prediction_id"] == fast["prediction_id"]
    assert again["score"] == fast["score"] and again["distribution"] == fast["distribution"]

    [row] = [p for p in server.predictions(sha) if p.id == fast["prediction_id"]]
    assert row.sampling_key.endswith("mode=fast") and row.completions == []
    assert row.distribution == fast["distribution"] and row.score == fast["score"]

    # Not cached the second time round (keep=false reads nothing from the cache): the same number.
    other = jpeg(unique_seed())
    first = only_result(server.score(other, mode="fast"))
    with server.session() as session:
        session.execute(text("DELETE FROM predictions WHERE id = :id"), {"id": first["prediction_id"]})
        session.commit()
    assert only_result(server.score(other, mode="fast"))["score"] == first["score"]


def test_an_unknown_mode_is_a_422(server: LiveServer) -> None:
    response = server.score(jpeg(unique_seed()), mode="quick")
    assert response.status_code == 422
    assert "mode" in error_of(response)["message"]


def test_a_rejected_request_does_not_count_its_cached_image_as_seen(server: LiveServer) -> None:
    """A request that is refused (422) must leave the database as it was, cached images included."""
    good = jpeg(unique_seed())
    sha = sha256(good)
    only_result(server.score(good, samples=2))
    assert server.image_row(sha).times_seen == 1

    response = server.score(good, imagegen.truncated(jpeg(unique_seed())), samples=2)

    assert response.status_code == 422, response.text
    assert error_of(response)["type"] == "truncated_image"
    assert server.image_row(sha).times_seen == 1


@pytest.fixture
def own_server(database_url: str, start_server) -> Iterator[LiveServer]:
    """A server of this test's own on the shared `database_url` fixture (SQLite and PostgreSQL)."""
    live = start_server(database_url)
    yield live
    live.stop()


def test_a_new_model_version_never_serves_the_old_versions_cache(
    own_server: LiveServer, demo_model_dir: Path, start_server
) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)
    old = only_result(own_server.score(data, samples=2))
    assert only_result(own_server.score(data, samples=2))["cached"] is True

    # An evolved version of the base model becomes active, as an EvoQuality round would make it.
    with Session(own_server.db, expire_on_commit=False) as session:
        base = registry.active_version(session)
        evolved = ModelVersion(
            name="demo round 1", kind="full", path=str(demo_model_dir), parent_id=base.id, untrained=True
        )
        session.add(evolved)
        session.flush()
        registry.mark_active(session, evolved)
        session.commit()
        spec = registry.to_spec(evolved)
    own_server.run(own_server.service.engine.activate(spec))

    new = only_result(own_server.score(data, samples=2))

    assert new["cached"] is False
    assert new["model_version"] == {"id": evolved.id, "name": "demo round 1", "untrained": True}
    assert new["prediction_id"] != old["prediction_id"]
    assert [p.model_version_id for p in own_server.predictions(sha)] == [base.id, evolved.id]
    assert own_server.http.get("/v1/models").json()["active"]["name"] == "demo round 1"
    again = only_result(own_server.score(data, samples=2))
    assert again["cached"] is True and again["prediction_id"] == new["prediction_id"]
    assert again["model_version"]["id"] == evolved.id

    # A restart on the same database keeps serving the evolved version and its cache.
    own_server.stop()
    restarted = start_server(own_server.settings.database_url, data_dir=own_server.settings.data_dir)
    try:
        after = only_result(restarted.score(data, samples=2))
        assert after["cached"] is True and after["prediction_id"] == new["prediction_id"]
        assert after["model_version"] == new["model_version"]
    finally:
        restarted.stop()


# ---- failure isolation ----------------------------------------------------------------------------------


def test_engine_failure_is_a_503_and_the_accepted_image_is_kept(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = jpeg(unique_seed())
    sha = sha256(data)

    def broken_generate(*args: object, **kwargs: object) -> list[list[str]]:
        raise RuntimeError("injected fault: the accelerator is gone")

    # The deliberate fault: the running engine's generation step raises.
    monkeypatch.setattr(server.service.engine, "_generate_group", broken_generate)
    response = server.score(data, samples=2)

    assert response.status_code == 503, response.text
    error = error_of(response)
    assert error["type"] == "engine_unavailable"
    assert "generation failed" in error["message"] and "injected fault" in error["message"]
    assert int(response.headers["Retry-After"]) > 0
    [image] = server.image_rows(sha)  # nothing accepted is lost
    assert image.times_seen == 1 and image.source == "score"
    assert server.stored_path(sha).read_bytes() == data
    assert server.predictions(sha) == []

    monkeypatch.undo()
    item = only_result(server.score(data, samples=2))

    assert item["cached"] is False and 1.0 <= item["score"] <= 5.0
    [prediction] = server.predictions(sha)
    assert prediction.id == item["prediction_id"]
    assert server.image_row(sha).times_seen == 2


class _Outage:
    """Takes a server's database away and brings it back, without touching anything shared."""

    def __init__(self, backend: str, live: LiveServer, url: str, folder: Path) -> None:
        self.backend, self.live, self.url, self.folder = backend, live, url, folder

    def _postgres(self, sql_for_name) -> None:
        from sqlalchemy import create_engine

        admin = create_engine(f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                sql_for_name(connection)
        finally:
            admin.dispose()

    def begin(self) -> None:
        self.live.db.dispose()  # the test's own connections
        if self.backend == "sqlite":
            # The database's folder disappears (an unmounted volume). Pooled SQLite connections keep
            # their open file, so the server's pool is emptied, as after a restart of its connections.
            os.rename(self.folder / "db", self.folder / "db-gone")
            self.live.service.db.dispose()
            return
        name = self.url.rsplit("/", 1)[1]

        def rename(connection) -> None:
            for _ in range(50):
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                try:
                    connection.execute(text(f'ALTER DATABASE "{name}" RENAME TO "{name}_gone"'))
                    return
                except Exception:  # a connection came back between the two statements
                    time.sleep(0.05)
            raise AssertionError("could not take the database away")

        self._postgres(rename)

    def end(self) -> None:
        if self.backend == "sqlite":
            os.rename(self.folder / "db-gone", self.folder / "db")
            return
        name = self.url.rsplit("/", 1)[1]
        self._postgres(lambda c: c.execute(text(f'ALTER DATABASE "{name}_gone" RENAME TO "{name}"')))


@pytest.fixture(params=BACKENDS)
def outage(request: pytest.FixtureRequest, start_server, tmp_path: Path) -> Iterator[_Outage]:
    """A server on a database of its own that the test may take away."""
    with fresh_database(request.param, tmp_path) as url:
        live = start_server(url, data_dir=tmp_path)
        try:
            yield _Outage(request.param, live, url, tmp_path)
        finally:
            live.stop()


def test_database_outage_is_a_503_and_the_service_recovers(outage: _Outage) -> None:
    live = outage.live
    only_result(live.score(jpeg(unique_seed()), samples=2))
    data = jpeg(unique_seed())
    sha = sha256(data)

    outage.begin()
    try:
        response = live.score(data, samples=2)
        assert response.status_code == 503, response.text
        error = error_of(response)
        assert error["type"] == "database_unavailable"
        assert "database" in error["message"]
        assert int(response.headers["Retry-After"]) > 0

        compared = live.compare(jpeg(unique_seed()), jpeg(unique_seed()), votes=2)
        assert compared.status_code == 503, compared.text
        assert error_of(compared)["type"] == "database_unavailable"

        image = live.http.get(f"/v1/images/{sha}")
        assert image.status_code == 503 and error_of(image)["type"] == "database_unavailable"

        ready = live.http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert error_of(ready)["type"] == "not_ready"
        assert int(ready.headers["Retry-After"]) > 0
        assert live.http.get("/healthz").status_code == 200  # the process itself is alive
    finally:
        outage.end()

    assert not live.stored_path(sha).exists()  # refused before anything was accepted
    assert live.http.get("/readyz").status_code == 200
    item = only_result(live.score(data, samples=2))
    assert item["cached"] is False
    [image] = live.image_rows(sha)
    assert image.times_seen == 1
    [prediction] = live.predictions(sha)
    assert prediction.id == item["prediction_id"]
    assert live.stored_path(sha).read_bytes() == data
