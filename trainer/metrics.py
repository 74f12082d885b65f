"""How good a model's scores are: correlations with MOS, and the label-free checks that gate a round.

Undefined values (constant input, too few items, nothing to count) come back as NaN rather than
raising, so a report can still be written; a gate comparing NaN against a threshold fails, as it should.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

from trainer.voting import PairLabel


def correlations(pred: Sequence[float | None], mos: Sequence[float]) -> dict[str, float | int]:
    """PLCC, SRCC and KRCC between predictions and MOS, over the items where both are finite (n)."""
    if len(pred) != len(mos):
        raise ValueError(f"{len(pred)} predictions but {len(mos)} MOS values")
    kept = [(p, m) for p, m in zip(pred, mos, strict=True) if _finite(p) and _finite(m)]
    result: dict[str, float | int] = {"plcc": math.nan, "srcc": math.nan, "krcc": math.nan, "n": len(kept)}
    if len(kept) < 2:
        return result
    x, y = np.array(kept, dtype=float).T
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # correlation undefined; scipy would warn and give NaN
        return result
    result["plcc"] = float(stats.pearsonr(x, y).statistic)
    result["srcc"] = float(stats.spearmanr(x, y).statistic)
    result["krcc"] = float(stats.kendalltau(x, y).statistic)
    return result


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def pseudo_label_agreement(scores: Mapping[Hashable, float | None], labels: Sequence[PairLabel]) -> float:
    """Share of decided held-out pairs whose order the scores reproduce; an equal score counts half.

    Tied labels say nothing about order and are skipped, as are pairs missing a score (those show in
    the parse-failure rate). NaN when no pair is left.
    """
    credit = 0.0
    counted = 0
    for label in labels:
        score_i, score_j = scores.get(label.i), scores.get(label.j)
        if label.tie or score_i is None or score_j is None:
            continue
        counted += 1
        if score_i == score_j:
            credit += 0.5
        elif (score_i > score_j) == (label.votes_i > label.votes_j):
            credit += 1.0
    return credit / counted if counted else math.nan


def soft_pseudo_label_agreement(
    samples: Mapping[Hashable, Sequence[float]], labels: Sequence[PairLabel]
) -> float:
    """Mean, over decided held-out pairs, of the chance that a sampled score of the preferred image
    beats one of the other (a tie counts half): agreement read from every sample, not just the means,
    so it moves smoothly where two means are close. NaN when no pair has parsed samples on both sides.
    """
    credit: list[float] = []
    for label in labels:
        a, b = samples.get(label.i) or [], samples.get(label.j) or []
        if label.tie or not a or not b:
            continue
        if label.votes_j > label.votes_i:
            a, b = b, a
        diff = np.subtract.outer(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        credit.append(float((diff > 0).mean() + 0.5 * (diff == 0).mean()))
    return statistics.fmean(credit) if credit else math.nan


def read_pair_agreement(
    readings: Mapping[Hashable, tuple[float, float] | None], labels: Sequence[PairLabel], gamma: float = 1e-6
) -> list[float | None]:
    """Per held-out pair, the Thurstone chance that the preferred image beats the other under the
    model's read score distributions (mean, std): Phi((mu_w - mu_l) / sqrt(var_w + var_l + gamma)), the
    reward's own model of a comparison. None for tied labels and unread images. Deterministic and
    smooth, so a before/after difference per pair is the model's change, not sampling noise.
    """
    return [
        None
        if pair is None
        else float(
            stats.norm.cdf((pair[0][0] - pair[1][0]) / math.sqrt(pair[0][1] ** 2 + pair[1][1] ** 2 + gamma))
        )
        for pair in _winner_first(readings, labels)
    ]


def read_pair_order(
    readings: Mapping[Hashable, tuple[float, float] | None], labels: Sequence[PairLabel]
) -> list[float | None]:
    """Per held-out pair, whether the model's read mean puts the preferred image first (1), last (0) or
    level with the other (0.5). None for tied labels and unread images. Unlike `read_pair_agreement` it
    does not move when a model only grows surer (narrower read distributions) or rescales its scores:
    only a change of order counts, which is what a round must teach.
    """
    return [
        None if pair is None else 1.0 if pair[0][0] > pair[1][0] else 0.0 if pair[0][0] < pair[1][0] else 0.5
        for pair in _winner_first(readings, labels)
    ]


def _winner_first(
    readings: Mapping[Hashable, tuple[float, float] | None], labels: Sequence[PairLabel]
) -> list[tuple[tuple[float, float], tuple[float, float]] | None]:
    """Per label, the (winner's, loser's) readings by the votes; None for tied labels and unread images."""
    pairs: list[tuple[tuple[float, float], tuple[float, float]] | None] = []
    for label in labels:
        a, b = readings.get(label.i), readings.get(label.j)
        if label.tie or a is None or b is None:
            pairs.append(None)
        else:
            pairs.append((b, a) if label.votes_j > label.votes_i else (a, b))
    return pairs


def parse_failure_rate(n_invalid: int, n_total: int) -> float:
    """Share of unparsable completions; NaN when there were none at all."""
    if not 0 <= n_invalid <= n_total:
        raise ValueError(f"invalid count {n_invalid} must be between 0 and the total {n_total}")
    return n_invalid / n_total if n_total else math.nan


def score_spread(scores: Mapping[Hashable, float | None]) -> float:
    """Population std of the per-image mean scores (None left out); near 0 means the model collapsed.

    NaN with fewer than two scored images.
    """
    values = [s for s in scores.values() if s is not None]
    return statistics.pstdev(values) if len(values) >= 2 else math.nan
