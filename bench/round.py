"""Round benchmark: the time of each stage of one EvoQuality round, votes per second and peak memory.

One command, offline, on the tiny demo model: `.venv/bin/python bench/round.py` (default: 64 images,
128 pairs, K = 8 votes, G = 4 rollouts, 8 GRPO steps of 4 images, the service's other round
settings). It builds the demo model and a pool of generated images (photos, blurred and noisy copies)
in a temporary folder and runs `trainer.round.run_round` as `evoq evolve` does: voting and held-out
scoring on the local engine in this process, GRPO in a spawned child process. Stages:

  - voting: M pairs x K votes, each request n = K/2 samples per image order;
  - training: the child process end to end (start-up and imports, model load, GRPO, saving);
  - evaluation: held-out images scored by the old model and by the new one (on the vLLM path the old
    model's runs beside the training: vLLM holds it anyway).

Peak memory is the peak resident set of this process (engine + voting) and of the training child.
On a GPU machine (`--device cuda`) it also reports the child's peak CUDA memory.

`--engine vllm` runs the round as the service's worker does with `EVOQ_ENGINE=vllm`
(`trainer.lifecycle.WorkerEngines`: votes and held-out scores on a vLLM server started from `.venv-vllm`,
the candidate scored there as a LoRA adapter) and prints the figures of the production path:

  - votes/s of the round against the same vote requests sent straight to vLLM by a plain client
    (same pairs, image orders, n, regex and concurrency; target >= 0.9x);
  - the share of the round's wall time outside voting and training (target <= 5%);
  - the p50 latency of a client's score request (8 samples, foreground priority, one at a time) while
    the round's voting stage runs, against the same requests on an idle server (target <= 1.5x), and
    the votes/s the round keeps meanwhile.

The round itself runs with no client beside it (round work yields to clients, so a client would
lower its votes/s); the latency figure comes from a second pass of its voting stage (`vote_pairs` on
the round's engine and pairs) with the client sending requests the whole time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
    parser.add_argument(
        "--eval-samples", type=int, default=None, help="score samples per held-out image (default: service's)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's own (48)")
    parser.add_argument("--model", default=None, help="model folder; default: a fresh demo model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--engine", choices=["local", "vllm"], default="local", help="where votes go")
    parser.add_argument("--probe-requests", type=int, default=20, help="vllm: idle score requests timed")
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
            eval_samples=args.eval_samples or RoundConfig.eval_samples,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            train=TrainSettings(
                generations=args.generations, steps=args.steps, images_per_step=args.images_per_step
            ),
        )
        if args.engine == "vllm":
            asyncio.run(run_on_vllm(args, root, Path(model), config))
            return
        started = time.perf_counter()
        result = asyncio.run(run_round(model, root / "pool", root / "out", config))
        wall = time.perf_counter() - started
    report(result.manifest, wall, peak_rss_mb())


async def score_latencies(engine, images: list, stop: asyncio.Event | None, count: int) -> list[tuple]:
    """(start time, ms) of score requests sent one at a time at client priority, until `stop` or `count`."""
    from iqa.engines.base import Sampling
    from iqa.scoring import score_image

    sampling = Sampling(constrain="score")
    out: list[tuple[float, float]] = []
    k = 0
    while (stop is None and len(out) < count) or (stop is not None and not stop.is_set()):
        started = time.perf_counter()
        await score_image(engine, images[k % len(images)], 8, sampling, "evoquality")
        out.append((started, (time.perf_counter() - started) * 1000))
        k += 1
    return out


async def direct_votes(
    url: str, adapter: str, max_tokens: int, images: dict, labels: list[dict], config
) -> float:
    """Seconds for the round's vote requests sent straight to vLLM (same structure and concurrency)."""
    import httpx

    from iqa.engines.base import GenerationRequest, Sampling
    from iqa.engines.vllm import chat_payload, image_data_url
    from iqa.prompts import prompt_set
    from iqa.scoring import split_votes

    text = prompt_set(config.profile).compare_text
    sampling = Sampling(temperature=config.temperature, constrain="vote")
    urls = {name: image_data_url(image, config.max_pixels) for name, image in images.items()}
    n_ab, n_ba = split_votes(config.votes)
    bodies = []
    for row in labels:
        a, b = row["image_i"], row["image_j"]
        bodies.append(
            [
                chat_payload(
                    adapter,
                    GenerationRequest((images[x], images[y]), text, n, sampling),
                    [urls[x], urls[y]],
                    max_tokens,
                    config.profile,
                )
                for (x, y), n in (((a, b), n_ab), ((b, a), n_ba))
            ]
        )
    semaphore = asyncio.Semaphore(config.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def pair(requests: list[dict]) -> None:
            async with semaphore:
                answers = await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=r) for r in requests)
                )
                assert all(a.status_code == 200 for a in answers), answers[0].text

        for cache in ("/reset_prefix_cache", "/reset_encoder_cache"):  # the round saw these prompts first
            assert (await client.post(cache)).status_code == 200
        started = time.perf_counter()
        await asyncio.gather(*(pair(r) for r in bodies))
        return time.perf_counter() - started


async def run_on_vllm(args: argparse.Namespace, root: Path, model: Path, config) -> None:
    """The round on a vLLM server as the worker runs it; then its voting again beside a client."""
    from dataclasses import replace

    from iqa.engines import build_engine
    from iqa.engines.base import ModelSpec
    from iqa.settings import Settings
    from tests.imagegen import photo
    from tests.vllm.server import MAX_LORA_RANK, VLLMServer
    from trainer.checkpoint import resolve_model
    from trainer.lifecycle import WorkerEngines
    from trainer.pool import load_pool
    from trainer.round import _sampling, peak_rss_mb, run_round
    from trainer.voting import vote_pairs

    server = VLLMServer(model, root / "vllm.log")
    start_s = await asyncio.to_thread(server.start)
    try:
        settings = Settings(
            _env_file=None, data_dir=root, engine="vllm", vllm_url=server.url, device=args.device
        )
        serving = build_engine(settings, ModelSpec(0, "demo", "base", str(model), untrained=True))
        await serving.start()
        probe_images = [photo(320, 240, seed=5000 + k) for k in range(8)]
        idle = await score_latencies(serving, probe_images, None, args.probe_requests)
        config = replace(
            config,
            train=replace(config.train, lora_rank=MAX_LORA_RANK, lora_alpha=2 * MAX_LORA_RANK),
        )
        engines = WorkerEngines(settings, None)  # type: ignore[arg-type]  # no database: nothing is promoted
        started = time.perf_counter()
        result = await run_round(model, root / "pool", root / "out", config, engines=engines)
        wall = time.perf_counter() - started
        await engines.discard()

        pool = load_pool(root / "pool", config.max_pixels)
        images = dict(zip(pool.ids, pool.images, strict=True))
        random_pairs = [row for row in result.labels if row["kind"] == "random"]
        route = serving._route
        max_tokens = config.max_new_tokens or route.max_new_tokens
        direct_s = await direct_votes(server.url, route.adapter, max_tokens, images, random_pairs, config)

        # The voting stage again, now with a client's score requests beside it the whole time.
        index = {image_id: k for k, image_id in enumerate(pool.ids)}
        pairs = [(index[row["image_i"]], index[row["image_j"]]) for row in random_pairs]
        parent = resolve_model(model)
        stop = asyncio.Event()
        probe = asyncio.create_task(score_latencies(serving, probe_images, stop, 0))
        async with engines.parent(parent.spec()) as engine:
            mark = time.perf_counter()
            beside = await vote_pairs(
                engine,
                pool.images,
                pairs,
                config.votes,
                _sampling(config, parent.untrained, "vote"),  # as the round votes
                config.profile,
                config.concurrency,
            )
            beside_s = time.perf_counter() - mark
        stop.set()
        during = await probe
        await serving.close()
    finally:
        server.stop()
    report(result.manifest, wall, peak_rss_mb())
    timings, labels = result.manifest["timings"], result.manifest["pseudo_labels"]
    round_rate = labels["votes"] / timings["voting_s"]
    direct_rate = len(random_pairs) * config.votes / direct_s
    beside_rate = beside.votes / beside_s
    outside = wall - timings["voting_s"] - timings["training_s"]
    p50_idle = statistics.median(ms for _, ms in idle)
    p50_voting = statistics.median(ms for _, ms in during) if during else float("nan")
    table = Table(title=f"the vLLM path (vLLM healthy after {start_s:.0f} s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "round votes/s vs direct to vLLM",
        f"{round_rate:.1f} / {direct_rate:.1f} = {round_rate / direct_rate:.2f}x",
        ">= 0.9x",
    )
    table.add_row(
        "round outside voting and training", f"{outside:.1f} s = {100 * outside / wall:.1f}%", "<= 5%"
    )
    after = timings["scoring_after_s"]  # the parent's evaluation ran beside the training
    table.add_row("  of which the candidate's evaluation", f"{after:.1f} s = {100 * after / wall:.1f}%", "")
    load = timings["candidate_load_s"]
    table.add_row("    of which loading it into vLLM", f"{load:.1f} s = {100 * load / wall:.1f}%", "")
    table.add_row(
        "client score p50 while voting vs idle",
        f"{p50_voting:.0f} / {p50_idle:.0f} ms = {p50_voting / p50_idle:.2f}x ({len(during)} requests)",
        "<= 1.5x",
    )
    table.add_row("  votes/s meanwhile", f"{beside_rate:.1f} = {beside_rate / round_rate:.2f}x of alone", "")
    console.print(table)


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
