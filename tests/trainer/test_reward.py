"""The fidelity reward against hand-computed values, its properties, and the TRL wrapper.

Expected numbers were computed independently (mpmath, 30 digits) from
p = Phi((q - mu_j) / sqrt(var_i + var_j + 1e-6)), r = sqrt(p* p + 1e-6) + sqrt((1 - p*)(1 - p) + 1e-6).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.reward import (
    EPS,
    GroupStats,
    fidelity,
    fidelity_rewards,
    make_fidelity_reward,
    thurstone_probability,
)

UPPER = math.sqrt(1 + EPS) + math.sqrt(EPS)  # 1.0010005: reached at p* = p_k = 1
LOWER = 2 * math.sqrt(EPS)  # 0.002: reached at p* = 1, p_k = 0 (a parsed rollout never gets less)

# a = [3, 4]: mu 3.5, var 0.5;  b = [2, 3]: mu 2.5, var 0.5;  sqrt(var_a + var_b + gamma) = 1.0000005
# a's 3 vs b: z = 0.5 / 1.0000005, p = 0.6914624, r = sqrt(p + 1e-6) + 1e-3 = 0.8325428 (p* = 1)
# a's 4 vs b: z = 1.5 / 1.0000005, p = 0.9331927, r = 0.9670195
# b's 2 vs a: z = -1.5 / 1.0000005, p = 0.0668073, r = 1e-3 + sqrt(1 - p + 1e-6) = 0.9670195 (p* = 0)
EQUAL_VAR_A = [0.83254276694451616, 0.96701951408497096]
EQUAL_VAR_B = [0.96701951408497096, 0.83254276694451616]


def test_p_star_one_and_zero_equal_variances() -> None:
    rewards = fidelity_rewards({"a": [3.0, 4.0], "b": [2.0, 3.0]}, {("a", "b"): 1.0})
    assert rewards["a"] == pytest.approx(EQUAL_VAR_A, abs=1e-12)
    assert rewards["b"] == pytest.approx(EQUAL_VAR_B, abs=1e-12)


def test_reverse_order_is_derived() -> None:
    given_reversed = fidelity_rewards({"a": [3.0, 4.0], "b": [2.0, 3.0]}, {("b", "a"): 0.0})
    assert given_reversed["a"] == pytest.approx(EQUAL_VAR_A, abs=1e-12)
    assert given_reversed["b"] == pytest.approx(EQUAL_VAR_B, abs=1e-12)


def test_unequal_variances_p_star_zero() -> None:
    # a = [1, 2, 4]: mu 7/3, unbiased var 7/3;  b = [3, 3.5]: mu 3.25, var 0.125;  p*(a, b) = 0
    # a's 1: z = (1 - 3.25) / sqrt(7/3 + 0.125 + 1e-6) = -1.43527, p = 0.0756388, r = 0.9624376
    rewards = fidelity_rewards({"a": [1.0, 2.0, 4.0], "b": [3.0, 3.5]}, {("a", "b"): 0.0})
    expected_a = [0.96243758334338498, 0.88832486449610208, 0.56331975974221784]
    assert rewards["a"] == pytest.approx(expected_a, abs=1e-12)
    assert rewards["b"] == pytest.approx([0.81626301153622081, 0.87940220018399607], abs=1e-12)


def test_tie_peaks_at_one_half() -> None:
    # p* = 0.5 and q = mu_b: p = 0.5, r = 2 sqrt(0.25 + 1e-6) = 1.000002 (just above 1 because of eps)
    rewards = fidelity_rewards({"a": [2.5, 2.0, 3.0], "b": [2.0, 3.0]}, {("a", "b"): 0.5})
    assert rewards["a"][0] == pytest.approx(1.0000019999980000, abs=1e-12)
    assert rewards["a"][0] > max(rewards["a"][1:])


def test_single_parsable_sample_has_zero_variance() -> None:
    # a = [4]: var 0;  b = [2, 3]: mu 2.5, var 0.5;  z = 1.5 / sqrt(0.5 + 1e-6), p = 0.9830525
    rewards = fidelity_rewards({"a": [4.0], "b": [2.0, 3.0]}, {("a", "b"): 1.0})
    assert rewards["a"] == pytest.approx([0.99249053653571074], abs=1e-12)
    # b vs mu_a = 4: b's 2: z = -2 / sqrt(0.5 + 1e-6), p = 0.0023389, r = 0.9998304
    assert rewards["b"] == pytest.approx([0.99983037190628086, 0.96087040214875492], abs=1e-12)


def test_unparsable_rollout_gets_zero_and_is_left_out_of_stats() -> None:
    rewards = fidelity_rewards({"a": [3.0, None, 4.0], "b": [2.0, 3.0]}, {("a", "b"): 1.0})
    assert rewards["a"] == pytest.approx([EQUAL_VAR_A[0], 0.0, EQUAL_VAR_A[1]], abs=1e-12)
    # b sees mu_a = 3.5, var_a = 0.5 (from 3 and 4 only), exactly as if the None were not there
    assert rewards["b"] == pytest.approx(EQUAL_VAR_B, abs=1e-12)
    # whereas a real third score moves mu_a and so b's rewards
    assert fidelity_rewards({"a": [3.0, 1.0, 4.0], "b": [2.0, 3.0]}, {("a", "b"): 1.0})["b"] != pytest.approx(
        EQUAL_VAR_B, abs=1e-6
    )


def test_absent_partner_is_skipped_and_no_partner_gives_zero() -> None:
    prefs = {("a", "b"): 1.0, ("a", "c"): 0.0, ("d", "e"): 1.0}
    rewards = fidelity_rewards({"a": [3.0, 4.0], "b": [2.0, 3.0], "d": [3.0, 5.0]}, prefs)
    assert rewards["a"] == pytest.approx(EQUAL_VAR_A, abs=1e-12)  # c is not in the step
    assert rewards["d"] == [0.0, 0.0]  # its only partner e is absent


def test_partner_with_nothing_parsed_counts_as_absent() -> None:
    rewards = fidelity_rewards({"a": [3.0, 4.0], "b": [None, None]}, {("a", "b"): 1.0})
    assert rewards == {"a": [0.0, 0.0], "b": [0.0, 0.0]}


def test_mean_over_present_partners() -> None:
    # c = [4, 5]: mu 4.5, var 0.5, p*(a, c) = 0. a's 3 vs c: z = -1.5/1.0000005, r = 0.9670195;
    # a's 4 vs c: z = -0.5/1.0000005, r = 0.8325428. Mean with the b terms above.
    rewards = fidelity_rewards(
        {"a": [3.0, 4.0], "b": [2.0, 3.0], "c": [4.0, 5.0]}, {("a", "b"): 1.0, ("a", "c"): 0.0}
    )
    mean = (0.83254276694451616 + 0.96701951408497096) / 2
    assert rewards["a"] == pytest.approx([mean, mean], abs=1e-12)


def test_invalid_preferences_raise() -> None:
    with pytest.raises(ValueError, match="disagree"):
        fidelity_rewards({}, {("a", "b"): 1.0, ("b", "a"): 1.0})
    with pytest.raises(ValueError, match="itself"):
        fidelity_rewards({}, {("a", "a"): 0.5})
    with pytest.raises(ValueError, match="probability"):
        fidelity_rewards({}, {("a", "b"): 1.5})


def test_documented_bounds_are_attained() -> None:
    assert fidelity(1.0, 1.0) == pytest.approx(UPPER, abs=1e-15)
    assert pytest.approx(1.0010005, abs=1e-7) == UPPER
    assert fidelity(1.0, 0.0) == pytest.approx(LOWER, abs=1e-15)


def test_one_rollout_up_can_lower_its_reward() -> None:
    # Documented: var(a) moves with the rollout. a = [q, 3, 3] vs b at 4 with p* = 1: q = 1 widens the
    # spread and gives a sizeable p, q = 2.9 shrinks it and p falls to about Phi(-19).
    prefs = {("a", "b"): 1.0}
    low = fidelity_rewards({"a": [1.0, 3.0, 3.0], "b": [4.0, 4.0]}, prefs)["a"][0]
    high = fidelity_rewards({"a": [2.9, 3.0, 3.0], "b": [4.0, 4.0]}, prefs)["a"][0]
    assert high < low


scores = st.floats(1.0, 5.0, allow_nan=False)
rollouts = st.lists(st.one_of(scores, st.none()), min_size=1, max_size=6)
probabilities = st.floats(0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(rollouts, rollouts, rollouts, probabilities, probabilities)
def test_reward_bounds(a: list, b: list, c: list, p_ab: float, p_ac: float) -> None:
    rewards = fidelity_rewards({"a": a, "b": b, "c": c}, {("a", "b"): p_ab, ("a", "c"): p_ac})
    for image, values in rewards.items():
        assert len(values) == len({"a": a, "b": b, "c": c}[image])
        for value in values:
            assert value == 0.0 or LOWER - 1e-12 <= value <= UPPER + 1e-12


@settings(max_examples=300, deadline=None)
@given(scores, scores, st.floats(0.0, 4.0), scores, st.floats(0.0, 4.0))
def test_monotone_with_stats_fixed(q1: float, q2: float, own_var: float, mu: float, var: float) -> None:
    partner = GroupStats(mu, var)
    low, high = sorted((q1, q2))
    assert fidelity(1.0, thurstone_probability(high, own_var, partner)) >= fidelity(
        1.0, thurstone_probability(low, own_var, partner)
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(scores, min_size=1, max_size=6), st.lists(scores, min_size=1, max_size=6), st.floats(0, 3))
def test_shifting_a_group_up_never_lowers_its_rewards(a: list[float], b: list[float], shift: float) -> None:
    prefs = {("a", "b"): 1.0}
    before = fidelity_rewards({"a": a, "b": b}, prefs)["a"]
    after = fidelity_rewards({"a": [q + shift for q in a], "b": b}, prefs)["a"]
    assert all(x >= y - 1e-12 for x, y in zip(after, before, strict=True))


@settings(max_examples=300, deadline=None)
@given(rollouts, rollouts, probabilities)
def test_symmetric_under_swapped_roles(a: list, b: list, p: float) -> None:
    # Mirror scores (q -> 6 - q) and swap roles: b' holds a's mirrored rollouts and p*(b', a') = 1 - p.
    mirror = [[None if q is None else 6.0 - q for q in rows] for rows in (a, b)]
    original = fidelity_rewards({"a": a, "b": b}, {("a", "b"): p})
    swapped = fidelity_rewards({"a2": mirror[1], "b2": mirror[0]}, {("b2", "a2"): 1.0 - p})
    assert swapped["b2"] == pytest.approx(original["a"], abs=1e-9)
    assert swapped["a2"] == pytest.approx(original["b"], abs=1e-9)


def boxed(score: float) -> str:
    return f"<think>fine</think> \\boxed{{{score}}}"


def test_trl_reward_groups_by_image_id_and_keeps_order() -> None:
    reward = make_fidelity_reward({("a", "b"): 1.0})
    assert reward.__name__ == "fidelity"
    completions = [
        [{"role": "assistant", "content": boxed(3.0)}],
        [{"role": "assistant", "content": boxed(2.0)}],
        [{"role": "assistant", "content": "no answer"}],
        [{"role": "assistant", "content": boxed(3.0)}],
        [{"role": "assistant", "content": boxed(4.0)}],
    ]
    out = reward(
        prompts=[[{"role": "user", "content": "..."}]] * 5,
        completions=completions,
        completion_ids=[[1]] * 5,
        image_id=["a", "b", "b", "b", "a"],
        trainer_state=None,
    )
    expected = [EQUAL_VAR_A[0], EQUAL_VAR_B[0], 0.0, EQUAL_VAR_B[1], EQUAL_VAR_A[1]]
    assert out == pytest.approx(expected, abs=1e-12)


def test_trl_reward_plain_text_and_content_parts() -> None:
    reward = make_fidelity_reward({("a", "b"): 1.0})
    parts = [{"role": "assistant", "content": [{"type": "text", "text": boxed(4.0)}]}]
    completions = [boxed(3.0), boxed(2.0), parts, boxed(3.0)]
    out = reward(prompts=["p"] * 4, completions=completions, image_id=list("abab"))
    assert out == pytest.approx([EQUAL_VAR_A[0], EQUAL_VAR_B[0], EQUAL_VAR_A[1], EQUAL_VAR_B[1]], abs=1e-12)


def test_trl_reward_clamps_like_parse_score() -> None:
    # 9 is clamped to 5 by parse_score, so it scores as a 5 would
    reward = make_fidelity_reward({("a", "b"): 1.0})
    rest = [boxed(4), boxed(2), boxed(3)]
    clamped = reward(prompts=["p"] * 4, completions=[boxed(9), *rest], image_id=list("aabb"))
    five = reward(prompts=["p"] * 4, completions=[boxed(5), *rest], image_id=list("aabb"))
    assert clamped == five


def test_trl_reward_needs_image_id() -> None:
    reward = make_fidelity_reward({("a", "b"): 1.0})
    with pytest.raises(ValueError, match="image_id"):
        reward(prompts=["p"], completions=[boxed(3.0)])
