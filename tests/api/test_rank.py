"""POST /v1/rank over HTTP against a real server, database and demo model: every image once in rank
order with intervals, every comparison logged, and bad sets refused with a 4xx before anything is kept."""

from __future__ import annotations

import pytest

from iqa.models import Comparison, Image
from tests.api.conftest import LiveServer, error_of, jpeg, png, sha256, unique_seed


def test_a_set_comes_back_ranked_with_intervals_and_every_comparison_logged(server: LiveServer) -> None:
    seed = unique_seed()
    images = [jpeg(seed + k, w=48 + 8 * k, h=48) for k in range(4)] + [png(seed + 9, w=40, h=40)]
    comparisons_before = server.count(Comparison)

    response = server.rank(*images, votes=30)

    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3, 4]
    assert [r["sha256"] for r in results] == [sha256(images[r["index"]]) for r in results]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(0.0, abs=1e-3)  # centred: only differences mean something
    for r in results:
        assert r["ci_low"] < r["score"] < r["ci_high"]

    # The votes add up: per pair, per image, and to the budget.
    pairs = body["pairs"]
    cast = sum(p["votes_a"] + p["votes_b"] + p["invalid_votes"] for p in pairs)
    assert cast == body["votes"] == 30
    for r in results:
        won = sum(p["votes_a"] for p in pairs if p["a"] == r["index"])
        won += sum(p["votes_b"] for p in pairs if p["b"] == r["index"])
        assert r["wins"] == won
    assert all(sum(1 for p in pairs if r["index"] in (p["a"], p["b"])) >= 2 for r in results)

    # Every comparison is a logged row, as /v1/compare logs them, naming the two images of its pair.
    logged = [(p, cid) for p in pairs for cid in p["comparison_ids"]]
    assert server.count(Comparison) - comparisons_before == len(logged) > len(pairs) - 1
    for pair, cid in logged:
        row = server.comparison(cid)
        ids = {server.image_row(sha256(images[pair["a"]])).id, server.image_row(sha256(images[pair["b"]])).id}
        assert {row.image_a_id, row.image_b_id} == ids
        assert row.model_version_id == body["model_version"]["id"]
    assert sum(server.comparison(cid).votes_a + server.comparison(cid).votes_b for _, cid in logged) == 30
    for data in images:
        assert server.image_row(sha256(data)).source == "rank"
        assert server.stored_path(sha256(data)).read_bytes() == data


def test_the_default_budget_is_the_compare_votes_per_image(server: LiveServer) -> None:
    seed = unique_seed()
    response = server.rank(*(jpeg(seed + k) for k in range(3)))
    assert response.status_code == 200, response.text
    assert response.json()["votes"] == 3 * server.service.settings.compare_votes


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one", "between 2 and 64"),
        ("too_many", "between 2 and 64"),
        ("duplicate", "same file"),
        ("corrupt", "images"),
        ("budget", "at least"),
    ],
)
def test_a_bad_set_is_a_422_and_nothing_is_kept(server: LiveServer, case: str, message: str) -> None:
    seed = unique_seed()
    good = [jpeg(seed + k, w=32, h=32) for k in range(3)]
    images_before, comparisons_before = server.count(Image), server.count(Comparison)
    form: dict = {}
    if case == "one":
        images = good[:1]
    elif case == "too_many":
        images = [jpeg(seed + k, w=16, h=16) for k in range(65)]
    elif case == "duplicate":
        images = [good[0], good[1], good[0]]
    elif case == "corrupt":
        images = [good[0], good[1][:40]]
    else:
        images, form = good, {"votes": 4}  # 3 images need 6 first votes

    response = server.rank(*images, **form)

    assert response.status_code == 422, response.text
    assert message in error_of(response)["message"]
    assert server.count(Image) == images_before and server.count(Comparison) == comparisons_before
