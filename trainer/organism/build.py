"""Build the model organism: a tiny Qwen2.5-VL with weak but real quality perception.

The real checkpoint cannot be downloaded here, and the random demo model perceives nothing (SRCC 0.03),
so EvoQuality's claim, that label-free rounds raise agreement with true quality, is measured on this
organism. It is the demo architecture (with one 224 x 224 attention window) given a supervised warm-up
on the `warmup` split only, the stand-in for a VLM's pretraining. The recipe is the one the second
probe found (shared/docs/organism-probe.md):

- stage A, a head start for the vision side: the vision tower and merger, with a throwaway linear head
  on every merged token and on their mean, regress the mos, five image statistics and the reference's
  warmth (the content the score targets are confounded with, so every seed's score path can learn it);
- stage B, a fine-tune of the whole model on both prompts (the votes of a round come from the compare
  prompt, so it must perceive too): answers `<think> </think>\\n\\boxed{X.XX}` and `\\boxed{0|1}`, the
  loss on the answer tokens only, the deciding digit weighted up.

EvoQuality can only lift a model whose pairwise majority knows something its absolute score does not
(the paper's premise: a base VLM's single ratings are noisy and biased, its voted comparisons less so).
A warm-up with the true mos for both prompts gives a base whose two prompts read the same features
equally well (measured: score-path pairwise accuracy 0.75, compare majority at infinite K 0.75), so
the pseudo-labels carry nothing new and a round cannot lift it. The default recipe therefore confounds
the warm-up's absolute ratings with content: score targets are `mos + 3 x warmth` (warmth, red over
blue in [-1, 1], has nothing to do with quality), while compare targets follow the true mos, as a
VLM's absolute ratings are swayed by content that its side-by-side judgements cancel. The organism's
score path is then biased (held-out SRCC 0.24-0.39 over eight seeds) while its votes are not (single
votes 0.63-0.73 right; the votes' own ranking 0.44-0.57).

It is seeded and deterministic for a given thread count, CPU and set of package versions (the same
build twice gives the same weights), runs on the CPU, and writes a folder that loads wherever a model
does (`evoq eval`, `evoq evolve`, the service, vLLM). It is marked as a demo:
it is an instrument, not an IQA model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from iqa.demo_model import build_demo_model
from iqa.engines.hf_loading import load_processor
from iqa.prompts import chat_messages, prompt_set
from trainer.organism.data import Sample, warmup_split
from trainer.organism.evaluate import THINK_FREE_PREFIX

ORGANISM_NAME = "demo organism (weak perception, not a real IQA model)"
RECIPE_FILE = "organism.json"


@dataclass(frozen=True)
class Recipe:
    """How the organism is built. The defaults are the measured recipe; every run with them is the same."""

    seed: int = 0
    warmup_sources: int = 600
    images_per_source: int = 6
    # Stage A. At 1500 steps its loss ended at 1.5-1.9 and some seeds' bases perceived little (seeds 15
    # and 16: SRCC 0.16); 3000 steps made all six probed seeds perceive (bench/results/
    # organism-2026-12-05-recipe-probes.md).
    head_steps: int = 3000
    head_lr: float = 3e-3
    head_batch: int = 16
    # Stage A also regresses the reference's warmth, so the vision side reliably carries the content the
    # score targets are confounded with. Without it, how well the score path learned the confound (and so
    # the votes' room over the scores) was left to the seed: room +0.015 to +0.30. With it, the three
    # seeds with the least room went from +0.015, +0.026, +0.090 to +0.283, +0.218, +0.251
    # (bench/results/organism-2026-12-06-warmth-probes.md).
    head_warmth: bool = True
    # Stage B. 800 steps strengthened the voter on seeds 4 and 10 but not on fresh seeds 14-16
    # (bench/results/organism-2026-12-05-stronger-voter.md), so it stays at 400.
    steps: int = 400
    score_batch: int = 8
    compare_batch: int = 16
    vision_frozen_steps: int = 150
    lr: float = 1e-3
    lr_vision: float = 3e-4
    lr_output: float = 3e-3
    digit_weight: float = 5.0
    score_label_noise: float = 0.0  # sd of Gaussian noise on the score targets
    # Score targets are mos + this x the reference's warmth: the absolute ratings of the warm-up are
    # confounded with content, its pairwise judgements are not (see the module docstring). With the
    # warmth in stage A, 4 left seed 25's base at SRCC 0.19, under the issue's 0.2 floor, and 3.5 at
    # 0.20; 3 put seeds 23-25 at 0.30-0.39 with room +0.13 to +0.22
    # (bench/results/organism-2026-12-06-bias-probes.md).
    score_content_bias: float = 3.0
    threads: int = 2


Log = Callable[[str], None]


def _statistics(image: Image.Image) -> list[float]:
    """Brightness, Laplacian energy, blur residual, contrast and horizontal gradient of the grey image."""
    grey = image.convert("L")
    g = np.asarray(grey, dtype=np.float32) / 255.0
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean()
    blurred = np.asarray(grey.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32) / 255.0
    residual = np.abs(g - blurred).mean()
    gradient = np.abs(np.diff(g, axis=1)).mean()
    return [float(g.mean()), float(lap), float(residual), float(g.std()), float(gradient)]


@dataclass
class _Encoded:
    """The warm-up split as model inputs: patch tensors, grids, ground truth and statistics."""

    pixels: torch.Tensor  # (N, patches, patch_dim), float16 to halve memory
    grid: torch.Tensor  # (1, 3), the same for every image (all are 224 x 224)
    mos: torch.Tensor  # (N,)
    stats: torch.Tensor  # (N, 5), or (N, 6) with the warmth; standardised


def _encode(samples: Sequence[Sample], processor: Any, warmth: bool = False) -> _Encoded:
    pixels, grid = [], None
    for sample in samples:
        out = processor.image_processor(images=[sample.image], return_tensors="pt")
        pixels.append(out["pixel_values"].to(torch.float16))
        grid = out["image_grid_thw"]
    stats = torch.tensor([_statistics(s.image) + ([s.warmth] if warmth else []) for s in samples])
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    return _Encoded(torch.stack(pixels), grid, torch.tensor([s.mos for s in samples]), stats)


def _stage_a(model: Any, data: _Encoded, recipe: Recipe, rng: np.random.Generator, log: Log) -> list[float]:
    """Vision tower + merger regress (mos, statistics) per token and per image mean."""
    visual = model.model.visual
    width = model.config.text_config.hidden_size
    head = torch.nn.Linear(width, 1 + data.stats.shape[1])
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.head_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    targets = torch.cat([((data.mos - 3.0) / 1.2)[:, None], data.stats], 1)
    weights = torch.tensor([3.0] + [1.0] * data.stats.shape[1])
    tokens = int(data.grid.prod()) // visual.spatial_merge_size**2
    losses: list[float] = []
    visual.train()
    for step in range(recipe.head_steps):
        idx = torch.from_numpy(rng.choice(len(data.mos), recipe.head_batch, replace=False))
        pixels = data.pixels[idx].flatten(0, 1).float()
        merged = visual(pixels, grid_thw=data.grid.repeat(len(idx), 1)).pooler_output
        merged = merged.view(len(idx), tokens, -1)
        target = targets[idx]
        per_token = ((head(merged) - target[:, None]) ** 2 * weights).mean()
        per_image = ((head(merged.mean(1)) - target) ** 2 * weights).mean()
        loss = per_token + per_image
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            log(f"stage A step {step + 1}/{recipe.head_steps}: loss {np.mean(losses[-250:]):.3f}")
    return losses


@dataclass
class _Template:
    """Token ids of one prompt with its answer, and where the answer's tokens are."""

    ids: torch.Tensor  # (L,)
    mm_types: torch.Tensor  # (L,) which tokens are image tokens: without it image tokens get text positions
    answer_start: int  # first target token (the `<think>`)
    digit_positions: list[int]  # positions of the answer characters (d . d d, or the vote digit)


def _template(processor: Any, text: str, n_images: int, answer: str, image: Image.Image) -> _Template:
    prompt = processor.apply_chat_template(
        chat_messages(text, n_images), add_generation_prompt=True, tokenize=False
    )
    full = prompt + THINK_FREE_PREFIX + answer + "}<|im_end|>"
    images = [image] * n_images
    encoded = processor(text=[full], images=images, return_tensors="pt")
    ids = encoded["input_ids"][0]
    prompt_ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    prompt_len = len(prompt_ids)
    if not torch.equal(ids[:prompt_len], prompt_ids):
        raise RuntimeError("the prompt's tokens are not a prefix of the prompt with its answer")
    n = len(answer)
    digit_positions = list(range(len(ids) - 2 - n, len(ids) - 2))
    decoded = processor.tokenizer.decode(ids[digit_positions])
    if decoded != answer:
        raise RuntimeError(f"answer tokens decode to {decoded!r}, not {answer!r}")
    return _Template(ids, encoded["mm_token_type_ids"][0], prompt_len, digit_positions)


def _digits_of(score: float) -> str:
    return f"{min(5.0, max(1.0, round(score, 2))):.2f}"


def _answer_loss(
    logits: torch.Tensor, ids: torch.Tensor, start: int, decider: int, weight: float
) -> torch.Tensor:
    """Cross-entropy on the answer tokens (predicted from the position before), `decider` weighted up."""
    predicted = logits[:, start - 1 : -1].float()
    target = ids[:, start:]
    token_loss = torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)
    weights = torch.ones(target.shape[1])
    weights[decider - start] = weight
    return (token_loss * weights).sum(1).mean() / weights.sum()


def _stage_b(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    data: _Encoded,
    recipe: Recipe,
    rng: np.random.Generator,
    log: Log,
) -> list[float]:
    """Fine-tune the whole model on score and compare examples (think-free answers)."""
    prompts = prompt_set("evoquality")
    tokenizer = processor.tokenizer
    score = _template(processor, prompts.score_text, 1, "5.00", samples[0].image)
    vote = _template(processor, prompts.compare_text, 2, "0", samples[0].image)
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    visual = list(model.model.visual.parameters())
    output = list(model.lm_head.parameters())
    taken = {id(p) for p in visual + output}
    rest = [p for p in model.parameters() if id(p) not in taken]
    optimizer = torch.optim.AdamW(
        [
            {"params": rest, "lr": recipe.lr},
            {"params": output, "lr": recipe.lr_output},
            {"params": visual, "lr": 0.0},
        ],
        weight_decay=0.0,
    )
    grid = data.grid
    losses: list[float] = []
    model.train()
    for step in range(recipe.steps):
        optimizer.param_groups[2]["lr"] = recipe.lr_vision if step >= recipe.vision_frozen_steps else 0.0
        # Score examples.
        idx = rng.choice(len(samples), recipe.score_batch, replace=False)
        ids = score.ids.repeat(len(idx), 1)
        for row, k in enumerate(idx):
            target = samples[k].mos + recipe.score_content_bias * samples[k].warmth
            target += rng.normal(0, recipe.score_label_noise) if recipe.score_label_noise else 0.0
            for pos, char in zip(score.digit_positions, _digits_of(target), strict=True):
                if char != ".":
                    ids[row, pos] = digit_ids[int(char)]
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=score.mm_types.repeat(len(idx), 1),
            pixel_values=data.pixels[idx].flatten(0, 1).float(),
            image_grid_thw=grid.repeat(len(idx), 1),
        ).logits
        loss = _answer_loss(logits, ids, score.answer_start, score.digit_positions[0], recipe.digit_weight)
        # Compare examples: two images of different quality, in random order.
        first, second = [], []
        while len(first) < recipe.compare_batch:
            a, b = (int(v) for v in rng.choice(len(samples), 2, replace=False))
            if samples[a].mos != samples[b].mos:
                first.append(a)
                second.append(b)
        ids = vote.ids.repeat(len(first), 1)
        for row, (a, b) in enumerate(zip(first, second, strict=True)):
            answer = 0 if samples[a].mos > samples[b].mos else 1
            ids[row, vote.digit_positions[0]] = digit_ids[answer]
        pair_pixels = torch.stack([data.pixels[first], data.pixels[second]], 1).flatten(0, 2).float()
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=vote.mm_types.repeat(len(first), 1),
            pixel_values=pair_pixels,
            image_grid_thw=grid.repeat(2 * len(first), 1),
        ).logits
        loss = loss + _answer_loss(
            logits, ids, vote.answer_start, vote.digit_positions[0], recipe.digit_weight
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"stage B step {step + 1}/{recipe.steps}: loss {np.mean(losses[-50:]):.3f}")
    return losses


def build_environment() -> dict[str, Any]:
    """What besides the recipe decides the weights: float rounding differs between CPU instruction sets
    and library versions, and 1,900 training steps amplify it. Seed 0's base measured held-out SRCC
    0.251, 0.317 and 0.293 when built in three sessions' environments (package versions floated then;
    requirements.lock pins them now), so a base is compared with another only where these match."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = cpuinfo.split()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    packages = {}
    for name in ("torch", "transformers", "numpy", "pillow", "scikit-image", "tokenizers"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": model or platform.machine(),
        "isa": [isa for isa in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma") if isa in flags],
        "threads": torch.get_num_threads(),
        "packages": packages,
    }


def build_organism(out_dir: str | Path, recipe: Recipe | None = None, log: Log = print) -> Path:
    """Write the organism base to `out_dir` (a demo-model folder with trained weights); returns it."""
    from transformers import AutoModelForImageTextToText

    recipe = recipe or Recipe()
    torch.set_num_threads(recipe.threads)
    out = Path(out_dir)
    started = time.perf_counter()
    build_demo_model(out, seed=recipe.seed, vision_window=224, name=ORGANISM_NAME)
    processor = load_processor(str(out))
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
    rng = np.random.default_rng(recipe.seed)
    torch.manual_seed(recipe.seed)

    samples = warmup_split(recipe.warmup_sources, recipe.images_per_source, recipe.seed)
    data = _encode(samples, processor, recipe.head_warmth)
    timings = {"data_s": time.perf_counter() - started}
    log(f"warm-up split: {len(samples)} images, {recipe.warmup_sources} sources ({timings['data_s']:.0f} s)")
    mark = time.perf_counter()
    head_losses = _stage_a(model, data, recipe, rng, log)
    timings["stage_a_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    losses = _stage_b(model, processor, samples, data, recipe, rng, log)
    timings["stage_b_s"] = time.perf_counter() - mark
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    timings["total_s"] = time.perf_counter() - started
    record = {
        "recipe": asdict(recipe),
        "warmup_images": len(samples),
        "timings": timings,
        "stage_a_loss_last": float(np.mean(head_losses[-100:])),
        "stage_b_loss_last": float(np.mean(losses[-50:])),
        "environment": build_environment(),
    }
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"organism built in {timings['total_s']:.0f} s: {out}")
    return out


def ensure_organism(
    out_dir: str | Path, recipe: Recipe, log: Log = print, rebuild: bool = False
) -> dict[str, Any]:
    """The base in `out_dir`, built unless one from the same recipe is there (benches reuse it);
    returns its build record (`organism.json`)."""
    record = Path(out_dir) / RECIPE_FILE
    built = json.loads(record.read_text())["recipe"] if record.is_file() else None
    if rebuild or built != asdict(recipe):
        build_organism(out_dir, recipe, log)
    return json.loads(record.read_text())
