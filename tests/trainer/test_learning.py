"""Does GRPO with the fidelity reward move the model the right way? (slow: ~40 s on 2 idle cores)

Images of known quality order (a photo, then progressively noisier copies); scripted pseudo-labels that
say the cleaner image of every cross-level pair is better, in place of votes; a short LoRA GRPO run on
the tiny model. The model's opinion is read without sampling noise: the rollouts answer at once (the
completion budget leaves no room to think), so its expected score is exact from the logits after the
forced `</think>\\n\\boxed{` - E[first digit] + E[second digit] / 10.

What it shows at this scale (G = 8, 30 steps; the test prints the figures): on the training pairs the
agreement with the true order rises from 0.354 to 0.708 and the mean score margin of the better image
turns from -0.0011 to +0.0045. The random 215K-parameter model's answers barely depend on the image
(expected scores differ by ~0.001 between images), so there is little image signal to amplify, and
12 training images do not teach "noise is bad" in general: held-out images stay at 0.583.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from iqa.demo_model import build_demo_model
from iqa.engines.hf_loading import load_model
from iqa.prompts import chat_messages, prompt_set
from tests.imagegen import noisy, photo
from trainer.checkpoint import ModelSource, copy_processor_files, resolve_model
from trainer.config import TrainJob, TrainSettings
from trainer.grpo import train_grpo
from trainer.pool import load_image

pytestmark = pytest.mark.slow

NOISE = (0.0, 20.0, 40.0)  # level 0 is the best
ANSWER_ONLY = 14  # tokens of `</think>\n\boxed{d.dd}` + end: the constrained rollout has no thinking


@torch.no_grad()
def expected_scores(spec, paths: list[str]) -> list[float]:
    """E[score] of each image under the constrained, think-free answer (decimals past the first ignored)."""
    loaded = load_model(spec, device="cpu")
    processor, model = loaded.processor, loaded.model
    prefix = processor.apply_chat_template(
        chat_messages(prompt_set("evoquality").score_text, 1), add_generation_prompt=True, tokenize=False
    )
    prefix += "</think>\n\\boxed{"
    digits = [processor.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    def next_digit(text: str, image, allowed: list[int]) -> torch.Tensor:
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        return torch.softmax(model(**inputs).logits[0, -1, [digits[d] for d in allowed]], -1)

    scores = []
    for path in paths:
        image = load_image(Path(path), 1280 * 28 * 28)
        first = next_digit(prefix, image, [1, 2, 3, 4, 5])
        total = 0.0
        for p1, d1 in zip(first.tolist(), range(1, 6), strict=True):
            if d1 == 5:  # the grammar allows only 5.00
                total += p1 * 5
                continue
            second = next_digit(f"{prefix}{d1}.", image, list(range(10)))
            total += p1 * (d1 + float((second * torch.arange(10)).sum()) / 10)
        scores.append(total)
    return scores


def order_figures(scores: list[float], levels: list[int]) -> tuple[float, float]:
    """(share of cross-level pairs in the true order, mean score margin of the better image)."""
    right, margins = 0, []
    for a, b in itertools.combinations(range(len(scores)), 2):
        if levels[a] == levels[b]:
            continue
        better, worse = (a, b) if levels[a] < levels[b] else (b, a)
        margins.append(scores[better] - scores[worse])
        right += scores[better] > scores[worse]
    return right / len(margins), sum(margins) / len(margins)


def graded_images(folder: Path, seeds: range) -> tuple[list[str], list[str], list[int]]:
    ids, paths, levels = [], [], []
    for seed in seeds:
        for level, sigma in enumerate(NOISE):
            path = folder / f"s{seed}_n{level}.png"
            noisy(photo(seed=seed), sigma, seed=seed).save(path)
            ids.append(path.name)
            paths.append(str(path))
            levels.append(level)
    return ids, paths, levels


def test_grpo_on_known_order_raises_agreement_with_it(tmp_path: Path) -> None:
    demo = resolve_model(build_demo_model(tmp_path / "demo"))
    ids, paths, levels = graded_images(tmp_path, range(4))
    _, held_paths, held_levels = graded_images(tmp_path, range(10, 14))
    level = dict(zip(ids, levels, strict=True))
    preferences = [
        (a, b, 1.0 if level[a] < level[b] else 0.0)
        for a, b in itertools.combinations(ids, 2)
        if level[a] != level[b]
    ]
    settings = TrainSettings(
        generations=8,
        steps=30,
        images_per_step=4,
        learning_rate=2e-3,
        max_completion_length=ANSWER_ONLY,
        constrain_answers=True,
    )
    out = tmp_path / "lora"
    stats = train_grpo(TrainJob(demo, ids, paths, preferences, settings, str(out)))
    copy_processor_files(demo.root, out)
    tuned = ModelSource(str(out), "lora", demo.root, "tuned", adapter_base=demo.root, untrained=True)

    before = order_figures(expected_scores(demo.spec(), paths), levels)
    after = order_figures(expected_scores(tuned.spec(), paths), levels)
    held_before = order_figures(expected_scores(demo.spec(), held_paths), held_levels)
    held_after = order_figures(expected_scores(tuned.spec(), held_paths), held_levels)
    print(
        f"\ntraining pairs: agreement {before[0]:.3f} -> {after[0]:.3f}, "
        f"margin {before[1]:+.5f} -> {after[1]:+.5f}"
        f"\nheld-out pairs: agreement {held_before[0]:.3f} -> {held_after[0]:.3f}, "
        f"margin {held_before[1]:+.5f} -> {held_after[1]:+.5f}"
        f"\nreward per step: {[round(s['reward'], 3) for s in stats['per_step']]}"
    )
    assert stats["parse_failure_rate"] == 0.0
    assert after[0] > before[0] and after[1] > before[1]
