"""What the organism report measures: correlations with true quality, vote accuracy, pseudo-label
accuracy, and bootstrap intervals that say whether a change is more than the choice of images.

Ground truth is read here only, for the report; a round never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from iqa.engines.hf_loading import load_model
from trainer.checkpoint import resolve_model
from trainer.metrics import correlations
from trainer.organism.data import Sample
from trainer.organism.evaluate import OpinionReader


def load_reader(model: str | Path) -> OpinionReader:
    """An `OpinionReader` over any model folder: a base, a LoRA version or a full version."""
    loaded = load_model(resolve_model(model).spec(), device="cpu", dtype="float32")
    return OpinionReader(loaded.model.eval(), loaded.processor)


def true_pairs(samples: Sequence[Sample], count: int, seed: int) -> list[tuple[int, int]]:
    """`count` random pairs of images of different true quality (fixed for a seed)."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        a, b = (int(v) for v in rng.choice(len(samples), 2, replace=False))
        if samples[a].mos != samples[b].mos:
            pairs.append((a, b))
    return pairs


def partner_pairs(count: int, partners: int, seed: int) -> list[tuple[int, int]]:
    """Every image of `count` paired with `partners` distinct random others (fixed for a seed)."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    for a in range(count):
        others = rng.choice(count - 1, partners, replace=False)
        pairs += [(a, int(b) + (b >= a)) for b in others]  # skip a itself
    return pairs


def voter_ranking(
    reader: OpinionReader, samples: Sequence[Sample], pairs: Sequence[tuple[int, int]]
) -> list[float]:
    """Each image's mean single-vote win probability over the `pairs` it is in: the order the compare
    prompt's votes imply. Rounds teach the score prompt from those votes, so while the voter stays as it
    is, this ranking's agreement with true quality is about as far as label-free rounds can take it."""
    first = reader.first_better([(samples[a].image, samples[b].image) for a, b in pairs])
    wins, counts = np.zeros(len(samples)), np.zeros(len(samples))
    for (a, b), p in zip(pairs, first, strict=True):
        wins[a] += p
        wins[b] += 1.0 - p
        counts[a] += 1
        counts[b] += 1
    return (wins / np.maximum(counts, 1)).tolist()


@dataclass
class LabelledEvaluation:
    """A model's deterministic scores on a labelled split, and what they agree with."""

    scores: list[float]
    correlations: dict[str, float | int]
    by_kind: dict[str, float]  # SRCC within each distortion type (pristine images included)
    vote_accuracy: float  # expected single-vote accuracy on true-ordered pairs
    slopes: dict[str, float]  # see `score_slopes`


def score_slopes(scores: Sequence[float], samples: Sequence[Sample]) -> dict[str, float]:
    """Least-squares slopes of the scores on true quality (`mos`) and on the warm-up's content confound
    (`content`: the reference's warmth), and the scores' spread (`sd`).

    SRCC alone cannot tell learning from shrinking: scores pulled toward a common value lose their
    confound and noise faster than their quality signal, and SRCC rises while the model perceives no
    better (measured: the shuffled-label control). A round that learns raises the `mos` slope."""
    y = np.asarray(scores, dtype=float)
    design = np.column_stack([np.ones(len(samples)), [s.mos for s in samples], [s.warmth for s in samples]])
    (_, mos, content), *_ = np.linalg.lstsq(design, y, rcond=None)
    return {"mos": float(mos), "content": float(content), "sd": float(y.std())}


def evaluate_split(
    reader: OpinionReader, samples: Sequence[Sample], pairs: Sequence[tuple[int, int]]
) -> LabelledEvaluation:
    """Scores, PLCC/SRCC/KRCC, per-type SRCC and single-vote accuracy of one model on one split."""
    scores = reader.expected_scores([s.image for s in samples])
    mos = [s.mos for s in samples]
    by_kind: dict[str, float] = {}
    for kind in sorted({s.kind for s in samples} - {"none"}):
        keep = [k for k, s in enumerate(samples) if s.kind in (kind, "none")]
        by_kind[kind] = float(stats.spearmanr([scores[k] for k in keep], [mos[k] for k in keep]).statistic)
    first = reader.first_better([(samples[a].image, samples[b].image) for a, b in pairs])
    correct = [
        p if samples[a].mos > samples[b].mos else 1 - p for p, (a, b) in zip(first, pairs, strict=True)
    ]
    return LabelledEvaluation(
        scores, correlations(scores, mos), by_kind, float(np.mean(correct)), score_slopes(scores, samples)
    )


def _by_reference(samples: Sequence[Sample]) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for k, s in enumerate(samples):
        groups.setdefault(s.reference, []).append(k)
    return [np.array(v) for v in groups.values()]


def bootstrap(
    samples: Sequence[Sample],
    scores: Mapping[str, Sequence[float]],
    base: str,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """95% intervals of SRCC and PLCC for each model, and of their change from `base`, by resampling
    whole references (images of one reference are not independent) with the same draw for every model."""
    rng = np.random.default_rng(seed)
    groups = _by_reference(samples)
    mos = np.array([s.mos for s in samples])
    arrays = {name: np.asarray(values) for name, values in scores.items()}
    draws: dict[str, dict[str, list[float]]] = {name: {"srcc": [], "plcc": []} for name in arrays}
    for _ in range(resamples):
        idx = np.concatenate([groups[g] for g in rng.integers(len(groups), size=len(groups))])
        for name, values in arrays.items():
            draws[name]["srcc"].append(stats.spearmanr(values[idx], mos[idx]).statistic)
            draws[name]["plcc"].append(stats.pearsonr(values[idx], mos[idx]).statistic)
    out: dict[str, dict[str, float]] = {}
    for name in arrays:
        row: dict[str, float] = {}
        for metric in ("srcc", "plcc"):
            values = np.array(draws[name][metric])
            row[f"{metric}_lo"], row[f"{metric}_hi"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
            delta = values - np.array(draws[base][metric])
            row[f"d{metric}_lo"], row[f"d{metric}_hi"] = (float(v) for v in np.percentile(delta, [2.5, 97.5]))
        out[name] = row
    return out


def pseudo_label_accuracy(
    rows: Sequence[Mapping[str, Any]], truth: Mapping[str, float]
) -> dict[str, float | int]:
    """How the round's votes and majority labels agree with the true order (pairs of equal truth skipped).

    `rows` are the records of a version's `pseudo_labels.json`; `truth` maps image id to true mos.
    Pairs with an image of unknown truth (a round-2 variant) are left out.
    """
    known = [r for r in rows if r["image_i"] in truth and r["image_j"] in truth]
    ordered = [r for r in known if truth[r["image_i"]] != truth[r["image_j"]]]
    decided = [r for r in ordered if r["p_star"] != 0.5]
    right = sum((r["p_star"] > 0.5) == (truth[r["image_i"]] > truth[r["image_j"]]) for r in decided)
    votes = sum(r["votes_i"] + r["votes_j"] for r in ordered)
    right_votes = sum(
        r["votes_i"] if truth[r["image_i"]] > truth[r["image_j"]] else r["votes_j"] for r in ordered
    )
    train = [r for r in decided if r.get("split") == "train"]
    train_right = sum((r["p_star"] > 0.5) == (truth[r["image_i"]] > truth[r["image_j"]]) for r in train)
    return {
        "pairs": len(known),
        "ordered_pairs": len(ordered),
        "decided_pairs": len(decided),
        "label_accuracy": right / len(decided) if decided else math.nan,
        "train_pairs": len(train),
        "train_label_accuracy": train_right / len(train) if train else math.nan,
        "single_vote_accuracy": right_votes / votes if votes else math.nan,
    }
