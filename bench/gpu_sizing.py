"""GPU sizing on the real Qwen2.5-VL architectures, randomly initialised (no hub needed).

What a deployment has to size, measured with the project's own code on one GPU:

- `score`: the local engine (`iqa.engines.local.LocalEngine`) on Qwen2.5-VL-7B: load time, latency of a
  fast score (one reading) and of a sampled score (8 completions of `--tokens` tokens), alone and with 8
  requests at once.
- `lora`: GRPO steps of `trainer.grpo.build_trainer` with a LoRA on 7B: seconds per step, peak GPU memory.
- `full`: the same with full fine-tuning (fp32 master weights, as the service trains) on 3B and then 7B.

The models come from the public config values of Qwen2.5-VL-3B/7B-Instruct with random weights and a
tokenizer padded to Qwen's 151,665 tokens, so vocabulary-sized tensors (embeddings, logits) are real.
A random model never ends a completion early: every rollout and sample runs the full `--tokens`, the
worst case (the paper's completions average about 300 tokens). Rewards are 0 (nothing parses), which
changes no step's cost.

Each phase runs in its own process (an out-of-memory in one leaves the others' figures) and appends one
JSON line to `OUT/sizing.jsonl`. `--tiny` runs the same phases with tiny sizes on the CPU, to check the
script here before a GPU is spent on it.

    python bench/gpu_sizing.py --out /tmp/sizing [--tiny] [--budget-s 480] [--only build lora full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN_TOKENS = 151_665  # len(tokenizer) of the Qwen2.5-VL checkpoints; the embedding is padded past it
VISION = {  # Qwen2.5-VL-3B and -7B share the vision tower
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
ARCHS: dict[str, dict[str, Any]] = {
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152_064,
        },
        "tie": False,
    },
    "3b": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151_936,
        },
        "tie": True,
    },
}
TINY = {  # the same phases on the CPU in seconds: head_dim 32, mrope 4+6+6
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 2048,
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "fullatt_block_indexes": [1],
    },
    "tie": False,
}


def log(out: Path, record: dict[str, Any]) -> None:
    """Append one phase's figures to OUT/sizing.jsonl and print them."""
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "sizing.jsonl").open("a") as f:
        f.write(line + "\n")


def padded_tokenizer(folder: Path, tokens: int) -> None:
    """Pad the demo tokenizer's vocabulary with inert entries to `tokens` (decodable, never produced)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data["added_tokens"]}
    for i in range(max(taken) + 1, tokens):
        vocab[f"fill{i}"] = i
    path.write_text(json.dumps(data))


def build_model(folder: Path, arch: str, tiny: bool, tokens: int) -> dict[str, Any]:
    """Write a random model of `arch` with a processor to `folder` (bf16 on GPU, fp32 tiny on CPU)."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from iqa.demo_model import SPECIAL_TOKENS, _chat_template, build_tokenizer

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    tokenizer.chat_template = _chat_template()
    tokenizer.save_pretrained(folder)
    vocab = 2048 if tiny else QWEN_TOKENS
    padded_tokenizer(folder, vocab)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    spec = TINY if tiny else ARCHS[arch]
    text = {
        **spec["text"],
        "max_position_embeddings": 128_000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [4, 6, 6] if tiny else [16, 24, 24],
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": spec["tie"],
    }
    vision = {**VISION, **spec.get("vision", {}), "out_hidden_size": text["hidden_size"]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"],
    )
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    built = time.perf_counter()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=1.0,
        max_new_tokens=tokens,
    )
    model.save_pretrained(folder, safe_serialization=True)
    # Qwen2.5-VL's own pixel limits; the service caps images at EVOQ_MODEL_MAX_PIXELS anyway.
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12_845_056).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    (folder / "chat_template.jinja").write_text(_chat_template())
    params = sum(p.numel() for p in model.parameters())
    return {
        "params_b": params / 1e9,
        "init_s": built - started,
        "save_s": time.perf_counter() - built,
        "len_tokenizer": len(tokenizer),
    }


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Smooth random photos-like JPEGs (content does not change a random model's cost)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        path = folder / f"img{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def phase_score(model: Path, work: Path, tokens: int, tiny: bool) -> dict[str, Any]:
    """Load the local engine and time fast and sampled scores, one at a time and 8 at once."""
    import torch
    from PIL import Image

    from iqa.engines.base import ModelSpec, Sampling
    from iqa.engines.local import LocalEngine
    from iqa.reading import read_score
    from iqa.scoring import score_image

    images = [Image.open(p).convert("RGB") for p in make_images(work / "images", 16, (640, 480))]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=tokens)
    device = "cpu" if tiny else "cuda"

    async def run() -> dict[str, Any]:
        engine = LocalEngine(ModelSpec(1, "sizing", "base", str(model)), device=device, max_batch_rows=64)
        started = time.perf_counter()
        await engine.start()
        figures: dict[str, Any] = {"load_s": time.perf_counter() - started}

        async def timed(make, count: int) -> list[float]:
            async def one(i: int) -> float:
                t = time.perf_counter()
                await make(images[i % len(images)])
                return time.perf_counter() - t

            return list(await asyncio.gather(*(one(i) for i in range(count))))

        def fast(image):
            return read_score(engine, image, "evoquality")

        def sampled(image):
            return score_image(engine, image, 8, sampling, "evoquality")

        await timed(fast, 2)  # warm-up: kernels, allocator
        await timed(sampled, 1)
        single = [(await timed(fast, 1))[0] for _ in range(5)]
        figures["fast_p50_s"] = statistics.median(single)
        t = time.perf_counter()
        await timed(fast, 8)
        figures["fast_8_at_once_s"] = time.perf_counter() - t
        single = [(await timed(sampled, 1))[0] for _ in range(2)]
        figures["sampled_p50_s"] = statistics.median(single)
        t = time.perf_counter()
        await timed(sampled, 8)
        figures["sampled_8_at_once_s"] = time.perf_counter() - t
        figures["sampled_tokens_per_s_8_at_once"] = 8 * 8 * tokens / figures["sampled_8_at_once_s"]
        figures["batches_run"] = engine.batches_run
        await engine.close()
        return figures

    if not tiny:
        torch.cuda.reset_peak_memory_stats()
    figures = asyncio.run(run())
    if not tiny:
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def phase_train(
    model: Path, work: Path, tokens: int, tiny: bool, lora: bool, steps: int, generations: int
) -> dict[str, Any]:
    """`steps` GRPO steps through `trainer.grpo.build_trainer`, 4 images (2 pairs) per step."""
    import tempfile

    import torch

    from trainer.checkpoint import ModelSource
    from trainer.config import TrainJob, TrainSettings
    from trainer.grpo import build_trainer

    paths = make_images(work / "images", 16, (640, 480))
    ids = [p.stem for p in paths]
    preferences = [(ids[k], ids[k + 1], float(k % 4 == 0)) for k in range(0, 16, 2)]
    settings = TrainSettings(
        generations=generations,
        steps=steps,
        images_per_step=4,
        max_completion_length=tokens,
        lora=lora,
        gradient_checkpointing=True,  # what the service uses on a GPU
        constrain_answers=False,
        device="cpu" if tiny else "cuda",
    )
    source = ModelSource(path=str(model), kind="base", root=str(model), name="sizing")
    job = TrainJob(source, ids, [str(p) for p in paths], preferences, settings, str(work / "trained"))
    marks: list[float] = []
    started = time.perf_counter()
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:

        def mark(step: int, total: int) -> None:
            marks.append(time.perf_counter())

        trainer, _, _ = build_trainer(job, scratch, on_step=mark)
        ready = time.perf_counter()
        trainer.train()
    step_s = [b - a for a, b in zip([ready, *marks], marks, strict=False)]
    figures = {
        "method": "lora" if lora else "full",
        "load_s": ready - started,
        "step_s": step_s,
        "rows_per_step": 4 * generations,
        "completion_tokens": tokens,
        "trainable_b": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e9,
        "mean_completion_length": [h.get("completions/mean_length") for h in trainer.state.log_history],
    }
    if not tiny:
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return figures


def run_phase(args: argparse.Namespace) -> None:
    """One phase, in this process; its figures or its failure become one line of sizing.jsonl."""
    out, work = Path(args.out), Path(args.work)
    model = work / f"model-{args.arch}"
    record: dict[str, Any] = {"phase": args.phase, "arch": "tiny" if args.tiny else args.arch}
    started = time.perf_counter()
    try:
        if args.phase == "build":
            record.update(build_model(model, args.arch, args.tiny, args.tokens))
        elif args.phase == "score":
            record.update(phase_score(model, work, args.tokens, args.tiny))
        else:
            lora = args.phase == "lora"
            record.update(
                phase_train(model, work, args.tokens, args.tiny, lora, args.steps, args.generations)
            )
    except Exception as error:  # an OOM is a figure too: where it failed and with what
        record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        record["trace"] = traceback.format_exc()[-1500:]
        if not args.tiny:
            import torch

            record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["wall_s"] = time.perf_counter() - started
    log(out, record)


PLAN = [  # (phase, arch, extra args); run in order while the budget lasts
    ("build", "7b", []),
    ("score", "7b", []),
    ("lora", "7b", ["--steps", "3"]),
    ("build", "3b", []),
    ("full", "3b", ["--steps", "2"]),
    ("full", "7b", ["--steps", "2"]),
]


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", required=True, help="folder for sizing.jsonl")
    parser.add_argument("--work", default=None, help="scratch folder for models (default OUT/work)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: checks the script")
    parser.add_argument("--tokens", type=int, default=256, help="completion length of samples and rollouts")
    parser.add_argument("--generations", type=int, default=8, help="GRPO group size G")
    parser.add_argument("--budget-s", type=float, default=480, help="start no phase after this many seconds")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these phases, e.g. --only build lora full"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="7b", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or str(out / "work")
    if args.phase:
        run_phase(args)
        return
    started = time.perf_counter()
    common = ["--out", str(out), "--work", args.work, "--tokens", str(args.tokens)]
    common += ["--generations", str(args.generations)] + (["--tiny"] if args.tiny else [])
    for phase, arch, extra in PLAN:
        if (args.tiny and arch != "7b") or (args.only and phase not in args.only):
            continue  # one tiny model stands for both
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            log(out, {"phase": phase, "arch": arch, "skipped": "budget spent"})
            continue
        command = [sys.executable, __file__, "--phase", phase, "--arch", arch, *common, *extra]
        try:
            subprocess.run(command, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            log(out, {"phase": phase, "arch": arch, "error": f"timed out after {left:.0f} s"})
    print(f"sizing: done in {time.perf_counter() - started:.0f} s; figures in {out / 'sizing.jsonl'}")


if __name__ == "__main__":
    main()
