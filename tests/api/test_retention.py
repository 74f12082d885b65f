"""What the service keeps: deleting an image, the retention period, requests that ask not to be kept, and
that neither deletion nor retention breaks a running round. Over HTTP, on a real SQLite file and store."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, select, update

from iqa.models import Comparison, Image, Prediction, PseudoLabel, utcnow
from tests.api.conftest import LiveServer, jpeg, sha256, unique_seed
from tests.worker.test_inprocess_rounds import AUTH, PASSING_GATE, TINY_ROUND, TOKEN, wait_for_round


def rows_naming(server: LiveServer, sha: str) -> int:
    with server.session() as session:
        image_id = session.scalar(select(Image.id).where(Image.sha256 == sha))
        if image_id is None:
            return 0
        return 1 + sum(
            len(session.scalars(select(table.id).where(clause)).all())
            for table, clause in (
                (Prediction, Prediction.image_id == image_id),
                (Comparison, or_(Comparison.image_a_id == image_id, Comparison.image_b_id == image_id)),
                (PseudoLabel, or_(PseudoLabel.image_a_id == image_id, PseudoLabel.image_b_id == image_id)),
            )
        )


def test_deleting_an_image_leaves_no_byte_no_row_and_no_cached_result(start_server, tmp_path: Path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, admin_token=TOKEN)
    a, b = jpeg(unique_seed()), jpeg(unique_seed())
    assert server.score(a, samples=2).status_code == 200
    assert server.compare(a, b, votes=2).status_code == 200
    sha = sha256(a)
    assert server.stored_path(sha).is_file() and rows_naming(server, sha) == 3

    deleted = server.http.delete(f"/admin/images/{sha}", headers=AUTH)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {
        "sha256": sha, "predictions": 1, "comparisons": 1, "pseudo_labels": 0, "bytes_removed": True,
    }  # fmt: skip
    assert not server.stored_path(sha).exists() and rows_naming(server, sha) == 0
    assert server.http.get(f"/v1/images/{sha}").status_code == 404
    assert server.http.delete(f"/admin/images/{sha}", headers=AUTH).status_code == 404
    assert server.http.delete(f"/admin/images/{sha}").status_code == 401
    assert server.image_row(sha256(b)) is not None  # the other image stays
    again = server.score(a, samples=2).json()["results"][0]
    assert again["cached"] is False  # its cached result went with it


def test_retention_removes_old_images_and_keeps_recent_ones(start_server, tmp_path: Path) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, retention_days=1, round_check_interval_s=0.2
    )
    old, recent = jpeg(unique_seed()), jpeg(unique_seed())
    for image in (old, recent):
        assert server.score(image, samples=2).status_code == 200
    with server.session() as session:
        session.execute(
            update(Image).where(Image.sha256 == sha256(old)).values(last_seen_at=utcnow() - timedelta(days=3))
        )
        session.commit()
    deadline = time.monotonic() + 20
    while server.image_row(sha256(old)) is not None:
        assert time.monotonic() < deadline, "the retention job did not run"
        time.sleep(0.2)
    assert not server.stored_path(sha256(old)).exists() and rows_naming(server, sha256(old)) == 0
    assert server.image_row(sha256(recent)) is not None and server.stored_path(sha256(recent)).is_file()


def test_a_request_that_asks_not_to_be_kept_leaves_no_trace_but_a_count(start_server, tmp_path: Path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path, allow_unkept_requests=True)
    before = server.counts()
    metrics = server.http.get("/metrics").text
    count = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("evoq_unkept_requests_total")
    )
    a, b = jpeg(unique_seed()), jpeg(unique_seed())
    scored = server.score(a, samples=2, keep="false")
    assert scored.status_code == 200, scored.text
    item = scored.json()["results"][0]
    assert item["prediction_id"] is None and item["cached"] is False and 1 <= item["score"] <= 5
    pair = server.compare(a, b, votes=2, keep="false")
    assert pair.status_code == 200 and pair.json()["comparison_id"] is None
    assert server.counts() == before and server.stored_files() == []
    metrics = server.http.get("/metrics").text
    assert f"evoq_unkept_requests_total {count + 2}" in metrics

    closed = start_server(f"sqlite:///{tmp_path / 'closed.db'}", data_dir=tmp_path / "closed")
    refused = closed.score(a, samples=2, keep="false")
    assert refused.status_code == 422 and "EVOQ_ALLOW_UNKEPT_REQUESTS" in refused.json()["error"]["message"]
    assert closed.stored_files() == []


def test_deleting_a_pool_image_during_a_round_does_not_break_it(start_server, tmp_path: Path) -> None:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}",
        data_dir=tmp_path,
        admin_token=TOKEN,
        active_version_poll_s=0.2,
        **{**TINY_ROUND, "round_steps": 6},
        **PASSING_GATE,
    )
    images = [jpeg(unique_seed()) for _ in range(5)]
    for image in images:
        assert server.score(image, samples=2).status_code == 200
    round_id = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 4}).json()["id"]
    deadline = time.monotonic() + 300
    while server.http.get(f"/admin/evolutions/{round_id}", headers=AUTH).json()["state"] != "training":
        assert time.monotonic() < deadline, "the round never reached training"
        time.sleep(0.1)
    gone = sha256(images[0])
    assert server.http.delete(f"/admin/images/{gone}", headers=AUTH).status_code == 200

    done = wait_for_round(server, round_id)
    assert done["state"] == "succeeded", done
    versions = {v["id"]: v for v in server.http.get("/admin/models", headers=AUTH).json()}
    labels = json.loads(
        (Path(versions[done["result_version_id"]]["path"]) / "pseudo_labels.json").read_text()
    )
    key = f"{gone[:2]}/{gone[2:4]}/{gone}"
    naming = [r for r in labels if r["kind"] == "random" and key in (r["image_i"], r["image_j"])]
    assert naming and done["metrics"]["pairs_of_deleted_images"] == len(naming)  # it was in the round
    assert rows_naming(server, gone) == 0  # no label was stored for it
    with server.session() as session:
        stored = session.scalars(select(PseudoLabel).where(PseudoLabel.round_id == round_id)).all()
        assert len(stored) == TINY_ROUND["round_pairs"] - len(naming)
    assert not server.stored_path(gone).exists()
    assert not any(p.name.startswith(".pool-of-round") for p in (tmp_path / "checkpoints").iterdir())
