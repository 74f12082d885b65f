"""Score one image and compare two on top of any engine, as the EvoQuality paper serves its model.

Score: n `c_score` samples, score = mean of the parsable ones (with std and counts).
Compare: n `c_compare` votes, half with A shown first and half with B first; each answer is mapped
back to the image it names, so a model that always answers "0" gives no net preference.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

from PIL import Image

from iqa.engines.base import Engine, GenerationRequest, ModelSpec, Sampling
from iqa.prompts import parse_score, parse_vote, prompt_set
from iqa.settings import PromptProfile


@dataclass(frozen=True)
class ScoreResult:
    """Mean quality score of the valid samples (None when none parsed) and what it came from."""

    score: float | None
    std: float | None
    valid: int
    samples: int
    scores: list[float | None]
    completions: list[str]
    model: ModelSpec


@dataclass(frozen=True)
class CompareResult:
    """Votes for each image; `prob_a_better` = votes_a / valid votes (None when no valid vote)."""

    votes_a: int
    votes_b: int
    invalid: int
    prob_a_better: float | None
    completions: list[str]  # in request order: first the A-first half, then the B-first half
    orders: list[str]  # "ab" or "ba" per completion
    model: ModelSpec

    @property
    def winner(self) -> str | None:
        """'a', 'b', or None for a tie or no valid vote."""
        if self.votes_a == self.votes_b:
            return None
        return "a" if self.votes_a > self.votes_b else "b"


def summarise_scores(completions: list[str], profile: PromptProfile) -> tuple[float | None, float | None]:
    """Mean and population std of the parsable scores in `completions`."""
    values = [s for s in (parse_score(c, profile) for c in completions) if s is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


async def score_image(
    engine: Engine, image: Image.Image, n: int, sampling: Sampling, profile: PromptProfile
) -> ScoreResult:
    """n score samples for one image in one engine request."""
    request = GenerationRequest((image,), prompt_set(profile).score_text, n, sampling)
    result = await engine.generate(request)
    scores = [parse_score(c, profile) for c in result.texts]
    mean, std = summarise_scores(result.texts, profile)
    valid = sum(s is not None for s in scores)
    return ScoreResult(mean, std, valid, len(scores), scores, result.texts, result.model)


def split_votes(n: int) -> tuple[int, int]:
    """Votes with A first and with B first: half each way, the odd one A-first."""
    return (n + 1) // 2, n // 2


async def compare_images(
    engine: Engine,
    image_a: Image.Image,
    image_b: Image.Image,
    n: int,
    sampling: Sampling,
    profile: PromptProfile,
) -> CompareResult:
    """n comparison votes, order balanced, in two engine requests (one per order) sent together."""
    text = prompt_set(profile).compare_text
    n_ab, n_ba = split_votes(n)
    requests = [GenerationRequest((image_a, image_b), text, n_ab, sampling)]
    if n_ba:
        requests.append(GenerationRequest((image_b, image_a), text, n_ba, sampling))
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    if len({r.model.version_id for r in results}) > 1:
        # A swap landed between the two halves; ask again so all votes come from one version.
        return await compare_images(engine, image_a, image_b, n, sampling, profile)
    votes_a = votes_b = invalid = 0
    completions: list[str] = []
    orders: list[str] = []
    for order, result in zip(("ab", "ba"), results, strict=False):
        for text_out in result.texts:
            vote = parse_vote(text_out, profile)
            completions.append(text_out)
            orders.append(order)
            if vote is None:
                invalid += 1
            elif (vote == 0) == (order == "ab"):
                votes_a += 1
            else:
                votes_b += 1
    valid = votes_a + votes_b
    prob = votes_a / valid if valid else None
    return CompareResult(votes_a, votes_b, invalid, prob, completions, orders, results[0].model)
