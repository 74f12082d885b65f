"""The ranking plan and fit (iqa.ranking) against simulated voters whose true order is known."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest
from scipy import stats

from iqa.ranking import PairTally, design_pairs, fit_bradley_terry, interval, rank


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64])
def test_the_first_design_meets_every_image_twice_and_is_connected(n: int) -> None:
    pairs = design_pairs(n, seed=1)
    degree = [0] * n
    for a, b in pairs:
        assert a < b
        degree[a] += 1
        degree[b] += 1
    assert min(degree) >= (1 if n == 2 else 2)
    assert len(pairs) == len(set(pairs)) <= 2 * n
    reached, frontier = {0}, [0]  # the comparison graph is connected
    while frontier:
        k = frontier.pop()
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                if x == k and y not in reached:
                    reached.add(y)
                    frontier.append(y)
    assert reached == set(range(n))


def test_the_fit_orders_by_wins_and_is_centred_by_its_prior() -> None:
    tallies = [PairTally(0, 1, 8, 2), PairTally(1, 2, 7, 3), PairTally(0, 2, 9, 1)]
    fit = fit_bradley_terry(3, tallies)
    assert fit.order() == [0, 1, 2]
    assert sum(fit.scores) == pytest.approx(0.0, abs=1e-4)
    # One pair: the MAP difference solves wins_i (1 - p) = wins_j p + d / prior_var.
    (only,) = [PairTally(0, 1, 6, 2)]
    fit = fit_bradley_terry(2, [only], prior_sd=1e6)  # prior negligible: the MLE, log(6/2)
    assert fit.scores[0] - fit.scores[1] == pytest.approx(math.log(3), abs=1e-3)


def test_an_unbeaten_image_stays_finite_and_its_interval_is_wide() -> None:
    fit = fit_bradley_terry(3, [PairTally(0, 1, 4, 0), PairTally(1, 2, 2, 2)])
    assert all(math.isfinite(s) for s in fit.scores)
    assert fit.order()[0] == 0
    low, high = interval(fit, 0)
    assert low < fit.scores[0] < high


def simulated_voter(truth: list[float], seed: int):
    """Votes by Thurstone noise around true qualities: closer images are harder to tell apart."""
    rng = random.Random(seed)

    async def vote(i: int, j: int, k: int) -> tuple[int, int, int]:
        p = float(stats.norm.cdf(truth[i] - truth[j]))
        wins = sum(rng.random() < p for _ in range(k))
        return wins, k - wins, 0

    return vote


def test_a_ranking_recovers_the_true_order_and_spends_exactly_its_budget() -> None:
    rng = np.random.default_rng(0)
    truth = sorted(rng.normal(0, 1.0, 12).tolist())
    plan = asyncio.run(rank(12, 400, 2, simulated_voter(truth, 1)))
    assert plan.votes == 400
    order = plan.fit.order()
    rho = stats.spearmanr([truth[k] for k in order], range(12, 0, -1)).statistic
    assert rho > 0.9, rho
    # Most extra votes went to neighbours in the ranking (the uncertain pairs), not spread evenly.
    design = set(design_pairs(12, 0))
    extra = {key: t.votes for key, t in plan.tallies.items() if key not in design or t.votes > 2}
    assert extra, "no vote went beyond the first design"


def test_more_votes_narrow_the_intervals() -> None:
    truth = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5]
    small = asyncio.run(rank(6, 24, 2, simulated_voter(truth, 2)))
    large = asyncio.run(rank(6, 600, 2, simulated_voter(truth, 2)))
    assert np.mean(large.fit.std_errors) < 0.6 * np.mean(small.fit.std_errors)
