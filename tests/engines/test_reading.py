"""One-pass readings on the local engine: the arithmetic, determinism, symmetry, and agreement with the
organism's batched reader (an independent implementation of the same reading)."""

from __future__ import annotations

import asyncio
import math

import pytest
import pytest_asyncio

from iqa.engines.base import ModelSpec, ReadingRequest
from iqa.engines.hf_loading import load_model
from iqa.engines.local import LocalEngine
from iqa.images import downscale_for_model
from iqa.prompts import chat_messages, prompt_set
from iqa.reading import DIGITS, read_compare, read_score, score_from_logprobs, score_prefixes
from tests.imagegen import photo
from trainer.organism.evaluate import OpinionReader

NEVER = -1e9  # log-probability of a digit the model never writes


def rows_for(first: dict[int, float], tenths: dict[int, dict[int, float]]) -> list[list[float]]:
    """Score-read rows from probabilities: the first digit, then the tenths after each of 1..4."""
    log = lambda p: math.log(p) if p > 0 else NEVER  # noqa: E731
    rows = [[log(first.get(d, 0.0)) for d in range(10)]]
    for digit in range(1, 5):
        rows.append([log(tenths.get(digit, {0: 1.0}).get(t, 0.0)) for t in range(10)])
    return rows


def test_the_expected_score_and_its_spread_come_from_the_digit_distribution() -> None:
    score, std, first, coverage = score_from_logprobs(rows_for({3: 1.0}, {3: {4: 1.0}}))
    assert math.isclose(score, 3.4) and math.isclose(std, 0.0, abs_tol=1e-6)
    assert first == [0.0, 0.0, 1.0, 0.0, 0.0] and math.isclose(coverage, 1.0)

    # Half 2.0, half 4.0: mean 3, std 1.
    score, std, _, _ = score_from_logprobs(rows_for({2: 0.5, 4: 0.5}, {}))
    assert math.isclose(score, 3.0) and math.isclose(std, 1.0)

    # A 5 allows only 5.00; the digits are renormalised among 1..5 (0 and 6..9 are no answer).
    score, _, first, coverage = score_from_logprobs(rows_for({5: 0.2, 0: 0.2, 7: 0.6}, {}))
    assert math.isclose(score, 5.0) and math.isclose(first[4], 1.0) and math.isclose(coverage, 0.2)

    # No probability on any answer digit: no score.
    assert score_from_logprobs(rows_for({0: 1.0}, {}))[0] is None


@pytest_asyncio.fixture(loop_scope="function")
async def engine(spec_a: ModelSpec):
    """An engine per test: its batcher runs on the test's event loop, as the service's does on its own."""
    engine = LocalEngine(spec_a, device="cpu", dtype="float32")
    await engine.start()
    yield engine
    await engine.close()


async def test_a_reading_is_deterministic_and_names_its_model(engine: LocalEngine, spec_a: ModelSpec) -> None:
    image = photo(96, 64, 1)
    first = await read_score(engine, image, "evoquality")
    again = await read_score(engine, image, "evoquality")
    assert first == again
    assert first.model == spec_a
    assert 1.0 <= first.score <= 5.0 and first.std > 0
    assert math.isclose(sum(first.first_digit.values()), 1.0)
    assert 0 < first.coverage < 1  # the untrained demo spreads its probability over the vocabulary
    other = await read_score(engine, photo(224, 224, 5), "evoquality")
    assert other.score != first.score  # the image reaches the reading


async def test_a_comparison_reading_is_symmetric_in_the_images(engine: LocalEngine) -> None:
    a, b = photo(96, 64, 1), photo(96, 64, 2)
    ab = await read_compare(engine, a, b, "evoquality")
    ba = await read_compare(engine, b, a, "evoquality")
    assert math.isclose(ab.prob_a_better, 1 - ba.prob_a_better, abs_tol=1e-6)
    assert math.isclose(ab.prob_first_ab, ba.prob_first_ba, abs_tol=1e-6)


async def test_the_engine_reads_what_the_organism_reader_does(engine: LocalEngine, spec_a: ModelSpec) -> None:
    """Two implementations of one reading agree: the engine's (one request per image, five prefixes
    padded together) and the organism evaluator's (images batched, the first digit in its own pass)."""
    loaded = load_model(spec_a, device="cpu", dtype="float32")
    reader = OpinionReader(loaded.model.eval(), loaded.processor)
    images = [photo(224, 224, seed) for seed in range(3)]
    expected = reader.expected_scores(images)
    got = [(await read_score(engine, image, "evoquality")).score for image in images]
    assert got == pytest.approx(expected, abs=1e-4)
    (expected_vote,) = reader.first_better([(images[0], images[1])])
    vote = await read_compare(engine, images[0], images[1], "evoquality")
    assert vote.prob_a_better == pytest.approx(expected_vote, abs=1e-4)


async def test_the_prefixes_share_one_prefill_and_read_what_separate_rows_do(
    engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A score reading runs the prompt once and continues each prefix from its KV cache: every
    prefix's digit log-probabilities equal those of the five prefixes run as rows of one batch."""
    image = photo(160, 120, 7)
    request = ReadingRequest(
        (image,), prompt_set("evoquality").score_text, score_prefixes("evoquality"), DIGITS
    )
    loaded = engine._loaded
    ids = [loaded.processor.tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    prompt = loaded.processor.apply_chat_template(
        chat_messages(request.text, 1), add_generation_prompt=True, tokenize=False
    )
    separate = engine._read_rows(
        loaded, request, prompt, [downscale_for_model(image, engine.max_pixels)], ids
    )

    def refused(*args: object) -> None:
        raise AssertionError("the reading fell back to separate rows")

    monkeypatch.setattr(engine, "_read_rows", refused)
    shared = (await engine.read(request)).logprobs
    assert len(shared) == 5 and all(len(row) == 10 for row in shared)
    assert shared == [pytest.approx(row, abs=1e-4) for row in separate]


async def test_concurrent_readings_share_forward_passes_and_read_what_each_reads_alone(
    engine: LocalEngine,
) -> None:
    """Readings sent together are batched like generation: one batch per kind (score or compare),
    left-padded where the images give different prompt lengths, each row equal to its reading alone."""
    score_text, compare_text = prompt_set("evoquality").score_text, prompt_set("evoquality").compare_text
    prefixes = score_prefixes("evoquality")
    images = [photo(160, 120, 1), photo(96, 64, 2), photo(224, 224, 3), photo(200, 120, 4)]
    requests = [ReadingRequest((image,), score_text, prefixes, DIGITS) for image in images]
    requests += [
        ReadingRequest((images[0], images[2]), compare_text, prefixes[:1], ("0", "1")),
        ReadingRequest((images[3], images[1]), compare_text, prefixes[:1], ("0", "1")),
    ]
    lengths = {
        engine._loaded.processor(text=["<|image_pad|>"], images=[image], return_tensors="pt")[
            "input_ids"
        ].shape[1]
        for image in images
    }
    assert len(lengths) > 1  # the batch needs padding
    alone = [(await engine.read(request)).logprobs for request in requests]
    before = engine.batches_run
    together = await asyncio.gather(*(engine.read(request) for request in requests))
    assert engine.batches_run - before == 2  # the score readings in one call, the comparisons in another
    for got, expected in zip(together, alone, strict=True):
        assert got.logprobs == [pytest.approx(row, abs=1e-4) for row in expected]


async def test_a_candidate_of_several_tokens_is_refused(engine: LocalEngine) -> None:
    request = ReadingRequest(
        (photo(96, 64, 1),), prompt_set("evoquality").score_text, score_prefixes("evoquality"), ("10",)
    )
    with pytest.raises(ValueError, match="one token"):
        await engine.read(request)
    assert len(DIGITS) == 10
