"""One-pass readings of the model's answer: a deterministic score and comparison without sampling.

Sampled scores (the mean of n reasoning completions) are accurate but noisy and costly: one evaluation
at 16 samples moves by about 0.02 SRCC. A reading skips the reasoning with a forced think-free prefix
(`<think> </think>\\n\\boxed{`, or `<answer>` for the visualquality-r1 profile) and reads the answer's
digit distribution in one forward pass, as Q-Align does: the first digit d in 1..5, then for d in 1..4
the tenths after `d.` (a 5 allows only 5.00). The expected score is `sum_d p(d) (d + E[tenths | d] / 10)`
and its variance comes from the same distribution. A comparison reads `p(0)` against `p(1)` after the
compare prompt, in both image orders, averaged: a model that always answers "0" gets 0.5.

The digits are renormalised among themselves, as a constrained answer would be; `coverage` says how
much of the model's probability they held. The same model and images always give the same numbers,
so a before/after comparison (the gate, the organism's evaluation) has no sampling noise left.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from iqa.engines.base import Engine, ModelSpec, ReadingRequest, ReadingResult
from iqa.prompts import prompt_set
from iqa.settings import PromptProfile

THINK_FREE = "<think> </think>\n"
ANSWER_OPENERS: dict[str, str] = {"evoquality": "\\boxed{", "visualquality-r1": "<answer>"}
DIGITS = tuple(str(d) for d in range(10))
FIRST_DIGITS = (1, 2, 3, 4, 5)


def answer_prefix(profile: PromptProfile) -> str:
    """The assistant-turn text that skips the reasoning and opens the answer."""
    return THINK_FREE + ANSWER_OPENERS[profile]


def score_prefixes(profile: PromptProfile) -> tuple[str, ...]:
    """The first digit's prefix, then one prefix per first digit 1..4 for its tenths."""
    prefix = answer_prefix(profile)
    return (prefix, *(f"{prefix}{d}." for d in FIRST_DIGITS[:-1]))


@dataclass(frozen=True)
class ScoreReading:
    """Expected score, its standard deviation, and P(first digit) for 1..5; None when unreadable."""

    score: float | None
    std: float | None
    first_digit: dict[str, float]
    coverage: float  # probability the model put on the digits 1..5 at the answer's start
    model: ModelSpec


@dataclass(frozen=True)
class CompareReading:
    """P(image A better): one vote's probability, averaged over both image orders."""

    prob_a_better: float | None
    prob_first_ab: float | None  # P("0") with A shown first
    prob_first_ba: float | None  # P("0") with B shown first
    model: ModelSpec


def _probabilities(logprobs: Sequence[float | None]) -> list[float]:
    return [0.0 if lp is None else math.exp(lp) for lp in logprobs]


def score_from_logprobs(
    rows: Sequence[Sequence[float | None]],
) -> tuple[float | None, float | None, list[float], float]:
    """(expected score, std, P(first digit 1..5) renormalised, coverage) from the rows of a score read.

    `rows[0]` holds the digits 0..9 after the answer's start, `rows[1 + k]` the digits 0..9 after the
    first digit k + 1 and its point.
    """
    first = _probabilities([rows[0][d] for d in FIRST_DIGITS])
    coverage = sum(first)
    if coverage <= 0:
        return None, None, [0.0] * len(FIRST_DIGITS), 0.0
    first = [p / coverage for p in first]
    moments = []  # (E[value | d], E[value^2 | d])
    for k, digit in enumerate(FIRST_DIGITS[:-1]):
        tenths = _probabilities(rows[1 + k])
        total = sum(tenths)
        tenths = [p / total for p in tenths] if total > 0 else [0.1] * 10
        values = [digit + t / 10 for t in range(10)]
        pairs = list(zip(tenths, values, strict=True))
        moments.append((sum(p * v for p, v in pairs), sum(p * v * v for p, v in pairs)))
    moments.append((5.0, 25.0))
    mean = sum(p * m for p, (m, _) in zip(first, moments, strict=True))
    second = sum(p * m2 for p, (_, m2) in zip(first, moments, strict=True))
    return mean, math.sqrt(max(0.0, second - mean * mean)), first, coverage


async def read_score(
    engine: Engine, image: Image.Image, profile: PromptProfile, *, background: bool = False
) -> ScoreReading:
    """The expected score of one image, in one engine request of five continuations."""
    request = ReadingRequest(
        (image,), prompt_set(profile).score_text, score_prefixes(profile), DIGITS, background
    )
    result = await engine.read(request)
    mean, std, first, coverage = score_from_logprobs(result.logprobs)
    return ScoreReading(
        mean, std, {str(d): p for d, p in zip(FIRST_DIGITS, first, strict=True)}, coverage, result.model
    )


def _vote_zero(result: ReadingResult) -> float | None:
    zero, one = _probabilities(result.logprobs[0][:2])
    return zero / (zero + one) if zero + one > 0 else None


async def read_compare(
    engine: Engine,
    image_a: Image.Image,
    image_b: Image.Image,
    profile: PromptProfile,
    *,
    background: bool = False,
) -> CompareReading:
    """P(A better) from the vote digit's distribution in both orders (two requests sent together)."""
    text, prefix = prompt_set(profile).compare_text, (answer_prefix(profile),)
    ab, ba = await asyncio.gather(
        engine.read(ReadingRequest((image_a, image_b), text, prefix, ("0", "1"), background)),
        engine.read(ReadingRequest((image_b, image_a), text, prefix, ("0", "1"), background)),
    )
    if ab.model.version_id != ba.model.version_id:  # a swap landed between the two: read again
        return await read_compare(engine, image_a, image_b, profile, background=background)
    first_ab, first_ba = _vote_zero(ab), _vote_zero(ba)
    prob = None if first_ab is None or first_ba is None else (first_ab + (1 - first_ba)) / 2
    return CompareReading(prob, first_ab, first_ba, ab.model)
