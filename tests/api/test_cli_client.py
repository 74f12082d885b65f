"""`evoq score` and `evoq compare` (the real console script) and the Python client, against a live server."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evoq.client import Client, ServiceError
from tests.api.conftest import LiveServer, jpeg, png, unique_seed
from tests.worker.test_inprocess_rounds import PASSING_GATE, TINY_ROUND, TOKEN

EVOQ = Path(sys.executable).parent / "evoq"


def evoq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVOQ), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def live(start_server, tmp_path: Path) -> LiveServer:
    return start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path / "data", admin_token=TOKEN, **TINY_ROUND,
        **PASSING_GATE,
    )  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two photos, one in a subfolder, a corrupt file and a hidden file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(unique_seed()))
    (root / "b.png").write_bytes(png(unique_seed()))
    (root / "sub" / "c.jpg").write_bytes(jpeg(unique_seed()))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / ".hidden").write_bytes(b"x")
    return root


def test_evoq_score_a_folder_through_the_service_to_csv(
    live: LiveServer, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    done = evoq("score", str(folder), "--url", live.url, "--samples", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a.jpg", "b.png", "broken.jpg"}  # no subfolder without -r, no hidden file
    assert list(next(csv.reader(out.open()))) == [
        "path", "sha256", "score", "std", "valid_samples", "model_version", "cached", "error",
    ]  # fmt: skip
    for name in ("a.jpg", "b.png"):
        row = rows[name]
        assert row["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert 1.0 <= float(row["score"]) <= 5.0 and row["valid_samples"] == "2" and row["error"] == ""
        assert row["model_version"] == "demo (untrained)" and row["cached"] == "False"
        assert live.image_row(row["sha256"]) is not None  # logged by the service: in the round pool
    broken = rows["broken.jpg"]
    assert broken["score"] == "" and broken["error"] and broken["sha256"]
    assert "2 scored, 1 failed" in done.stderr

    again = evoq(
        "score", str(folder), "-r", "--url", live.url, "--samples", "2", "--out", str(tmp_path / "s.jsonl")
    )
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    by_name = {Path(r["path"]).name: r for r in lines}
    assert set(by_name) == {"a.jpg", "b.png", "broken.jpg", "c.jpg"}
    assert by_name["a.jpg"]["cached"] is True and by_name["c.jpg"]["cached"] is False


def test_evoq_score_and_compare_in_process(demo_model_dir: Path, folder: Path) -> None:
    done = evoq(
        "score",
        str(folder / "a.jpg"),
        str(folder / "broken.jpg"),
        "--model",
        str(demo_model_dir),
        "--samples",
        "2",
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert [Path(r["path"]).name for r in rows] == ["a.jpg", "broken.jpg"]
    assert 1.0 <= float(rows[0]["score"]) <= 5.0 and rows[1]["error"] and rows[1]["score"] == ""
    fast = [
        evoq("score", str(folder / "a.jpg"), "--model", str(demo_model_dir), "--mode", "fast") for _ in "ab"
    ]
    assert all(done.returncode == 0 for done in fast), fast[0].stderr
    (first,), (second,) = (list(csv.DictReader(done.stdout.splitlines())) for done in fast)
    assert first["score"] == second["score"] and first["valid_samples"] == "0"  # one deterministic reading
    pair = evoq(
        "compare",
        str(folder / "a.jpg"),
        str(folder / "b.png"),
        "--model",
        str(demo_model_dir),
        "--votes",
        "4",
    )
    assert pair.returncode == 0, pair.stderr
    answer = json.loads(pair.stdout)
    assert answer["votes_a"] + answer["votes_b"] + answer["invalid_votes"] == 4
    assert evoq("score", str(folder), "--samples", "2").returncode != 0  # neither --url nor --model


def test_evoq_compare_through_the_service(live: LiveServer, folder: Path) -> None:
    done = evoq("compare", str(folder / "a.jpg"), str(folder / "b.png"), "--url", live.url, "--votes", "4")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["votes"] == 4 and live.comparison(answer["comparison_id"]) is not None


def test_the_client_scores_compares_and_runs_a_round_as_admin(live: LiveServer, folder: Path) -> None:
    with Client(live.url, admin_token=TOKEN) as client:
        scored = client.score([folder / "a.jpg", (folder / "b.png").read_bytes()], samples=2)
        assert [r.valid_samples for r in scored.results] == [2, 2]
        assert client.image(scored.results[0].sha256).times_seen == 1
        assert client.compare(folder / "a.jpg", folder / "b.png", votes=2).votes == 2
        fast = client.score([folder / "a.jpg"], mode="fast").results[0]
        assert (
            fast.mode == "fast"
            and fast.distribution
            and fast.score == client.score([folder / "a.jpg"], mode="fast").results[0].score
        )
        assert client.compare(folder / "a.jpg", folder / "b.png", mode="fast").mode == "fast"
        ranked = client.rank([folder / "a.jpg", folder / "b.png", jpeg(unique_seed())], votes=12)
        assert sorted(r.index for r in ranked.results) == [0, 1, 2] and ranked.votes == 12
        with pytest.raises(ServiceError) as bad:
            client.score([folder / "broken.jpg"])
        assert bad.value.status == 422 and bad.value.message
        for seed in range(4):
            client.score([jpeg(unique_seed() + seed)], samples=2)
        base = client.models().active
        seen: list[str] = []
        started = client.start_round(seed=1)
        done = client.wait_for_round(started.id, on_progress=lambda r: seen.append(r.state), poll_s=0.2)
        assert done.state == "succeeded", done.error
        assert seen[-1] == "succeeded" and len(set(seen)) >= 2
        assert [r.id for r in client.rounds()] == [started.id]
        assert {v.id for v in client.versions()} == {base.id, done.result_version_id}
        assert client.activate(base.id).status == "active"
        queued = client.start_round()
        assert client.cancel_round(queued.id).cancel_requested or client.round(queued.id).state == "cancelled"
        client.wait_for_round(queued.id, poll_s=0.2)
    with Client(live.url) as anonymous, pytest.raises(ServiceError) as denied:
        anonymous.rounds()
    assert denied.value.status == 401
