"""The gate a new checkpoint must pass before it may replace the serving one.

Without labels a round is judged on what it can measure (see the spec's Evaluation section): agreement
with held-out pseudo-labels (pairs voted but kept out of training) must RISE, answers must stay
parsable, and scores must keep their spread across images (a model that gives every image the same
score has collapsed). With a labelled validation set configured, SRCC on it must not drop either.

The spread is checked twice: an absolute floor on the sampled spread, and, where the round read the
held-out scores, the read spread may not shrink below `min_spread_ratio` of the active model's. Training
on labels that carry no information (the organism's shuffled-label control) can pull every score toward
a common value: on the organism's held-out images a control round 1 cut the spread by 24-45%, while real
rounds 1 widened it by 54-113% (bench/results, 2026-12-04).

Agreement is read, not sampled, where the round read the held-out scores in one pass (`iqa.reading`):
per pair, the Thurstone chance that the preferred image wins under the read score distributions, so
before and after can be compared pair by pair. Sampled agreement flipped with sampling noise: on the
model organism a round that lifted true SRCC by 0.10 read as a drop at 4 samples.

The mean per-pair gain must exceed a least practical gain (`min_agreement_gain`, 0.02) by `agreement_z`
standard errors. Significance alone is not enough: the chance also rises, for every pair already in
the voted order, when a model only grows surer, so a round that learned nothing moves every pair a
little the same way and its paired standard error is tiny. Two shuffled-label control rounds passed a
gain of 0 that way (+0.009, standard errors 0.002-0.003; session 21), while the real rounds 1 of that
run gained 0.033-0.159. The 0.02 proposed then was checked on fresh bases (seeds 3-5, session 22,
bench/results/organism-2026-12-04-gate.md): it refused every control round and promoted every real
round 1. Counting only the pairs whose read ORDER changed (`holdout_order_pairs`, also recorded) is
immune to growing surer, but on 70-145 held-out pairs it had too little power: it refused real rounds
that raised true SRCC by 0.064.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateThresholds:
    """How much worse than the active model a candidate may look on each check."""

    # Candidate agreement > active agreement + this (negative: it may fall). 0.02: see the module's doc.
    min_agreement_gain: float = 0.02
    # With per-pair readings, the mean per-pair gain must exceed min_agreement_gain by this many standard
    # errors of it (one-sided; 1.645: a 5% chance that a model no better than that passes).
    agreement_z: float = 1.645
    max_parse_failure: float = 0.10
    min_spread: float = 0.05  # std of per-image mean scores, on the 1-5 scale; 0 switches it off
    # The candidate's read spread must keep this share of the active model's (a partial collapse); checked
    # only when the active model's read spread reaches `min_spread` (the untrained demo reads ~0.002).
    min_spread_ratio: float = 0.8
    srcc_tolerance: float = 0.0


@dataclass(frozen=True)
class GateVerdict:
    """Whether the candidate passed, and why not."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data: undefined (NaN) metrics become None."""
        return _without_nan(asdict(self))


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def judge(active: dict[str, Any], candidate: dict[str, Any], thresholds: GateThresholds) -> GateVerdict:
    """Compare the metrics of the active model and the candidate on the same held-out data.

    Both dicts carry `agreement`, `parse_failure_rate`, `spread`, and optionally `srcc` (labelled set),
    `read_spread` and `agreement_pairs` (per-pair read agreement, same pairs in the same order): with
    those, the gain must beat `min_agreement_gain` by `agreement_z` standard errors of the paired gain,
    so a round that only perturbs the model does not pass by chance. A metric the candidate cannot
    produce (NaN) fails its check.
    """
    reasons: list[str] = []
    checks: dict[str, Any] = {}

    agreement, base_agreement = candidate.get("agreement"), active.get("agreement")
    checks["agreement"] = {"active": base_agreement, "candidate": agreement}
    if not _finite(agreement) and not _finite(base_agreement):
        # No decided held-out pair (all ties) or no parsable score from either: nothing to compare.
        checks["agreement"]["skipped"] = "no decided held-out pair could be scored by either model"
    elif not _finite(agreement):
        reasons.append("no held-out agreement could be measured for the candidate")
    elif _finite(base_agreement):
        needed = thresholds.min_agreement_gain
        paired = paired_gain(active.get("agreement_pairs"), candidate.get("agreement_pairs"))
        if paired is not None:
            gain, standard_error, n = paired
            needed += thresholds.agreement_z * standard_error  # one-sided test of gain > min gain
            checks["agreement"] |= {"pairs": n, "gain": gain, "standard_error": standard_error}
        checks["agreement"]["needed_gain"] = needed
        if not agreement > base_agreement + needed:
            reasons.append(
                f"held-out agreement did not rise enough: {base_agreement:.3f} -> {agreement:.3f} "
                f"(needs a gain above {needed:+.3f})"
            )

    failure = candidate.get("parse_failure_rate")
    if not _finite(failure) or failure > thresholds.max_parse_failure:
        reasons.append(f"parse-failure rate {failure} is above {thresholds.max_parse_failure}")
    checks["parse_failure_rate"] = {"candidate": failure, "max": thresholds.max_parse_failure}

    spread = candidate.get("spread")
    # min_spread 0 switches the check off: then an unmeasurable spread (fewer than two images with a
    # parsed answer) is no reason either; the parse-failure check speaks for such a candidate.
    if thresholds.min_spread > 0 and (not _finite(spread) or spread < thresholds.min_spread):
        reasons.append(f"score spread {spread} is below {thresholds.min_spread}: the model has collapsed")
    checks["spread"] = {"active": active.get("spread"), "candidate": spread, "min": thresholds.min_spread}

    read_spread, base_read_spread = candidate.get("read_spread"), active.get("read_spread")
    if _finite(base_read_spread) and base_read_spread >= thresholds.min_spread:
        floor = thresholds.min_spread_ratio * base_read_spread
        checks["read_spread"] = {"active": base_read_spread, "candidate": read_spread, "min": floor}
        if not _finite(read_spread) or read_spread < floor:
            read_spread = read_spread if _finite(read_spread) else math.nan
            reasons.append(
                f"read score spread shrank from {base_read_spread:.3f} to {read_spread:.3f} (below "
                f"{thresholds.min_spread_ratio:.0%} of it): scores pulled to one value, a partial collapse"
            )

    if "srcc" in active or "srcc" in candidate:
        srcc, base_srcc = candidate.get("srcc"), active.get("srcc")
        if not _finite(srcc):
            reasons.append("SRCC on the validation set could not be measured for the candidate")
        elif _finite(base_srcc) and srcc < base_srcc - thresholds.srcc_tolerance:
            reasons.append(f"validation SRCC fell from {base_srcc:.3f} to {srcc:.3f}")
        checks["srcc"] = {"active": base_srcc, "candidate": srcc}

    return GateVerdict(not reasons, reasons, checks)


def paired_gain(before: Any, after: Any) -> tuple[float, float, int] | None:
    """(mean gain, its standard error, pairs) over the pairs both models read; None without two lists."""
    if not isinstance(before, list) or not isinstance(after, list) or len(before) != len(after):
        return None
    gains = [b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    if len(gains) < 2:
        return None
    return statistics.fmean(gains), statistics.stdev(gains) / math.sqrt(len(gains)), len(gains)


def gate_inputs(metrics: dict[str, Any]) -> dict[str, Any]:
    """The gate's inputs from a round manifest's `before` or `after` metrics (null becomes NaN).

    Agreement is the deterministic read one (with its per-pair values) where the round read the scores,
    else the soft sampled one, else the agreement of mean scores (older manifests). Spread stays the
    sampled one: the untrained demo reads almost the same score for every image (spread about 0.002),
    and would be refused as collapsed by a read spread.
    """

    def value(key: str) -> float:
        v = metrics.get(key)
        return math.nan if v is None else float(v)

    inputs: dict[str, Any] = {
        "agreement": value("holdout_agreement"),
        "parse_failure_rate": value("parse_failure_rate"),
        "spread": value("score_spread"),
    }
    if metrics.get("holdout_soft_agreement") is not None:
        inputs["agreement"] = float(metrics["holdout_soft_agreement"])
    if "holdout_read_pairs" in metrics:
        inputs["agreement"] = value("holdout_read_agreement")
        inputs["agreement_pairs"] = metrics["holdout_read_pairs"]
        inputs["read_spread"] = value("read_spread")
    return inputs
