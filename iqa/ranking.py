"""Rank a set of images from pairwise votes: a comparison design, a Bradley-Terry fit, and intervals.

Pairwise judgement is what EvoQuality trains the model to be good at; a user choosing the best of many
renditions wants the whole set in order. The plan spends a vote budget where it matters:

1. every image is compared: the pairs of two random cycles through the set (each image in at least
   two pairs, the comparison graph connected), `first_votes` votes each;
2. the rest of the budget goes, a round at a time, to the pairs of neighbours in the current ranking
   whose order is least certain (smallest gap in latent score over its standard error), two votes at
   a time (one per image order), refitting after each round.

The fit is Bradley-Terry maximum a posteriori, P(i beats j) = sigmoid(s_i - s_j), with a weak Gaussian
prior (sd `PRIOR_SD`) on every latent score, which fixes the scale's origin and keeps a set with an
unbeaten image finite; scipy's L-BFGS finds it. Intervals are the Laplace approximation: the inverse of
the negative log posterior's Hessian at the optimum gives each score's standard error, for the scores
centred to mean 0 (only differences are identified).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special

PRIOR_SD = 3.0  # weak: a 3-logit spread is P = 0.95 between two images one sd apart
Z95 = 1.959964


@dataclass
class PairTally:
    """Votes between images i and j (indices into the set), summed over the rounds of the plan."""

    i: int
    j: int
    wins_i: int = 0
    wins_j: int = 0
    invalid: int = 0

    @property
    def votes(self) -> int:
        return self.wins_i + self.wins_j + self.invalid


@dataclass(frozen=True)
class RankFit:
    """Latent scores (log-odds scale) and their standard errors, one per image of the set."""

    scores: list[float]
    std_errors: list[float]

    def order(self) -> list[int]:
        """Image indices, best first (ties broken by index)."""
        return sorted(range(len(self.scores)), key=lambda k: (-self.scores[k], k))


@dataclass
class RankPlan:
    """The tallies of a ranking so far, and what was fitted from them."""

    n: int
    tallies: dict[tuple[int, int], PairTally] = field(default_factory=dict)
    fit: RankFit | None = None

    def tally(self, i: int, j: int) -> PairTally:
        key = (min(i, j), max(i, j))
        if key not in self.tallies:
            self.tallies[key] = PairTally(*key)
        return self.tallies[key]

    @property
    def votes(self) -> int:
        return sum(t.votes for t in self.tallies.values())


def design_pairs(n: int, seed: int) -> list[tuple[int, int]]:
    """The first pairs: the edges of two random cycles through all n images (deduplicated), so every
    image meets at least two others and the comparison graph is connected."""
    if n < 2:
        raise ValueError("ranking needs at least two images")
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    for _ in range(2):
        cycle = list(range(n))
        rng.shuffle(cycle)
        for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            if a != b:
                pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def fit_bradley_terry(n: int, tallies: Sequence[PairTally], prior_sd: float = PRIOR_SD) -> RankFit:
    """MAP Bradley-Terry scores with a Gaussian prior, and Laplace standard errors."""
    i = np.array([t.i for t in tallies], dtype=int)
    j = np.array([t.j for t in tallies], dtype=int)
    wins_i = np.array([t.wins_i for t in tallies], dtype=float)
    wins_j = np.array([t.wins_j for t in tallies], dtype=float)
    total = wins_i + wins_j
    precision = 1.0 / prior_sd**2

    def objective(s: np.ndarray) -> tuple[float, np.ndarray]:
        d = s[i] - s[j]
        # -log P(data): wins_i * -log sigmoid(d) + wins_j * -log sigmoid(-d)
        value = float(np.sum(wins_i * np.logaddexp(0, -d) + wins_j * np.logaddexp(0, d)))
        value += 0.5 * precision * float(s @ s)
        p = special.expit(d)
        residual = total * p - wins_i  # d(value)/d(d)
        grad = precision * s
        np.add.at(grad, i, residual)
        np.add.at(grad, j, -residual)
        return value, grad

    result = optimize.minimize(objective, np.zeros(n), jac=True, method="L-BFGS-B")
    s = result.x
    p = special.expit(s[i] - s[j])
    weight = total * p * (1 - p)
    hessian = precision * np.eye(n)
    np.add.at(hessian, (i, i), weight)
    np.add.at(hessian, (j, j), weight)
    np.add.at(hessian, (i, j), -weight)
    np.add.at(hessian, (j, i), -weight)
    # Scores are only defined up to a shift; the prior alone pins the origin, with an uncertainty of
    # about PRIOR_SD / sqrt(n) that says nothing about the images. Report them centred (mean 0), with
    # the covariance of the centred scores.
    centre = np.eye(n) - 1.0 / n
    covariance = centre @ np.linalg.inv(hessian) @ centre
    centred = s - s.mean()
    return RankFit(centred.tolist(), np.sqrt(np.clip(np.diag(covariance), 0, None)).tolist())


def closest_neighbours(fit: RankFit, count: int) -> list[tuple[int, int]]:
    """Up to `count` pairs of neighbours in the ranking, least certain first (gap / its standard error)."""
    order = fit.order()
    neighbours = list(itertools.pairwise(order))

    def certainty(pair: tuple[int, int]) -> float:
        a, b = pair
        spread = math.hypot(fit.std_errors[a], fit.std_errors[b]) or 1.0
        return abs(fit.scores[a] - fit.scores[b]) / spread

    return sorted(neighbours, key=certainty)[:count]


Vote = Callable[[int, int, int], Awaitable[tuple[int, int, int]]]  # (i, j, votes) -> (for i, for j, bad)


async def rank(n: int, budget: int, first_votes: int, vote: Vote, seed: int = 0) -> RankPlan:
    """Run the plan: the design pairs at `first_votes` each, then two-vote rounds on the closest
    neighbours until `budget` votes are spent; `vote(i, j, k)` casts k votes (order randomised)."""

    plan = RankPlan(n)

    async def cast(pairs: Sequence[tuple[int, int]], k: int) -> None:
        counts = await asyncio.gather(*(vote(a, b, k) for a, b in pairs))
        for (a, b), (for_a, for_b, bad) in zip(pairs, counts, strict=True):
            tally = plan.tally(a, b)
            if tally.i == a:
                tally.wins_i += for_a
                tally.wins_j += for_b
            else:
                tally.wins_i += for_b
                tally.wins_j += for_a
            tally.invalid += bad

    await cast(design_pairs(n, seed), first_votes)
    plan.fit = fit_bradley_terry(n, list(plan.tallies.values()))
    while budget - plan.votes >= 2:
        pairs = closest_neighbours(plan.fit, max(1, (budget - plan.votes) // 2))
        pairs = pairs[: (budget - plan.votes) // 2]
        await cast(pairs, 2)
        plan.fit = fit_bradley_terry(n, list(plan.tallies.values()))
    return plan


def interval(fit: RankFit, k: int) -> tuple[float, float]:
    """The 95% interval of image k's latent score."""
    return fit.scores[k] - Z95 * fit.std_errors[k], fit.scores[k] + Z95 * fit.std_errors[k]
