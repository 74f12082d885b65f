"""Voting with a scripted engine: labels, order balancing, invalid votes, concurrency and progress."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from PIL import Image

from iqa.engines.base import (
    Engine,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    ModelSpec,
    ReadingRequest,
    ReadingResult,
    Sampling,
)
from trainer.voting import (
    PairLabel,
    VotingResult,
    make_label,
    pseudo_preference,
    soft_label,
    vote_margin,
    vote_pairs,
)

Script = Callable[[int, int, int], str]  # (first brightness, second brightness, sample index) -> completion


def grey(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, level, level))


def brightness(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]


def answer(index: int | str) -> str:
    return f"<think>looked at both</think> \\boxed{{{index}}}"


def always_first(first: int, second: int, k: int) -> str:
    return answer(0)


def brighter(first: int, second: int, k: int) -> str:
    return answer(0 if first > second else 1)


class ScriptedEngine:
    """Answers each request from a script keyed by the shown images; records what was in flight."""

    def __init__(self, script: Script, delay: float = 0.0, fail_on: frozenset[int] | None = None) -> None:
        self.script = script
        self.delay = delay
        self.fail_on = fail_on
        self.model = ModelSpec(1, "scripted", "base", "scripted")
        self.in_flight: Counter[frozenset[int]] = Counter()
        self.max_pairs_in_flight = 0
        self.requests: list[tuple[int, int, int]] = []

    @property
    def active(self) -> ModelSpec:
        return self.model

    async def start(self) -> None:
        pass

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """No opinion: every candidate equally likely (the scripts are about sampled answers)."""
        return ReadingResult([[-2.3] * len(request.candidates) for _ in request.prefixes], self.active)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        first, second = (brightness(image) for image in request.images)
        pair = frozenset((first, second))
        self.requests.append((first, second, request.n))
        self.in_flight[pair] += 1
        self.max_pairs_in_flight = max(self.max_pairs_in_flight, len(+self.in_flight))
        try:
            await asyncio.sleep(self.delay)
            if pair == self.fail_on:
                raise EngineUnavailable("scripted outage")
            return GenerationResult([self.script(first, second, k) for k in range(request.n)], self.model)
        finally:
            self.in_flight[pair] -= 1

    async def activate(self, model: ModelSpec) -> None:
        self.model = model

    async def health(self) -> dict:
        return {"ok": True}

    async def close(self) -> None:
        pass


LEVELS = [10, 200, 100, 50, 150, 250]
IMAGES = [grey(level) for level in LEVELS]
SAMPLING = Sampling(temperature=1.0)


async def vote(engine: ScriptedEngine, pairs: list[tuple[int, int]], k: int, **options) -> VotingResult:
    return await vote_pairs(engine, IMAGES, pairs, k, SAMPLING, "evoquality", **options)


def test_label_rules() -> None:
    assert [pseudo_preference(*v) for v in [(5, 3), (3, 5), (4, 4), (0, 0)]] == [1.0, 0.0, 0.5, 0.5]
    assert [soft_label(*v) for v in [(3, 1), (0, 2), (0, 0)]] == [0.75, 0.0, 0.5]
    assert [vote_margin(*v) for v in [(3, 1), (2, 2), (0, 0), (0, 4)]] == [0.5, 0.0, 0.0, 1.0]
    assert make_label(0, 1, 3, 1, 2) == PairLabel(0, 1, 3, 1, 2, 1.0)
    assert make_label(0, 1, 3, 1, 2, rule="soft").p_star == 0.75


async def test_brighter_image_wins_whichever_is_shown_first() -> None:
    engine = ScriptedEngine(brighter)
    assert isinstance(engine, Engine)
    result = await vote(engine, [(0, 1), (1, 2), (2, 0)], 4)
    assert result.labels == [
        PairLabel(0, 1, 0, 4, 0, 0.0),
        PairLabel(1, 2, 4, 0, 0, 1.0),
        PairLabel(2, 0, 4, 0, 0, 1.0),
    ]
    # every pair was asked both ways, half the votes each
    assert sorted(engine.requests) == sorted(
        [(10, 200, 2), (200, 10, 2), (200, 100, 2), (100, 200, 2), (100, 10, 2), (10, 100, 2)]
    )
    assert (result.votes, result.invalid_votes, result.invalid_rate, result.ties) == (12, 0, 0.0, 0)


async def test_position_bias_gives_a_tie_not_a_label() -> None:
    result = await vote(ScriptedEngine(always_first), [(0, 1), (3, 5)], 6)
    assert [(lb.votes_i, lb.votes_j, lb.p_star) for lb in result.labels] == [(3, 3, 0.5), (3, 3, 0.5)]
    assert result.ties == 2


async def test_unparsable_votes_are_dropped_and_counted() -> None:
    def flaky(first: int, second: int, k: int) -> str:
        return "I cannot decide" if k == 0 else brighter(first, second, k)

    result = await vote(ScriptedEngine(flaky), [(0, 1), (2, 3)], 4)
    assert result.labels == [PairLabel(0, 1, 0, 2, 2, 0.0), PairLabel(2, 3, 2, 0, 2, 1.0)]
    assert (result.votes, result.invalid_votes, result.invalid_rate) == (8, 4, 0.5)


async def test_no_valid_vote_is_a_tie() -> None:
    result = await vote(ScriptedEngine(lambda f, s, k: "nothing"), [(0, 1)], 4)
    assert result.labels == [PairLabel(0, 1, 0, 0, 4, 0.5)]
    assert (result.ties, result.invalid_rate) == (1, 1.0)


def first_sample_says_first(first: int, second: int, k: int) -> str:
    return answer(0) if k == 0 else brighter(first, second, k)


async def test_soft_rule_and_margin_filter() -> None:
    # K = 4: the brighter image gets 3 votes, the other 1 (one position-biased vote per request)
    pairs = [(0, 1), (1, 2)]
    soft = await vote(ScriptedEngine(first_sample_says_first), pairs, 4, rule="soft")
    assert [(lb.votes_i, lb.votes_j, lb.p_star) for lb in soft.labels] == [(1, 3, 0.25), (3, 1, 0.75)]
    assert soft.kept == soft.labels  # min_margin 0 keeps everything

    strict = await vote(ScriptedEngine(first_sample_says_first), pairs, 4, min_margin=0.6)
    assert [lb.p_star for lb in strict.labels] == [0.0, 1.0]  # hard by default
    assert strict.kept == []  # margin 0.5 < 0.6
    assert [row["kept"] for row in strict.to_rows()] == [False, False]


async def test_concurrency_bound_is_respected_and_reached() -> None:
    pairs = [(i, j) for i in range(len(IMAGES)) for j in range(i + 1, len(IMAGES))]
    engine = ScriptedEngine(brighter, delay=0.01)
    await vote(engine, pairs, 4, concurrency=3)
    assert engine.max_pairs_in_flight == 3

    serial = ScriptedEngine(brighter, delay=0.001)
    await vote(serial, pairs, 4, concurrency=1)
    assert serial.max_pairs_in_flight == 1


async def test_progress_reports_every_pair() -> None:
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    calls: list[tuple[int, int]] = []
    engine = ScriptedEngine(brighter, delay=0.001)
    await vote(engine, pairs, 2, concurrency=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 5) for k in range(1, 6)]


async def test_engine_error_propagates_and_cancels_the_rest() -> None:
    engine = ScriptedEngine(brighter, delay=0.01, fail_on=frozenset((LEVELS[0], LEVELS[1])))
    pairs = [(0, 1), (2, 3), (3, 4), (4, 5), (5, 0), (1, 2)]
    with pytest.raises(EngineUnavailable):
        await vote(engine, pairs, 2, concurrency=2)
    started = {frozenset(request[:2]) for request in engine.requests}
    assert len(started) <= 3  # the failing pair, its neighbour, at most one more: the rest never ran
    assert sum(engine.in_flight.values()) == 0


@pytest.mark.parametrize(
    ("pairs", "votes", "concurrency", "min_margin", "message"),
    [
        ([(0, 9)], 4, 1, 0.0, "out of range"),
        ([(0, 1)], 0, 1, 0.0, "at least 1"),
        ([(0, 1)], 4, 0, 0.0, "at least 1"),
        ([(0, 1)], 4, 1, 1.5, "min_margin"),
    ],
)
async def test_bad_arguments_raise(
    pairs: list[tuple[int, int]], votes: int, concurrency: int, min_margin: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await vote(ScriptedEngine(brighter), pairs, votes, concurrency=concurrency, min_margin=min_margin)


def test_rows_and_preferences() -> None:
    result = VotingResult([PairLabel(0, 1, 5, 1, 2, 1.0), PairLabel(2, 0, 2, 2, 0, 0.5)], min_margin=0.5)
    assert result.to_rows() == [
        {"i": 0, "j": 1, "votes_i": 5, "votes_j": 1, "invalid": 2, "p_star": 1.0, "kept": True},
        {"i": 2, "j": 0, "votes_i": 2, "votes_j": 2, "invalid": 0, "p_star": 0.5, "kept": False},
    ]
    assert result.preferences(["img-a", "img-b", "img-c"]) == {("img-a", "img-b"): 1.0}
    assert VotingResult([]).invalid_rate == 0.0
