"""Correlations against known values, and the label-free gate metrics."""

from __future__ import annotations

import math

import pytest

from trainer.metrics import (
    correlations,
    parse_failure_rate,
    pseudo_label_agreement,
    score_spread,
    soft_pseudo_label_agreement,
)
from trainer.voting import make_label


def test_perfect_and_reversed() -> None:
    mos = [1.0, 2.0, 3.0, 4.0, 5.0]
    perfect = {"plcc": 1, "srcc": 1, "krcc": 1, "n": 5}
    assert correlations([2 * m + 1 for m in mos], mos) == pytest.approx(perfect)
    assert correlations([-m for m in mos], mos) == pytest.approx({"plcc": -1, "srcc": -1, "krcc": -1, "n": 5})


def test_rank_metrics_ignore_monotone_distortion() -> None:
    mos = [1.0, 2.0, 3.0, 4.0, 5.0]
    result = correlations([m**4 for m in mos], mos)
    assert result["srcc"] == pytest.approx(1.0) and result["krcc"] == pytest.approx(1.0)
    assert result["plcc"] < 0.99


def test_known_values() -> None:
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = 4 / 5; one discordant pair in 6
    result = correlations([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert result == pytest.approx({"plcc": 0.8, "srcc": 0.8, "krcc": 4 / 6, "n": 4})


@pytest.mark.filterwarnings("error")
def test_constant_or_tiny_input_gives_nan_without_warning() -> None:
    for pred, mos in [([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [4.0, 4.0]), ([1.0], [2.0]), ([], [])]:
        result = correlations(pred, mos)
        assert all(math.isnan(result[key]) for key in ("plcc", "srcc", "krcc"))
        assert result["n"] == len(pred)


def test_missing_predictions_are_left_out() -> None:
    result = correlations([1.0, None, 3.0, math.nan, 5.0], [1.0, 9.0, 3.0, 9.0, 5.0])
    assert result == pytest.approx({"plcc": 1, "srcc": 1, "krcc": 1, "n": 3})
    with pytest.raises(ValueError, match="2 predictions but 3"):
        correlations([1.0, 2.0], [1.0, 2.0, 3.0])


def test_pseudo_label_agreement() -> None:
    scores = {0: 4.0, 1: 2.0, 2: 3.0, 3: 3.0, 4: None}
    labels = [
        make_label(0, 1, 5, 1, 0),  # 0 beats 1, scores agree: 1
        make_label(1, 2, 4, 0, 0),  # 1 beats 2, scores disagree: 0
        make_label(2, 3, 0, 3, 0),  # equal scores: 1/2
        make_label(0, 2, 2, 2, 0),  # tied label: skipped
        make_label(0, 4, 3, 0, 0),  # 4 has no score: skipped
        make_label(0, 9, 3, 0, 0),  # 9 was not scored: skipped
    ]
    assert pseudo_label_agreement(scores, labels) == pytest.approx(1.5 / 3)
    assert pseudo_label_agreement(scores, [make_label(3, 2, 1, 0, 0, rule="soft")]) == 0.5
    assert math.isnan(pseudo_label_agreement(scores, labels[3:]))


def test_soft_pseudo_label_agreement_reads_every_sample() -> None:
    samples = {0: [4.0, 2.0], 1: [3.0, 3.0], 2: [1.0], 3: []}
    # 0 beats 1 by the votes: of the 4 sample pairs, (4 > 3) twice, (2 > 3) never: 1/2.
    assert soft_pseudo_label_agreement(samples, [make_label(0, 1, 5, 1, 0)]) == 0.5
    # 1 beats 0 (votes_j > votes_i): the complement.
    assert soft_pseudo_label_agreement(samples, [make_label(0, 1, 1, 5, 0)]) == 0.5
    # 2 loses to 1 in every sample pair; a tie of samples counts half.
    assert soft_pseudo_label_agreement(samples, [make_label(1, 2, 3, 0, 0)]) == 1.0
    assert soft_pseudo_label_agreement({0: [3.0], 1: [3.0]}, [make_label(0, 1, 3, 0, 0)]) == 0.5
    labels = [make_label(1, 2, 3, 0, 0), make_label(2, 1, 3, 0, 0)]
    assert soft_pseudo_label_agreement(samples, labels) == 0.5  # the mean over pairs
    # Tied labels and images without parsed samples are skipped; nothing left is NaN.
    assert math.isnan(
        soft_pseudo_label_agreement(samples, [make_label(0, 1, 2, 2, 0), make_label(0, 3, 4, 0, 0)])
    )


def test_parse_failure_rate() -> None:
    assert parse_failure_rate(3, 12) == 0.25
    assert parse_failure_rate(0, 5) == 0.0
    assert math.isnan(parse_failure_rate(0, 0))
    with pytest.raises(ValueError, match="between 0 and the total"):
        parse_failure_rate(6, 5)


def test_score_spread() -> None:
    assert score_spread({"a": 2.0, "b": 4.0, "c": None}) == 1.0
    assert score_spread({"a": 3.2, "b": 3.2, "c": 3.2}) == 0.0  # collapsed
    assert math.isnan(score_spread({"a": 3.0, "b": None}))
