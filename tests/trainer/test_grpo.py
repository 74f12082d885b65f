"""GRPO wiring on TRL with the tiny model: pair-aware batching (proved on the batches TRL really draws),
constrained rollouts, LoRA targets, weights that change, full fine-tuning and the KL reference."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from iqa.demo_model import build_demo_model
from tests.imagegen import blurred, photo
from trainer.batching import PairAwareSampler, plan_steps
from trainer.checkpoint import ModelSource, resolve_model
from trainer.config import TrainJob, TrainSettings
from trainer.grpo import build_trainer, train_grpo
from trainer.pairs import sample_pairs
from trainer.process import TrainingFailed, train_distributed

# Tiny but real: 8 images, 10 pairs, 4 images (2+ pairs) per step, 2 rollouts each.
SETTINGS = TrainSettings(
    generations=2,
    steps=3,
    images_per_step=4,
    learning_rate=1e-3,
    max_completion_length=16,
    constrain_answers=True,
)


# ---- the step plan and the sampler (pure) ------------------------------------------------------------


def test_plan_steps_fills_each_step_with_whole_pairs() -> None:
    pairs = sample_pairs(12, 30, 3, seed=1)
    partners = {k: {j for i, j in pairs if i == k} | {i for i, j in pairs if j == k} for k in range(12)}
    steps = plan_steps(pairs, images_per_step=6, num_steps=40, seed=0)
    assert len(steps) == 40
    for step in steps:
        assert len(step) == 6
        assert all(partners[image] & set(step) for image in step)  # nobody without a partner
    assert plan_steps(pairs, 6, 40, seed=0) == steps  # reproducible


def test_plan_steps_covers_every_pair_within_a_pass() -> None:
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]  # disjoint: each step holds exactly two of them
    steps = plan_steps(pairs, images_per_step=4, num_steps=2, seed=3)
    covered = {pair for step in steps for pair in pairs if set(pair) <= set(step)}
    assert covered == set(pairs)


def test_plan_steps_repeats_an_image_rather_than_split_a_pair() -> None:
    # 3 slots, pairs of 2 disjoint images: the third slot repeats an image whose pair is complete.
    steps = plan_steps([(0, 1), (2, 3)], images_per_step=3, num_steps=4, seed=0)
    for step in steps:
        assert len(step) == 3 and len(set(step)) == 2
        assert set(step) in ({0, 1}, {2, 3})


def test_plan_steps_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError):
        plan_steps([(0, 1)], images_per_step=1, num_steps=1, seed=0)
    with pytest.raises(ValueError):
        plan_steps([], images_per_step=2, num_steps=1, seed=0)


def test_sampler_has_trls_repeat_layout() -> None:
    sampler = PairAwareSampler([(0, 1), (2, 3)], 2, num_generations=3, num_batches=2, repeat_count=2, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 2 * 2 * 3 * 2
    first = indices[:12]  # batch 1: each image G times in a row, the whole batch twice
    assert first[:6] == first[6:]
    assert [first[k] for k in range(0, 6, 3)] in ([0, 1], [1, 0], [2, 3], [3, 2])
    assert all(len(set(first[k : k + 3])) == 1 for k in range(0, 6, 3))


def test_sampler_plans_each_process_share_separately() -> None:
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    sampler = PairAwareSampler(pairs, 2, num_generations=1, num_batches=2, num_processes=2, seed=0)
    indices = list(sampler)
    shares = [indices[k : k + 2] for k in range(0, len(indices), 2)]  # consecutive per-process batches
    assert all(tuple(sorted(share)) in pairs for share in shares)


# ---- real TRL runs on the tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve_model(build_demo_model(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    folder = tmp_path_factory.mktemp("images")
    ids, paths = [], []
    for k in range(8):
        path = folder / f"im{k}.png"
        blurred(photo(seed=k // 2), 2.0 * (k % 2)).save(path)
        ids.append(path.name)
        paths.append(str(path))
    return ids, paths


def make_job(demo: ModelSource, images, out: Path, settings: TrainSettings = SETTINGS) -> TrainJob:
    ids, paths = images
    preferences = [(ids[i], ids[j], 1.0 if i % 2 < j % 2 else 0.5) for i, j in sample_pairs(8, 10, 2, seed=0)]
    return TrainJob(demo, ids, paths, preferences, settings, str(out))


@pytest.fixture(scope="module")
def lora_run(demo, images, tmp_path_factory):
    """One LoRA run whose reward calls are recorded, as TRL makes them."""
    out = tmp_path_factory.mktemp("lora")
    job = make_job(demo, images, out)
    trainer, tracker, reference = build_trainer(job, str(tmp_path_factory.mktemp("scratch")))
    sampler = trainer._get_train_sampler()
    trainer.train()
    trainer.model.save_pretrained(str(out), selected_adapters=["default"])
    return job, trainer, tracker, reference, sampler


def test_every_step_holds_both_images_of_each_pair_it_trains_on(lora_run) -> None:
    job, trainer, tracker, _, sampler = lora_run
    G, B = SETTINGS.generations, SETTINGS.images_per_step
    assert len(tracker.calls) == SETTINGS.steps  # one reward call per generation batch
    pairs = {frozenset((i, j)) for i, j, _ in job.preferences}
    ids = trainer.train_dataset["image_id"]
    for call, planned in zip(tracker.calls, sampler.steps, strict=True):
        counts = Counter(call)
        assert len(call) == B * G and all(n % G == 0 for n in counts.values())
        assert set(counts) == {ids[row] for row in planned}  # TRL drew exactly the planned images
        in_step = [pair for pair in pairs if pair & set(counts)]
        scheduled = [pair for pair in in_step if pair <= set(counts)]
        assert scheduled, "a step must train on at least one complete pair"
        for image in counts:  # every image has a partner present, so its reward means something
            assert any(image in pair for pair in scheduled)
    assert tracker.lone_images == 0


def test_constrained_rollouts_all_parse_and_weights_change(demo, lora_run) -> None:
    _, trainer, tracker, reference, _ = lora_run
    assert tracker.rollouts == SETTINGS.steps * SETTINGS.images_per_step * SETTINGS.generations
    assert tracker.unparsable == 0
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # zero-initialised, moved by training
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == SETTINGS.steps and all(0 < r <= 1.01 for r in rewards)
    assert reference == demo.root  # a fresh adapter: the KL reference is the base itself
    assert trainer.model.get_base_model().use_kernels is False  # no Hub kernels at train()


def test_lora_targets_only_the_language_model(lora_run) -> None:
    _, trainer, _, _, _ = lora_run
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in name and "lora_" in name for name in trainable)
    projections = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_later_lora_round_continues_the_adapter_against_the_root(demo, images, lora_run, tmp_path) -> None:
    adapter = Path(lora_run[0].output_dir)
    parent = ModelSource(str(adapter), "lora", demo.root, "v1", version=1, round=1, adapter_base=demo.root)
    trainer, _, reference = build_trainer(make_job(parent, images, tmp_path / "out"), str(tmp_path / "s"))
    assert "ref" not in trainer.model.peft_config  # TRL's copy of the adapter is dropped ...
    assert reference == demo.root  # ... so the KL reference is the base with adapters disabled
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = dict(trainer.model.named_parameters())
    key = next(k for k in saved if "lora_B" in k)
    name = key.replace(".weight", ".default.weight")
    assert torch.equal(loaded[name].detach(), saved[key]) and loaded[name].requires_grad


def test_too_short_a_budget_for_a_constrained_answer_is_refused(demo, images, tmp_path) -> None:
    settings = TrainSettings(generations=2, steps=1, max_completion_length=4, constrain_answers=True)
    with pytest.raises(ValueError, match="too short"):
        build_trainer(make_job(demo, images, tmp_path, settings), str(tmp_path / "s"))


def test_full_fine_tuning_saves_changed_weights_and_uses_the_root_as_reference(
    demo, images, tmp_path
) -> None:
    settings = TrainSettings(
        generations=2,
        steps=1,
        images_per_step=2,
        lora=False,
        learning_rate=1e-3,
        max_completion_length=16,
        constrain_answers=True,
    )
    stats = train_grpo(make_job(demo, images, tmp_path / "v1", settings))
    assert stats["steps"] == 1 and stats["reference_model"] == demo.root
    base = load_file(Path(demo.root) / "model.safetensors")
    tuned = load_file(tmp_path / "v1" / "model.safetensors")
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)

    # The next full round trains the v1 weights, with the root (not v1) as the KL reference.
    parent = ModelSource(str(tmp_path / "v1"), "full", demo.root, "v1", version=1, round=1)
    trainer, _, reference = build_trainer(
        make_job(parent, images, tmp_path / "v2", settings), str(tmp_path / "s")
    )
    assert reference == demo.root
    # Neither model swaps in kernels from the Hub when it trains on a GPU (transformers' default).
    assert trainer.model.use_kernels is False and trainer.ref_model.use_kernels is False
    ref_weights = dict(trainer.ref_model.named_parameters())
    name = next(k for k in ref_weights if k.endswith("lm_head.weight"))
    assert torch.equal(ref_weights[name].detach().cpu(), base["lm_head.weight"])
    assert not torch.equal(
        dict(trainer.model.named_parameters())[name].detach().cpu(), base["lm_head.weight"]
    )


def test_two_training_processes_keep_whole_pairs_on_each_rank(demo, images, tmp_path) -> None:
    """A torchrun job of two CPU ranks (gloo), as `EVOQ_TRAIN_PROCESSES=2` runs it: TRL computes rewards
    per rank, and every rank's reward calls hold whole pairs only; the ranks train on different images;
    the main rank reports steps; one adapter is saved."""
    settings = replace(SETTINGS, steps=2, processes=2)
    job = make_job(demo, images, tmp_path / "out", settings)
    reported: list[tuple[str, int, int]] = []
    stats = train_distributed(job, progress=lambda *step: reported.append(step))
    ranks = stats["ranks"]
    assert [share["process_index"] for share in ranks] == [0, 1] and stats["num_processes"] == 2
    for share in ranks:
        assert share["rollouts"] == settings.steps * settings.images_per_step * settings.generations
        assert share["lone_images"] == 0  # no image reached the reward without its partner
    assert set(ranks[0]["images_seen"]) != set(ranks[1]["images_seen"])  # each rank its own share
    assert reported and reported[-1] == ("training", 2, 2)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_stopped_torchrun_job_is_killed_with_every_rank(demo, images, tmp_path) -> None:
    """A round that fails beside its training (the parent's evaluation) kills the whole job."""
    settings = replace(SETTINGS, steps=50, processes=2)
    stop = threading.Event()
    with pytest.raises(TrainingFailed, match="stopped"):
        train_distributed(make_job(demo, images, tmp_path, settings), lambda *_: stop.set(), stop)
    time.sleep(1)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if "trainer.process" in " ".join(p.info["cmdline"] or [])
    ]
    assert not left
    assert not (tmp_path / "adapter_model.safetensors").exists()
