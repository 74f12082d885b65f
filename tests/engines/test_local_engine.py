"""LocalEngine on the real tiny demo model: samples, batching, sampling groups, constraint, hot-swap, faults.

No mocks: the only interventions are a recorder around the model's `generate` (to see what each forward
batch held) and deliberate fault injection through it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from iqa.engines.base import EngineUnavailable, GenerationRequest, GenerationResult, ModelSpec, Sampling
from iqa.engines.local import LocalEngine
from iqa.prompts import parse_score, parse_vote, prompt_set
from tests.engines.support import GenerateCall, GenerateRecorder, running_engine
from tests.imagegen import photo

SCORE_TEXT = prompt_set("evoquality").score_text
GREEDY = Sampling(temperature=0.0)
SAMPLED = Sampling(temperature=1.0)
IMAGES = [photo(seed=i) for i in range(8)]


def score_request(image_index: int, n: int = 1, sampling: Sampling = GREEDY) -> GenerationRequest:
    return GenerationRequest((IMAGES[image_index],), SCORE_TEXT, n, sampling)


async def greedy_outputs(spec: ModelSpec, indices: range) -> dict[int, str]:
    """What `spec`'s model writes greedily for each image, asked alone, one request at a time."""
    async with running_engine(spec) as engine:
        return {i: (await engine.generate(score_request(i))).texts[0] for i in indices}


# ---- samples and batching -------------------------------------------------------------------------


async def test_each_request_gets_its_n_samples_from_the_active_model(spec_a: ModelSpec) -> None:
    async with running_engine(spec_a) as engine:
        assert engine.active == spec_a
        for n in (1, 3, 5):
            result = await engine.generate(score_request(0, n, SAMPLED))
            assert isinstance(result, GenerationResult)
            assert len(result.texts) == n
            assert all(isinstance(t, str) for t in result.texts)
            assert result.model == spec_a
        with pytest.raises(ValueError):
            await engine.generate(score_request(0, 0))
        status = await engine.health()
        assert (status["engine"], status["model"]) == ("local", spec_a.name)
        # transformers' default would swap in Hub kernels on a GPU (a download, fatal offline)
        assert engine._loaded.model.use_kernels is False


async def test_an_engine_not_started_is_unavailable(spec_a: ModelSpec) -> None:
    engine = LocalEngine(spec_a, device="cpu")
    with pytest.raises(EngineUnavailable):
        await engine.generate(score_request(0))
    with pytest.raises(EngineUnavailable):
        _ = engine.active


async def test_concurrent_requests_share_forward_passes(spec_a: ModelSpec) -> None:
    solo = await greedy_outputs(spec_a, range(8))
    async with running_engine(spec_a) as engine:
        recorder = GenerateRecorder(engine)
        before = engine.batches_run
        results = await asyncio.gather(*(engine.generate(score_request(i, 4)) for i in range(8)))

        assert engine.batches_run - before <= 2  # 8 requests, at most 2 forward batches
        assert len(recorder.calls) <= 2
        assert sum(call.rows for call in recorder.calls) == 8  # greedy: each request decoded once
        assert max(call.rows for call in recorder.calls) >= 4
        # batching never mixes rows up: each request gets its own image's completions
        for i, result in enumerate(results):
            assert result.texts == [solo[i]] * 4
            assert result.model == spec_a


async def test_the_sampled_default_is_batched_too(spec_a: ModelSpec) -> None:
    async with running_engine(spec_a) as engine:
        before = engine.batches_run
        results = await asyncio.gather(*(engine.generate(score_request(i, 4, SAMPLED)) for i in range(8)))
        assert engine.batches_run - before <= 2
        assert [len(r.texts) for r in results] == [4] * 8


async def test_requests_over_max_batch_rows_are_split_into_chunks(spec_a: ModelSpec) -> None:
    async with running_engine(spec_a, max_batch_rows=4) as engine:
        recorder = GenerateRecorder(engine)
        result = await engine.generate(score_request(1, 10, SAMPLED))
        assert len(result.texts) == 10
        assert sorted(call.rows for call in recorder.calls) == [2, 4, 4]
        greedy = await engine.generate(score_request(1, 10))
        assert len(greedy.texts) == 10 and len(set(greedy.texts)) == 1
        assert recorder.calls[-1].rows == 1  # greedy: decoded once, repeated


async def test_different_sampling_settings_are_never_mixed_in_one_generate_call(spec_a: ModelSpec) -> None:
    solo = await greedy_outputs(spec_a, range(2))
    short = Sampling(temperature=1.0, max_new_tokens=16)
    cooler = Sampling(temperature=0.7)
    async with running_engine(spec_a, batch_window_ms=50) as engine:
        recorder = GenerateRecorder(engine)
        before = engine.batches_run
        requests = [
            score_request(0, 2, GREEDY),
            score_request(2, 3, SAMPLED),
            score_request(1, 2, GREEDY),
            score_request(3, 1, short),
            score_request(4, 3, SAMPLED),
            score_request(5, 2, cooler),
        ]
        results = await asyncio.gather(*(engine.generate(r) for r in requests))

        assert engine.batches_run - before == 4  # one generate call per distinct setting
        calls = {(c.do_sample, c.temperature, c.max_new_tokens): c.rows for c in recorder.calls}
        # greedy samples are identical, so each greedy prompt is decoded once and repeated
        assert calls == {(False, None, 48): 2, (True, 1.0, 48): 6, (True, 1.0, 16): 1, (True, 0.7, 48): 2}
        assert [len(r.texts) for r in results] == [2, 3, 2, 1, 3, 2]
        # the greedy requests were decoded greedily, not sampled beside the others
        assert results[0].texts == [solo[0]] * 2
        assert results[2].texts == [solo[1]] * 2
        short_call = next(c for c in recorder.calls if c.max_new_tokens == 16)
        assert short_call.output.shape[1] - short_call.prompt_len <= 16


async def test_temperature_zero_is_deterministic(spec_a: ModelSpec) -> None:
    async with running_engine(spec_a) as engine:
        first = await engine.generate(score_request(3, 3))
        await engine.generate(score_request(3, 4, SAMPLED))  # sampling in between changes nothing
        second = await engine.generate(score_request(3, 2))
        assert len(set(first.texts)) == 1
        assert second.texts == first.texts[:2]
        assert first.texts[0]  # something was written


async def test_a_seed_makes_sampling_reproducible(spec_a: ModelSpec) -> None:
    seeded = Sampling(temperature=1.0, seed=1234)
    async with running_engine(spec_a) as engine:
        first = await engine.generate(score_request(2, 4, seeded))
        second = await engine.generate(score_request(2, 4, seeded))
        assert first.texts == second.texts
        assert len(set(first.texts)) > 1  # still sampled: the rows differ


# ---- constrained decoding -------------------------------------------------------------------------

ENDINGS = {
    ("evoquality", "score"): re.compile(r"\\boxed\{[1-5]\.\d\d\}$"),
    ("evoquality", "vote"): re.compile(r"\\boxed\{[01]\}$"),
    ("visualquality-r1", "score"): re.compile(r"<answer>[1-5]\.\d\d</answer>$"),
    ("visualquality-r1", "vote"): re.compile(r"<answer>[01]</answer>$"),
}


def assert_each_row_ends_right_after_its_answer(call: GenerateCall, engine: LocalEngine) -> None:
    tokenizer = engine._loaded.processor.tokenizer
    eos_ids = set(engine._loaded.model.generation_config.eos_token_id)
    for row in call.output[:, call.prompt_len :].tolist():
        ends = [k for k, token in enumerate(row) if token in eos_ids]
        assert ends, "every row must end with end-of-text"
        assert all(token in eos_ids for token in row[ends[0] :])  # only end/padding after it
        text = tokenizer.decode(row[: ends[0]])
        assert text.endswith("}") or text.endswith("</answer>")


@pytest.mark.parametrize("profile", ["evoquality", "visualquality-r1"])
async def test_constrained_decoding_always_gives_a_parsable_answer(spec_a: ModelSpec, profile: str) -> None:
    prompts = prompt_set(profile)
    score, vote = Sampling(temperature=1.0, constrain="score"), Sampling(temperature=1.0, constrain="vote")
    async with running_engine(spec_a, profile=profile) as engine:
        recorder = GenerateRecorder(engine)
        scored = await asyncio.gather(
            *(
                engine.generate(GenerationRequest((IMAGES[i],), prompts.score_text, 8, score))
                for i in range(3)
            )
        )
        voted = await asyncio.gather(
            *(
                engine.generate(GenerationRequest((IMAGES[i], IMAGES[i + 1]), prompts.compare_text, 8, vote))
                for i in range(2)
            )
        )
        score_texts = [t for r in scored for t in r.texts]
        vote_texts = [t for r in voted for t in r.texts]
        assert all(ENDINGS[(profile, "score")].search(t) for t in score_texts), score_texts
        assert all(ENDINGS[(profile, "vote")].search(t) for t in vote_texts), vote_texts
        scores = [parse_score(t, profile) for t in score_texts]
        assert all(s is not None and 1.0 <= s <= 5.0 for s in scores)
        assert len(set(scores)) > 1  # sampled, not a constant
        assert {parse_vote(t, profile) for t in vote_texts} <= {0, 1}
        for call in recorder.calls:
            assert_each_row_ends_right_after_its_answer(call, engine)


@pytest.mark.parametrize("max_new_tokens", [8, 12])
async def test_constrained_decoding_with_the_smallest_allowed_budget(
    spec_a: ModelSpec, max_new_tokens: int
) -> None:
    # Settings.max_new_tokens allows 8 and more; the constraint promises a parsable answer whatever it is.
    sampling = Sampling(temperature=1.0, max_new_tokens=max_new_tokens, constrain="score")
    async with running_engine(spec_a) as engine:
        result = await engine.generate(score_request(0, 4, sampling))
    assert all(parse_score(t) is not None for t in result.texts), result.texts


# ---- hot-swap -------------------------------------------------------------------------------------


async def test_hot_swap_while_requests_are_in_flight(spec_a: ModelSpec, spec_b: ModelSpec) -> None:
    indices = range(6)
    reference = {spec_a: await greedy_outputs(spec_a, indices), spec_b: await greedy_outputs(spec_b, indices)}
    assert all(reference[spec_a][i] != reference[spec_b][i] for i in indices)  # the models differ

    async with running_engine(spec_a) as engine:

        async def ask(i: int) -> tuple[int, GenerationResult]:
            return i, await engine.generate(score_request(i, 2))

        first_wave = [asyncio.create_task(ask(i)) for i in indices]
        await asyncio.sleep(0)  # queued before the swap starts
        swap = asyncio.create_task(engine.activate(spec_b))
        during: list[asyncio.Task] = []
        while not swap.done():
            during.append(asyncio.create_task(ask(len(during) % len(indices))))
            await asyncio.sleep(0.01)
        await swap
        assert engine.active == spec_b
        after = await asyncio.gather(*(ask(i) for i in indices))
        before = await asyncio.gather(*first_wave, *during)

        for i, result in [*before, *after]:
            assert result.model in (spec_a, spec_b)
            # the completions are what that version's model writes alone, not the other's
            assert result.texts == [reference[result.model][i]] * 2
        assert all(result.model == spec_b for _, result in after)
        assert any(result.model == spec_a for _, result in before)  # the first wave ran on the old one
        assert (await engine.health())["model"] == spec_b.name


def _empty(folder: Path, model_dir: Path) -> None:
    folder.mkdir()


def _garbage_weights(folder: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 64)


def _truncated_weights(folder: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _no_weights(folder: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").unlink()


def _missing_tensor(folder: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors[next(name for name in sorted(tensors) if "mlp" in name)]
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "breakage", [_empty, _garbage_weights, _truncated_weights, _no_weights, _missing_tensor]
)
async def test_a_broken_checkpoint_is_refused_and_the_old_model_keeps_serving(
    spec_a: ModelSpec, demo_model_dir: Path, tmp_path: Path, breakage
) -> None:
    broken_dir = tmp_path / "broken"
    breakage(broken_dir, demo_model_dir)
    broken = ModelSpec(9, "broken", "full", str(broken_dir))
    async with running_engine(spec_a) as engine:
        before = await engine.generate(score_request(0, 2))
        with pytest.raises(Exception) as caught:  # any load error, as long as it raises
            await engine.activate(broken)
        assert not isinstance(caught.value, AssertionError)
        assert engine.active == spec_a
        after = await engine.generate(score_request(0, 2))
        assert after.model == spec_a
        assert after.texts == before.texts
        assert (await engine.health())["model"] == spec_a.name


# ---- faults ---------------------------------------------------------------------------------------


async def test_a_failing_generate_fails_only_its_own_requests(spec_a: ModelSpec) -> None:
    solo = await greedy_outputs(spec_a, range(2))
    failing = True

    def fault(call: GenerateCall) -> None:
        if failing and not call.do_sample:
            time.sleep(0.3)  # long enough for another request to queue behind this batch
            raise RuntimeError("injected: CUDA error: device-side assert triggered")

    async with running_engine(spec_a) as engine:
        GenerateRecorder(engine, fault)
        greedy = [asyncio.create_task(engine.generate(score_request(i, 2))) for i in range(2)]
        sampled = [asyncio.create_task(engine.generate(score_request(i, 2, SAMPLED))) for i in range(2)]
        await asyncio.sleep(0.1)  # the batch above is running now
        queued_behind = asyncio.create_task(engine.generate(score_request(3, 2, SAMPLED)))

        for task in greedy:
            with pytest.raises(EngineUnavailable, match="injected"):
                await task
        assert [len((await task).texts) for task in sampled] == [2, 2]  # same batch, other setting
        assert len((await queued_behind).texts) == 2  # the next batch

        failing = False
        assert (await engine.health())["engine"] == "local"
        recovered = await asyncio.gather(*(engine.generate(score_request(i, 2)) for i in range(2)))
        assert [r.texts for r in recovered] == [[solo[0]] * 2, [solo[1]] * 2]


async def test_closing_fails_the_requests_in_flight_instead_of_leaving_them_hanging(
    spec_a: ModelSpec,
) -> None:
    def slow(call: GenerateCall) -> None:
        time.sleep(0.5)

    engine = LocalEngine(spec_a, device="cpu")
    await engine.start()
    GenerateRecorder(engine, slow)
    in_flight = asyncio.create_task(engine.generate(score_request(0, 2)))
    await asyncio.sleep(0.1)  # the batch is generating now
    await engine.close()
    try:
        result = await asyncio.wait_for(in_flight, timeout=5)
    except EngineUnavailable:
        return  # failed cleanly
    except TimeoutError:
        pytest.fail("a request in flight when the engine closed never got an answer")
    assert len(result.texts) == 2  # or it was allowed to finish


async def test_client_requests_go_before_round_work(spec_a: ModelSpec) -> None:
    """Round work (background) waits for clients, and runs in small batches while clients are active."""
    round_work = Sampling(temperature=1.0, background=True)
    async with running_engine(spec_a, max_batch_rows=8) as engine:
        recorder = GenerateRecorder(engine)
        votes = [asyncio.create_task(engine.generate(score_request(i % 6, 4, round_work))) for i in range(8)]
        await asyncio.sleep(0)  # all queued before the client arrives
        client = await engine.generate(score_request(7, 2, SAMPLED))
        assert len(client.texts) == 2
        assert sum(task.done() for task in votes) <= 2  # at most the batch already running went first
        await asyncio.gather(*votes)
        after_client = recorder.calls[2:]  # the first round batch, then the client's
        assert after_client and all(call.rows <= 4 for call in after_client)  # one request at a time


async def test_round_work_runs_in_full_batches_without_clients(spec_a: ModelSpec) -> None:
    round_work = Sampling(temperature=1.0, background=True)
    async with running_engine(spec_a, max_batch_rows=8) as engine:
        recorder = GenerateRecorder(engine)
        await asyncio.gather(*(engine.generate(score_request(i % 6, 4, round_work)) for i in range(8)))
        assert [call.rows for call in recorder.calls] == [8, 8, 8, 8]
