"""POST /v1/compare over HTTP against a real server, database and demo model."""

from __future__ import annotations

import pytest

from iqa.prompts import parse_vote, reasoning_of
from iqa.service import DEMO_NAME
from tests.api.conftest import LiveServer, jpeg, png, sha256, unique_seed


def check_vote_arithmetic(body: dict, votes: int) -> None:
    """The counts add up, the probability is the share of valid votes, the winner follows from them."""
    assert body["votes"] == votes
    assert body["votes_a"] + body["votes_b"] + body["invalid_votes"] == votes
    valid = body["votes_a"] + body["votes_b"]
    if valid:
        assert body["prob_a_better"] == pytest.approx(body["votes_a"] / valid)
        assert 0.0 <= body["prob_a_better"] <= 1.0
    else:
        assert body["prob_a_better"] is None
    if body["votes_a"] == body["votes_b"]:
        assert body["winner"] is None
    else:
        assert body["winner"] == ("a" if body["votes_a"] > body["votes_b"] else "b")


@pytest.mark.parametrize("votes", [2, 3])
def test_compare_logs_both_images_and_the_comparison(server: LiveServer, votes: int) -> None:
    seed = unique_seed()
    a, b = jpeg(seed, w=64, h=48), png(seed + 1, w=48, h=48)
    active = server.active_version()

    response = server.compare(a, b, votes=votes)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["sha256_a"], body["sha256_b"]) == (sha256(a), sha256(b))
    check_vote_arithmetic(body, votes)
    assert body["invalid_votes"] == 0  # constrained decoding makes every vote parsable
    assert body["model_version"] == {"id": active.id, "name": DEMO_NAME, "untrained": True}
    assert body["reasoning"] is None

    for data, (width, height, fmt) in ((a, (64, 48, "JPEG")), (b, (48, 48, "PNG"))):
        sha = sha256(data)
        [image] = server.image_rows(sha)
        assert (image.width, image.height, image.format, image.byte_size) == (width, height, fmt, len(data))
        assert image.source == "compare"
        assert image.times_seen == 1
        assert server.stored_path(sha).read_bytes() == data
        assert server.predictions(sha) == []  # comparing does not score

    row = server.comparison(body["comparison_id"])
    assert row is not None
    assert row.image_a_id == server.image_row(sha256(a)).id
    assert row.image_b_id == server.image_row(sha256(b)).id
    assert (row.votes_a, row.votes_b, row.invalid_votes) == (
        body["votes_a"],
        body["votes_b"],
        body["invalid_votes"],
    )
    assert row.model_version_id == active.id
    assert row.prob_a_better == pytest.approx(body["prob_a_better"])
    assert len(row.completions) == votes
    assert row.sampling_key and f"n={votes}" in row.sampling_key
    # The stored completions are the votes: half with each image first, the A-first half first.
    parsed = [parse_vote(c) for c in row.completions]
    assert None not in parsed
    a_first = (votes + 1) // 2
    votes_for_a = sum(v == 0 for v in parsed[:a_first]) + sum(v == 1 for v in parsed[a_first:])
    assert votes_for_a == body["votes_a"]
    # The image endpoint shows them as compared, not scored.
    shown = server.http.get(f"/v1/images/{sha256(b)}").json()
    assert (shown["source"], shown["times_seen"], shown["predictions"]) == ("compare", 1, [])


def test_compare_return_reasoning_and_images_seen_before(server: LiveServer) -> None:
    seed = unique_seed()
    a, b = jpeg(seed), jpeg(seed + 1)
    scored = server.score(a, samples=2)
    assert scored.status_code == 200, scored.text

    response = server.compare(a, b, votes=4, return_reasoning=True)

    assert response.status_code == 200, response.text
    body = response.json()
    check_vote_arithmetic(body, 4)
    row = server.comparison(body["comparison_id"])
    assert body["reasoning"] == [reasoning_of(c) for c in row.completions]
    assert len(body["reasoning"]) == 4
    image_a = server.image_row(sha256(a))
    assert image_a.source == "score"  # the endpoint that first brought it in
    assert image_a.times_seen == 2
    assert server.image_row(sha256(b)).source == "compare"


def test_compare_uses_the_configured_default_votes(server: LiveServer) -> None:
    seed = unique_seed()
    response = server.compare(jpeg(seed), jpeg(seed + 1))

    assert response.status_code == 200, response.text
    body = response.json()
    check_vote_arithmetic(body, server.settings.compare_votes)
    assert len(server.comparison(body["comparison_id"]).completions) == server.settings.compare_votes


def test_a_fast_comparison_reads_both_orders_and_is_logged(server: LiveServer) -> None:
    seed = unique_seed()
    a, b = jpeg(seed, w=64, h=48), png(seed + 1, w=48, h=48)

    ab = server.compare(a, b, mode="fast")
    ba = server.compare(b, a, mode="fast")

    assert ab.status_code == 200 and ba.status_code == 200, (ab.text, ba.text)
    forward, backward = ab.json(), ba.json()
    assert forward["mode"] == "fast" and forward["votes"] == 0 and forward["invalid_votes"] == 0
    assert 0.0 < forward["prob_a_better"] < 1.0
    assert forward["prob_a_better"] == pytest.approx(1 - backward["prob_a_better"], abs=1e-6)
    assert forward["winner"] == ("a" if forward["prob_a_better"] > 0.5 else "b")
    assert backward["winner"] != forward["winner"]
    row = server.comparison(forward["comparison_id"])
    assert row.sampling_key.endswith("mode=fast") and row.completions == []
    assert row.prob_a_better == pytest.approx(forward["prob_a_better"])
