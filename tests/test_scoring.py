"""Scoring and comparison on top of a scripted engine: means, counts, unparsable samples, order balancing."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable

import pytest
from PIL import Image

from iqa.engines.base import (
    Engine,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    ReadingRequest,
    ReadingResult,
    Sampling,
)
from iqa.prompts import prompt_set
from iqa.scoring import compare_images, score_image, split_votes, summarise_scores

MODEL = ModelSpec(1, "scripted", "base", "scripted")
SAMPLING = Sampling(temperature=1.0, max_new_tokens=64)

# (images shown, in order) -> the n completions for one request
Script = Callable[[tuple[Image.Image, ...], int], list[str]]


def grey(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def brightness(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]


def box(answer: object) -> str:
    return f"<think>looked at it</think> \\boxed{{{answer}}}"


class ScriptedEngine:
    """Implements the Engine protocol; answers every request from a script and records the requests."""

    def __init__(self, script: Script, models: list[ModelSpec] | None = None) -> None:
        self.script = script
        self.models = list(models or [MODEL])  # one per generate call; the last one repeats
        self.requests: list[GenerationRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def active(self) -> ModelSpec:
        return self.models[0]

    async def start(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        model = self.models.pop(0) if len(self.models) > 1 else self.models[0]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            texts = self.script(request.images, request.n)
        finally:
            self.in_flight -= 1
        assert len(texts) == request.n
        return GenerationResult(texts, model)

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """No opinion: every candidate equally likely (the scripts are about sampled answers)."""
        return ReadingResult([[-2.3] * len(request.candidates) for _ in request.prefixes], self.active)

    async def activate(self, model: ModelSpec) -> None:
        self.models = [model]

    async def health(self) -> dict:
        return {"engine": "scripted"}

    async def close(self) -> None:
        pass


def fixed(*completions: str) -> Script:
    return lambda images, n: list(completions)[:n]


def always_first(images: tuple[Image.Image, ...], n: int) -> list[str]:
    return [box(0)] * n


def brighter_wins(images: tuple[Image.Image, ...], n: int) -> list[str]:
    first, second = (brightness(im) for im in images)
    return [box(0 if first > second else 1)] * n


def test_the_scripted_engine_implements_the_protocol() -> None:
    assert isinstance(ScriptedEngine(always_first), Engine)


# ---- score ----------------------------------------------------------------------------------------


async def test_score_is_the_mean_of_the_parsable_samples() -> None:
    completions = [box("3.00"), "I refuse to answer", box(4.5), box("abc"), box(7), box("2.5")]
    engine = ScriptedEngine(fixed(*completions))
    image = grey(100)
    result = await score_image(engine, image, 6, SAMPLING, "evoquality")

    parsed = [3.0, 4.5, 5.0, 2.5]  # 7 is clamped to 5
    assert result.scores == [3.0, None, 4.5, None, 5.0, 2.5]
    assert result.score == pytest.approx(statistics.fmean(parsed))
    assert result.std == pytest.approx(statistics.pstdev(parsed))
    assert (result.valid, result.samples) == (4, 6)
    assert result.completions == completions
    assert result.model == MODEL

    # one request with n samples of the score prompt, the image and the sampling passed through
    [request] = engine.requests
    assert request.n == 6
    assert request.images == (image,)
    assert request.text == prompt_set("evoquality").score_text
    assert request.sampling == SAMPLING


async def test_all_unparsable_samples_give_no_score() -> None:
    engine = ScriptedEngine(fixed("nothing", box("nan"), box(""), box("inf")))
    result = await score_image(engine, grey(50), 4, SAMPLING, "evoquality")
    assert (result.score, result.std) == (None, None)
    assert (result.valid, result.samples) == (0, 4)
    assert result.scores == [None] * 4


async def test_one_valid_sample_has_zero_spread() -> None:
    engine = ScriptedEngine(fixed("garbage", box("3.75")))
    result = await score_image(engine, grey(50), 2, SAMPLING, "evoquality")
    assert (result.score, result.std, result.valid) == (3.75, 0.0, 1)


async def test_score_uses_the_profile_for_prompt_and_parsing() -> None:
    engine = ScriptedEngine(fixed("<answer>4.25</answer>", box(2), "<answer>2.25</answer>"))
    result = await score_image(engine, grey(50), 3, SAMPLING, "visualquality-r1")
    assert result.scores == [4.25, None, 2.25]
    assert result.score == pytest.approx(3.25)
    assert engine.requests[0].text == prompt_set("visualquality-r1").score_text


def test_summarise_scores() -> None:
    assert summarise_scores([box(1), box(5)], "evoquality") == (3.0, 2.0)
    assert summarise_scores(["x", "y"], "evoquality") == (None, None)
    assert summarise_scores([], "evoquality") == (None, None)


# ---- compare --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(1, (1, 0)), (2, (1, 1)), (3, (2, 1)), (8, (4, 4)), (9, (5, 4))])
def test_split_votes_halves_the_votes_odd_one_a_first(n: int, expected: tuple[int, int]) -> None:
    assert split_votes(n) == expected
    assert sum(split_votes(n)) == n


async def test_a_position_biased_voter_gives_no_preference() -> None:
    engine = ScriptedEngine(always_first)
    a, b = grey(40), grey(220)
    result = await compare_images(engine, a, b, 8, SAMPLING, "evoquality")
    assert (result.votes_a, result.votes_b, result.invalid) == (4, 4, 0)
    assert result.prob_a_better == 0.5
    assert result.winner is None

    # half of the votes were asked with A first, half with B first, both at once
    shown = sorted(((brightness(r.images[0]), brightness(r.images[1])), r.n) for r in engine.requests)
    assert shown == [((40, 220), 4), ((220, 40), 4)]
    assert engine.max_in_flight == 2
    assert result.orders == ["ab"] * 4 + ["ba"] * 4
    assert all(r.text == prompt_set("evoquality").compare_text for r in engine.requests)


@pytest.mark.parametrize("n", [2, 7, 8])
async def test_a_content_based_voter_wins_in_both_orders(n: int) -> None:
    engine = ScriptedEngine(brighter_wins)
    bright, dark = grey(230), grey(30)

    result = await compare_images(engine, bright, dark, n, SAMPLING, "evoquality")
    assert (result.votes_a, result.votes_b, result.invalid) == (n, 0, 0)
    assert result.prob_a_better == 1.0
    assert result.winner == "a"

    swapped = await compare_images(engine, dark, bright, n, SAMPLING, "evoquality")
    assert (swapped.votes_a, swapped.votes_b) == (0, n)
    assert swapped.prob_a_better == 0.0
    assert swapped.winner == "b"
    assert swapped.orders == ["ab"] * split_votes(n)[0] + ["ba"] * split_votes(n)[1]


async def test_invalid_votes_are_counted_and_left_out_of_the_probability() -> None:
    def mostly_brighter(images: tuple[Image.Image, ...], n: int) -> list[str]:
        return ["no idea", box(2), *brighter_wins(images, n)[2:]]

    engine = ScriptedEngine(mostly_brighter)
    result = await compare_images(engine, grey(200), grey(100), 8, SAMPLING, "evoquality")
    assert (result.votes_a, result.votes_b, result.invalid) == (4, 0, 4)
    assert result.prob_a_better == 1.0
    assert len(result.completions) == 8


async def test_no_valid_vote_gives_no_probability() -> None:
    engine = ScriptedEngine(lambda images, n: ["undecided"] * n)
    result = await compare_images(engine, grey(200), grey(100), 4, SAMPLING, "evoquality")
    assert (result.votes_a, result.votes_b, result.invalid) == (0, 0, 4)
    assert result.prob_a_better is None
    assert result.winner is None


async def test_a_single_vote_is_asked_a_first_only() -> None:
    engine = ScriptedEngine(brighter_wins)
    result = await compare_images(engine, grey(10), grey(20), 1, SAMPLING, "evoquality")
    assert len(engine.requests) == 1
    assert (result.votes_a, result.votes_b, result.orders) == (0, 1, ["ab"])


async def test_a_swap_between_the_halves_is_asked_again_on_one_version() -> None:
    new = ModelSpec(2, "evolved", "lora", "adapter", base_path="scripted")
    engine = ScriptedEngine(brighter_wins, models=[MODEL, new, new])
    result = await compare_images(engine, grey(200), grey(10), 4, SAMPLING, "evoquality")
    assert result.model == new
    assert len(engine.requests) == 4  # two halves on mixed versions, then both again
    assert (result.votes_a, result.votes_b) == (4, 0)
