"""The gate that keeps worse checkpoints from replacing the serving one."""

from __future__ import annotations

import math

import pytest

from iqa.engines.base import ModelSpec
from iqa.reading import ScoreReading
from iqa.scoring import ScoreResult
from trainer.gate import GateThresholds, gate_inputs, judge
from trainer.round import gate_metrics
from trainer.voting import PairLabel, make_label

ACTIVE = {"agreement": 0.70, "parse_failure_rate": 0.02, "spread": 0.6}


def test_a_candidate_as_good_or_better_passes() -> None:
    verdict = judge(ACTIVE, {"agreement": 0.74, "parse_failure_rate": 0.0, "spread": 0.5}, GateThresholds())
    assert verdict.passed and verdict.reasons == []
    assert verdict.checks["agreement"] == {"active": 0.70, "candidate": 0.74, "needed_gain": 0.02}


def test_held_out_agreement_must_rise_by_more_than_the_minimum_gain() -> None:
    worse = {"agreement": 0.65, "parse_failure_rate": 0.0, "spread": 0.5}
    verdict = judge(ACTIVE, worse, GateThresholds())
    assert not verdict.passed
    assert verdict.reasons == [
        "held-out agreement did not rise enough: 0.700 -> 0.650 (needs a gain above +0.020)"
    ]
    slight = {**worse, "agreement": 0.715}  # a rise under the least practical gain
    assert not judge(ACTIVE, slight, GateThresholds()).passed
    assert judge(ACTIVE, slight, GateThresholds(min_agreement_gain=0.0)).passed
    assert judge(ACTIVE, worse, GateThresholds(min_agreement_gain=-0.1)).passed  # may fall 0.1
    unchanged = {**worse, "agreement": 0.70}
    assert not judge(ACTIVE, unchanged, GateThresholds(min_agreement_gain=0.0)).passed  # no gain at all
    assert not judge(ACTIVE, {**worse, "agreement": 0.74}, GateThresholds(min_agreement_gain=0.05)).passed


def test_the_soft_agreement_is_the_gate_input_where_the_metrics_have_it() -> None:
    metrics = {"holdout_agreement": 0.6, "holdout_soft_agreement": 0.64, "parse_failure_rate": 0.0}
    assert gate_inputs(metrics)["agreement"] == 0.64
    assert gate_inputs({**metrics, "holdout_soft_agreement": None})["agreement"] == 0.6


def test_read_agreement_per_pair_is_the_gate_input_where_the_round_read_scores() -> None:
    metrics = {
        "holdout_agreement": 0.6,
        "holdout_soft_agreement": 0.64,
        "holdout_read_agreement": 0.7,
        "holdout_read_pairs": [0.9, None, 0.5],
        "parse_failure_rate": 0.0,
        "read_spread": 0.8,
        "score_spread": 0.3,
    }
    inputs = gate_inputs(metrics)
    assert inputs["agreement"] == 0.7 and inputs["agreement_pairs"] == [0.9, None, 0.5]
    assert inputs["read_spread"] == 0.8 and inputs["spread"] == 0.3


def test_the_read_order_is_recorded_but_the_gate_tests_the_thurstone_chance() -> None:
    metrics = {
        "holdout_read_agreement": 0.7,
        "holdout_read_pairs": [0.9, None, 0.5],
        "holdout_order_agreement": 0.75,
        "holdout_order_pairs": [1.0, None, 0.5],
        "parse_failure_rate": 0.0,
    }
    inputs = gate_inputs(metrics)
    assert inputs["agreement"] == 0.7 and inputs["agreement_pairs"] == [0.9, None, 0.5]


def _read_metrics(means: dict[int, float], std: float, labels: list[PairLabel]) -> dict:
    """A model's round metrics on the held-out pairs, from readings with these means and one std."""
    spec = ModelSpec(0, "m", "base", "m")
    scores = {i: ScoreResult(m, 0.1, 2, 2, [m, m], ["", ""], spec) for i, m in means.items()}
    readings = {i: ScoreReading(m, std, {}, 1.0, spec) for i, m in means.items()}
    return gate_metrics(scores, labels, readings)


def test_a_model_that_only_grew_surer_needs_more_than_significance_and_one_that_fixed_pairs_passes() -> None:
    """Narrower read distributions raise the Thurstone chance of every pair already in the voted order,
    and most pairs are: a steady gain with a tiny standard error, though no pair swapped (two
    shuffled-label controls passed a gain of 0 that way). The least practical gain refuses it."""
    labels = [make_label(2 * k, 2 * k + 1, 12, 4, 0) for k in range(40)]  # image 2k preferred
    parent: dict[int, float] = {}
    for k in range(40):  # 30 pairs read in the voted order, 10 against it
        parent[2 * k], parent[2 * k + 1] = (3.3, 3.0) if k < 30 else (3.0, 3.3)
    before, surer = _read_metrics(parent, 0.5, labels), _read_metrics(parent, 0.45, labels)
    assert before["holdout_order_pairs"] == surer["holdout_order_pairs"]  # no pair swapped

    assert judge(gate_inputs(before), gate_inputs(surer), GateThresholds(min_agreement_gain=0.0)).passed
    verdict = judge(gate_inputs(before), gate_inputs(surer), GateThresholds())
    assert not verdict.passed
    assert 0 < verdict.checks["agreement"]["gain"] < 0.02
    assert verdict.checks["agreement"]["gain"] > 1.645 * verdict.checks["agreement"]["standard_error"]

    fixed = dict(parent)
    for k in range(30, 38):  # 8 of the 10 pairs against the votes now read in their order
        fixed[2 * k], fixed[2 * k + 1] = 3.3, 3.0
    verdict = judge(gate_inputs(before), gate_inputs(_read_metrics(fixed, 0.5, labels)), GateThresholds())
    assert verdict.passed, verdict.reasons
    assert verdict.checks["agreement"]["gain"] > 0.05


def _paired(before: list[float], after: list[float]) -> tuple[dict, dict]:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    active = {**ACTIVE, "agreement": mean(before), "agreement_pairs": before}
    return active, {**ACTIVE, "agreement": mean(after), "agreement_pairs": after}


def test_a_per_pair_gain_must_beat_its_standard_error() -> None:
    """The same mean gain passes when every pair moved the labelled way, and fails when it is the
    average of large moves both ways (a perturbation, not a lesson)."""
    before = [0.5] * 40
    steady = [0.55] * 39 + [0.56]
    active, candidate = _paired(before, steady)
    verdict = judge(active, candidate, GateThresholds())
    assert verdict.passed, verdict.reasons
    assert verdict.checks["agreement"]["pairs"] == 40
    assert 0.02 < verdict.checks["agreement"]["needed_gain"] < 0.03

    noisy = [0.95 if k % 2 else 0.15 for k in range(40)]  # mean 0.55 as well
    active, candidate = _paired(before, noisy)
    verdict = judge(active, candidate, GateThresholds())
    assert not verdict.passed
    assert verdict.checks["agreement"]["gain"] == 0.05 or math.isclose(
        verdict.checks["agreement"]["gain"], 0.05
    )
    assert verdict.checks["agreement"]["needed_gain"] > 0.05
    assert "needs a gain above" in verdict.reasons[0]
    assert judge(active, candidate, GateThresholds(agreement_z=0.0)).passed  # z = 0: any rise


def test_pairs_either_model_could_not_read_are_left_out_of_the_paired_gain() -> None:
    active, candidate = _paired([0.5, 0.5, 0.5, 0.5], [0.6, 0.61, 0.6, 0.62])
    active["agreement_pairs"] = [0.5, None, 0.5, 0.5]
    verdict = judge(active, candidate, GateThresholds())
    assert verdict.checks["agreement"]["pairs"] == 3


def test_a_collapsed_model_is_rejected() -> None:
    """Same score for every image: spread 0, even with perfect parsing."""
    verdict = judge(ACTIVE, {"agreement": 0.8, "parse_failure_rate": 0.0, "spread": 0.0}, GateThresholds())
    assert not verdict.passed and len(verdict.reasons) == 1 and "collapsed" in verdict.reasons[0]


def test_scores_that_shrink_toward_one_value_are_rejected_even_when_agreement_rises() -> None:
    """The shuffled-label control's signature: agreement up, read spread down by more than a fifth."""
    active = {**ACTIVE, "read_spread": 0.98}
    shrunk = {"agreement": 0.9, "parse_failure_rate": 0.0, "spread": 0.5, "read_spread": 0.74}
    verdict = judge(active, shrunk, GateThresholds())
    assert not verdict.passed and len(verdict.reasons) == 1
    assert "shrank from 0.980 to 0.740" in verdict.reasons[0]
    assert verdict.checks["read_spread"]["min"] == pytest.approx(0.784)
    assert judge(active, {**shrunk, "read_spread": 0.79}, GateThresholds()).passed  # kept 81%
    assert judge(active, {**shrunk, "read_spread": 1.77}, GateThresholds()).passed  # widened
    assert judge(active, shrunk, GateThresholds(min_spread_ratio=0.7)).passed
    missing = judge(active, {k: v for k, v in shrunk.items() if k != "read_spread"}, GateThresholds())
    assert not missing.passed and "shrank from 0.980 to nan" in missing.reasons[0]


def test_the_spread_ratio_is_skipped_for_a_parent_whose_scores_barely_spread() -> None:
    """The untrained demo reads about the same score for every image: no spread to keep."""
    active = {**ACTIVE, "read_spread": 0.002}
    candidate = {"agreement": 0.9, "parse_failure_rate": 0.0, "spread": 0.5, "read_spread": 0.0005}
    verdict = judge(active, candidate, GateThresholds())
    assert verdict.passed and "read_spread" not in verdict.checks


def test_a_spread_floor_of_zero_switches_the_spread_check_off() -> None:
    """With EVOQ_GATE_MIN_SPREAD=0 a candidate whose spread could not be measured (fewer than two images
    with a parsed answer) is not refused for it; with the default floor it is."""
    candidate = {"agreement": math.nan, "parse_failure_rate": 0.875, "spread": math.nan}
    active = {"agreement": math.nan, "parse_failure_rate": 0.25, "spread": 0.92}
    assert judge(active, candidate, GateThresholds(min_spread=0.0, max_parse_failure=1.0)).passed
    refused = judge(active, candidate, GateThresholds(max_parse_failure=1.0))
    assert not refused.passed
    assert refused.reasons == ["score spread nan is below 0.05: the model has collapsed"]


def test_unparsable_answers_are_rejected() -> None:
    candidate = {"agreement": math.nan, "parse_failure_rate": 1.0, "spread": math.nan}
    verdict = judge(ACTIVE, candidate, GateThresholds())
    assert not verdict.passed and len(verdict.reasons) == 3
    assert verdict.to_dict()["checks"]["spread"]["candidate"] is None  # JSON has no NaN


def test_agreement_is_skipped_when_no_held_out_pair_was_decided() -> None:
    """All held-out pairs tied: neither model can be judged on agreement; the other checks decide."""
    active = {"agreement": math.nan, "parse_failure_rate": 0.0, "spread": 0.5}
    candidate = {"agreement": math.nan, "parse_failure_rate": 0.0, "spread": 0.4}
    verdict = judge(active, candidate, GateThresholds())
    assert verdict.passed and "skipped" in verdict.checks["agreement"]
    assert judge({**active, "agreement": 0.6}, candidate, GateThresholds()).passed is False


def test_validation_srcc_must_not_drop_when_configured() -> None:
    good = {"agreement": 0.75, "parse_failure_rate": 0.0, "spread": 0.5}
    assert judge({**ACTIVE, "srcc": 0.5}, {**good, "srcc": 0.55}, GateThresholds()).passed
    verdict = judge({**ACTIVE, "srcc": 0.5}, {**good, "srcc": 0.4}, GateThresholds())
    assert verdict.reasons == ["validation SRCC fell from 0.500 to 0.400"]
