"""Round benchmark: the time of each stage of one EvoQuality round, votes per second and peak memory.

One command, offline, on the tiny demo model: `.venv/bin/python bench/round.py` (default: 64 images,
128 pairs, K = 8 votes, G = 4 rollouts, 8 GRPO steps of 4 images). It builds the demo model and a pool
of generated images (photos, blurred and noisy copies) in a temporary folder and runs
`trainer.round.run_round` as `evoq evolve` does: voting and held-out scoring on the local engine in
this process, GRPO in a spawned child process. Stages:

  - voting: M pairs x K votes, each request n = K/2 samples per image order;
  - training: the child process end to end (start-up and imports, model load, GRPO, saving);
  - evaluation: held-out images scored by the old model and by the new one.

Peak memory is the peak resident set of this process (engine + voting) and of the training child.
On a GPU machine (`--device cuda`) it also reports the child's peak CUDA memory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

console = Console(width=None if sys.stdout.isatty() else 120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images in the pool")
    parser.add_argument("--pairs", type=int, default=128, help="pairs M")
    parser.add_argument("--votes", type=int, default=8, help="votes K per pair")
    parser.add_argument("--generations", type=int, default=4, help="GRPO rollouts G per image")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps")
    parser.add_argument("--images-per-step", type=int, default=4, help="images per GRPO step")
    parser.add_argument("--eval-samples", type=int, default=4, help="score samples per held-out image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's own (48)")
    parser.add_argument("--model", default=None, help="model folder; default: a fresh demo model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def make_pool(folder: Path, n: int) -> None:
    """n distinct images: a photo per seed, in turn sharp, blurred or noisy."""
    from tests.imagegen import blurred, noisy, photo

    for k in range(n):
        image = photo(seed=k // 3)
        image = [image, blurred(image, 1.5 + k % 4), noisy(image, 10.0 + 5 * (k % 5), seed=k)][k % 3]
        image.save(folder / f"img{k:03d}.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from iqa.demo_model import build_demo_model
    from trainer.cli import quiet_libraries
    from trainer.config import RoundConfig, TrainSettings
    from trainer.round import peak_rss_mb, run_round

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="evoq-bench-round-") as tmp:
        root = Path(tmp)
        model = args.model or str(build_demo_model(root / "demo"))
        (root / "pool").mkdir()
        make_pool(root / "pool", args.images)
        config = RoundConfig(
            pairs=args.pairs,
            votes=args.votes,
            eval_samples=args.eval_samples,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            train=TrainSettings(
                generations=args.generations, steps=args.steps, images_per_step=args.images_per_step
            ),
        )
        started = time.perf_counter()
        result = asyncio.run(run_round(model, root / "pool", root / "out", config))
        wall = time.perf_counter() - started
    report(result.manifest, wall, peak_rss_mb())


def report(manifest: dict, wall: float, peaks: dict[str, float]) -> None:
    timings, labels, training = manifest["timings"], manifest["pseudo_labels"], manifest["training"]
    settings = manifest["settings"]
    evaluation = timings["scoring_before_s"] + timings["scoring_after_s"]
    rollouts = training["rollouts"]
    table = Table(
        title=(
            f"one round: {manifest['pool']['images']} images, {labels['pairs']} pairs, "
            f"K={labels['votes_per_pair']}, G={settings['train']['generations']}, "
            f"{training['steps']} steps x {settings['train']['images_per_step']} images"
        )
    )
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("throughput", justify="right")
    table.add_row(
        "voting", f"{timings['voting_s']:.1f}", f"{labels['votes'] / timings['voting_s']:.1f} votes/s"
    )
    table.add_row(
        "training (child, total)",
        f"{timings['training_s']:.1f}",
        f"{rollouts / timings['training_s']:.1f} rollouts/s",
    )
    if training["runtime_s"]:
        table.add_row(
            "  of which GRPO steps",
            f"{training['runtime_s']:.1f}",
            f"{training['runtime_s'] / max(1, training['steps']):.2f} s/step",
        )
    images = manifest["metrics"]["before"]["images"] + manifest["metrics"]["after"]["images"]
    table.add_row("evaluation (old + new)", f"{evaluation:.1f}", f"{images / evaluation:.1f} images/s")
    table.add_row("round (wall)", f"{wall:.1f}", "")
    console.print(table)
    memory = f"peak RSS: this process {peaks['self']:.0f} MiB, training child {peaks['children']:.0f} MiB"
    if training.get("peak_gpu_mb"):
        memory += f", training child CUDA {training['peak_gpu_mb']:.0f} MiB"
    console.print(memory)
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    agreement = [m["holdout_agreement"] for m in (before, after)]
    console.print(
        "held-out agreement " + " -> ".join("-" if a is None else f"{a:.3f}" for a in agreement) + ", "
        f"reward {training['reward_first']:.3f} -> {training['reward_last']:.3f} (demo model: random)"
    )


if __name__ == "__main__":
    main()
