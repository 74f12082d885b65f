"""The EvoQuality fidelity reward (VisualQuality-R1's reward with voted pseudo-labels in place of MOS).

For a training step, each image x has G sampled `c_score` rollouts; from the parsable ones
mu(x) = mean and var(x) = unbiased variance (0 when fewer than 2 parsed). Sample k of x_i beats a
partner x_j with the Thurstone probability

    p_k(x_i, x_j) = Phi((q_k(x_i) - mu(x_j)) / sqrt(var(x_i) + var(x_j) + GAMMA))

and earns, averaged over the partners of x_i present in the same step,

    r_k(x_i) = mean_j [ sqrt(p* p_k + EPS) + sqrt((1 - p*)(1 - p_k) + EPS) ].

Edge cases (the spec leaves the first two open): an unparsable rollout gets 0 and is left out of mu
and var; an image with no partner in the step gets 0 for every rollout (nothing to compare with, so
the group has zero advantage); a partner whose rollouts are all unparsable has no mu and counts as
absent.

Bounds: without EPS the bracket is a Bhattacharyya coefficient, in [0, 1]. With EPS it lies in
[2 sqrt(EPS), sqrt(1 + EPS) + sqrt(EPS)] = [0.002, ~1.0010005]; the maximum is reached at p* = p_k = 1
(or 0). The paper's "in [0, 1]" is this up to EPS; we do not clip, to match the reference formula.

Raising a single rollout's score also changes var(x_i), so the reward is monotone in q_k only with
var(x_i) and the partner's statistics held fixed (e.g. shifting the whole group), not per rollout.

How GRPO uses it: the trainer builds `make_fidelity_reward(preferences)` from the voted labels and
passes it to TRL's GRPOTrainer as a reward function; its dataset has an `image_id` column, and a
pair-aware sampler puts both images of each pair (with all their G generations) in the same
generation batch, so partners are present when the reward is computed. TRL computes rewards per
process on that process's share of the batch: with several processes, pairs must not be split
across them. TRL then standardises the rewards within each group.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from iqa.prompts import parse_score
from iqa.settings import PromptProfile

EPS = 1e-6
GAMMA = 1e-6


@dataclass(frozen=True)
class GroupStats:
    """Mean and unbiased variance of one image's parsable rollout scores in a step."""

    mean: float
    var: float


def group_stats(scores: Sequence[float | None]) -> GroupStats | None:
    """Stats of the parsed scores (None left out); None when nothing parsed, var 0 for one score."""
    parsed = [s for s in scores if s is not None]
    if not parsed:
        return None
    var = statistics.variance(parsed) if len(parsed) >= 2 else 0.0
    return GroupStats(statistics.fmean(parsed), var)


def thurstone_probability(q: float, self_var: float, partner: GroupStats) -> float:
    """P(a sample scored q of an image with variance self_var beats the partner), Thurstone case V."""
    z = (q - partner.mean) / math.sqrt(self_var + partner.var + GAMMA)
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def fidelity(p_star: float, p_k: float) -> float:
    """Fidelity between the pseudo-label p* and the model's probability p_k (1 when they agree)."""
    return math.sqrt(p_star * p_k + EPS) + math.sqrt((1.0 - p_star) * (1.0 - p_k) + EPS)


def symmetric_preferences(preferences: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Both orders of every pair: p*(j, i) = 1 - p*(i, j); conflicting given orders raise ValueError."""
    full: dict[tuple[str, str], float] = {}
    for (i, j), p in preferences.items():
        if i == j:
            raise ValueError(f"p*({i!r}, {j!r}) pairs an image with itself")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p*({i!r}, {j!r}) = {p} is not a probability in [0, 1]")
        for key, value in (((i, j), p), ((j, i), 1.0 - p)):
            if key in full and not math.isclose(full[key], value, abs_tol=1e-9):
                raise ValueError(f"p*{key!r} is given as {full[key]} and as {value}: the orders disagree")
            full[key] = value
    return full


PartnerMap = dict[str, list[tuple[str, float]]]


def partner_map(preferences: Mapping[tuple[str, str], float]) -> PartnerMap:
    """For every image, its partners j with p*(image, j), both orders derived."""
    partners: PartnerMap = {}
    for (i, j), p in symmetric_preferences(preferences).items():
        partners.setdefault(i, []).append((j, p))
    return partners


def fidelity_rewards(
    scores_by_image: Mapping[str, Sequence[float | None]],
    preferences: Mapping[tuple[str, str], float],
) -> dict[str, list[float]]:
    """Reward of every rollout in one step, keyed like `scores_by_image` (None = unparsable rollout).

    `preferences` holds p*(x_i, x_j) for ordered pairs; the reverse order is derived. Only partners
    present in `scores_by_image` (with at least one parsed rollout) count.
    """
    return _rewards(scores_by_image, partner_map(preferences))


def _rewards(
    scores_by_image: Mapping[str, Sequence[float | None]], partners: PartnerMap
) -> dict[str, list[float]]:
    stats = {image: group_stats(scores) for image, scores in scores_by_image.items()}
    rewards: dict[str, list[float]] = {}
    for image, scores in scores_by_image.items():
        own = stats[image]
        present = [(s, p) for j, p in partners.get(image, []) if (s := stats.get(j)) is not None]
        if own is None or not present:
            rewards[image] = [0.0] * len(scores)
            continue
        rewards[image] = [0.0 if q is None else _sample_reward(q, own.var, present) for q in scores]
    return rewards


def _sample_reward(q: float, own_var: float, present: list[tuple[GroupStats, float]]) -> float:
    return statistics.fmean(fidelity(p, thurstone_probability(q, own_var, other)) for other, p in present)


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a TRL completion: a plain string, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    assistant = [m for m in completion if m.get("role") == "assistant"]
    if not assistant:
        return ""
    content = assistant[-1].get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def make_fidelity_reward(
    preferences: Mapping[tuple[str, str], float], profile: PromptProfile = "evoquality"
) -> Callable[..., list[float]]:
    """A TRL reward function over the completions of one generation batch.

    Completions are grouped by the `image_id` dataset column (rows of one image are its G rollouts),
    scored with `parse_score`, and rewarded against the partners present in the same call.
    """
    partners = partner_map(preferences)

    def reward(
        prompts: list[Any],
        completions: list[str | list[dict[str, Any]]],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        image_ids = kwargs.get("image_id")
        if image_ids is None or len(image_ids) != len(completions):
            raise ValueError("the fidelity reward needs an `image_id` dataset column, one per completion")
        scores_by_image: dict[str, list[float | None]] = {}
        slots: list[tuple[str, int]] = []
        for image_id, completion in zip(image_ids, completions, strict=True):
            group = scores_by_image.setdefault(image_id, [])
            slots.append((image_id, len(group)))
            group.append(parse_score(completion_text(completion), profile))
        by_image = _rewards(scores_by_image, partners)
        return [by_image[image_id][k] for image_id, k in slots]

    reward.__name__ = "fidelity"
    return reward
