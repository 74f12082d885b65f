"""Inference quality on the model organism: one-pass (fast) scores vs sampled ones, and ranking a set
by pairwise votes (`/v1/rank`'s plan) vs scoring its images one by one at the same generated tokens.

`.venv/bin/python bench/inference_quality.py --out DIR` (offline, CPU): builds the organism base in
`DIR/base` (or reuses it: about 5 minutes the first time), loads it in the service's local engine,
and on the organism's held-out split (labelled; the truth is read only for the figures) measures:

  - per image, SRCC/PLCC/KRCC against the true quality of the fast score (one forward pass, no token
    generated, deterministic) and of the sampled score at n samples (the service's default, 8),
    repeated `--repeats` times with fresh samples (their spread is the sampled score's noise), with
    the wall time and generated tokens per image;
  - per set (each held-out reference with all its renditions, as a user choosing the best of many
    versions of one picture): SRCC within the set of the `/v1/rank` plan (its default budget,
    `compare_votes` x images), of sampled per-image scores given the same number of generated tokens
    as the ranking spent, and of fast scores; means over the sets with their spread.

Everything goes through the code the service runs: `iqa.reading.read_score`, `iqa.scoring.score_image`
and `compare_images`, `iqa.ranking.rank`, on `iqa.engines.local.LocalEngine`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

console = Console(width=None if sys.stdout.isatty() else 130)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/evoq-inference-quality"))
    parser.add_argument("--seed", type=int, default=0, help="the organism's seed")
    parser.add_argument("--scenes", type=int, default=20, help="procedural scenes in the held-out split")
    parser.add_argument("--samples", type=int, default=8, help="samples per sampled score (service default)")
    parser.add_argument("--repeats", type=int, default=3, help="sampled evaluations of the same images")
    parser.add_argument("--votes-per-image", type=int, default=8, help="ranking budget per image")
    parser.add_argument("--rebuild", action="store_true", help="build the base again even if present")
    return parser.parse_args(argv)


def correlations(predicted: list[float], truth: list[float]) -> dict[str, float]:
    return {
        "srcc": float(stats.spearmanr(predicted, truth).statistic),
        "plcc": float(stats.pearsonr(predicted, truth).statistic),
        "krcc": float(stats.kendalltau(predicted, truth).statistic),
    }


def base_model(args: argparse.Namespace) -> Path:
    from trainer.organism.build import Recipe, ensure_organism

    base = args.out / "base"
    ensure_organism(base, Recipe(seed=args.seed), lambda line: print(f"  {line}", flush=True), args.rebuild)
    return base


async def measure(args: argparse.Namespace, base: Path) -> dict:
    from iqa.engines.base import Sampling
    from iqa.engines.hf_loading import load_processor
    from iqa.engines.local import LocalEngine
    from iqa.ranking import rank
    from iqa.reading import read_score
    from iqa.scoring import compare_images, score_image
    from trainer.checkpoint import resolve_model
    from trainer.organism.data import heldout_split

    samples = heldout_split(args.scenes)
    images = [s.image for s in samples]
    mos = [s.mos for s in samples]
    spec = resolve_model(base).spec()
    constrain = spec.untrained  # as the service decides (the organism is marked as a demo)
    score_sampling = Sampling(temperature=1.0, constrain="score" if constrain else None)
    vote_sampling = Sampling(temperature=1.0, constrain="vote" if constrain else None)
    tokenizer = load_processor(str(base)).tokenizer

    def tokens(texts: list[str]) -> int:
        return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    engine = LocalEngine(spec, profile="evoquality", device="cpu")
    await engine.start()
    out: dict = {"images": len(samples)}
    try:
        print(f"held-out: {len(samples)} images; fast scores ...", flush=True)
        started = time.perf_counter()
        fast = [(await read_score(engine, image, "evoquality")).score for image in images]
        out["fast"] = {
            **correlations(fast, mos),
            "s_per_image": (time.perf_counter() - started) / len(images),
        }

        sampled_runs = []
        score_tokens: list[int] = []
        for repeat in range(args.repeats):
            print(f"sampled scores, n={args.samples}, run {repeat + 1}/{args.repeats} ...", flush=True)
            started = time.perf_counter()
            results = await asyncio.gather(
                *(score_image(engine, image, args.samples, score_sampling, "evoquality") for image in images)
            )
            seconds = time.perf_counter() - started
            scores = [3.0 if r.score is None else r.score for r in results]
            score_tokens += [tokens(r.completions) for r in results]
            sampled_runs.append({**correlations(scores, mos), "s_per_image": seconds / len(images)})
        out["sampled"] = sampled_runs
        tokens_per_completion = sum(score_tokens) / (len(score_tokens) * args.samples)
        out["tokens_per_score_completion"] = tokens_per_completion

        # Sets: each held-out reference with its renditions.
        groups: dict[str, list[int]] = {}
        for k, sample in enumerate(samples):
            groups.setdefault(sample.reference, []).append(k)
        sets = []
        for name, members in groups.items():
            print(f"ranking {name}: {len(members)} images ...", flush=True)
            spent: list[int] = []

            async def vote(i: int, j: int, k: int, members: list[int] = members, spent: list[int] = spent):
                result = await compare_images(
                    engine, images[members[i]], images[members[j]], k, vote_sampling, "evoquality"
                )
                spent.append(tokens(result.completions))
                return result.votes_a, result.votes_b, result.invalid

            started = time.perf_counter()
            plan = await rank(len(members), args.votes_per_image * len(members), 2, vote, seed=0)
            rank_s = time.perf_counter() - started
            truth = [mos[k] for k in members]
            rank_tokens = sum(spent)
            # Per-image sampled scores with the ranking's generated tokens (at least one sample each).
            n = max(1, round(rank_tokens / (len(members) * tokens_per_completion)))
            started = time.perf_counter()
            results = await asyncio.gather(
                *(score_image(engine, images[k], n, score_sampling, "evoquality") for k in members)
            )
            per_image_s = time.perf_counter() - started
            per_image = [3.0 if r.score is None else r.score for r in results]
            sets.append(
                {
                    "reference": name,
                    "images": len(members),
                    "votes": plan.votes,
                    "rank_tokens": rank_tokens,
                    "rank_s": rank_s,
                    "rank_srcc": float(stats.spearmanr(plan.fit.scores, truth).statistic),
                    "per_image_n": n,
                    "per_image_tokens": sum(tokens(r.completions) for r in results),
                    "per_image_s": per_image_s,
                    "per_image_srcc": float(stats.spearmanr(per_image, truth).statistic),
                    "fast_srcc": float(stats.spearmanr([fast[k] for k in members], truth).statistic),
                }
            )
        out["sets"] = sets
    finally:
        await engine.close()
    return out


def report(out: dict, args: argparse.Namespace) -> None:
    runs = out["sampled"]
    table = Table(title=f"per image: {out['images']} held-out images of the organism (seed {args.seed})")
    for column in ("score", "SRCC", "PLCC", "KRCC", "s / image (all in flight)", "generated tokens / image"):
        table.add_column(column, justify="right" if column != "score" else "left")
    fast = out["fast"]
    table.add_row(
        "fast (one pass)", f"{fast['srcc']:.3f}", f"{fast['plcc']:.3f}", f"{fast['krcc']:.3f}",
        f"{fast['s_per_image']:.3f}", "0",
    )  # fmt: skip

    def spread(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

    table.add_row(
        f"sampled, n={args.samples} ({len(runs)} runs)", spread("srcc"), spread("plcc"), spread("krcc"),
        f"{statistics.fmean(r['s_per_image'] for r in runs):.3f}",
        f"{out['tokens_per_score_completion'] * args.samples:.0f}",
    )  # fmt: skip
    console.print(table)

    sets = out["sets"]
    table = Table(title=f"per set: {len(sets)} references, each with its renditions (SRCC within the set)")
    for column in ("method", "SRCC mean ± sd", "generated tokens / set", "s / set"):
        table.add_column(column, justify="right" if column != "method" else "left")

    def mean_sd(key: str) -> str:
        values = [s[key] for s in sets]
        return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

    def mean(key: str, digits: int = 0) -> str:
        return f"{statistics.fmean(s[key] for s in sets):.{digits}f}"

    table.add_row(
        f"/v1/rank plan ({args.votes_per_image} votes / image)", mean_sd("rank_srcc"), mean("rank_tokens"),
        mean("rank_s", 1),
    )  # fmt: skip
    ns = sorted({s["per_image_n"] for s in sets})
    table.add_row(
        f"sampled per image, same tokens (n={'/'.join(map(str, ns))})", mean_sd("per_image_srcc"),
        mean("per_image_tokens"), mean("per_image_s", 1),
    )  # fmt: skip
    table.add_row("fast per image", mean_sd("fast_srcc"), "0", "")
    console.print(table)
    wins = sum(s["rank_srcc"] > s["per_image_srcc"] for s in sets)
    for other in ("per_image_srcc", "fast_srcc"):
        gains = [s["rank_srcc"] - s[other] for s in sets]
        error = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
        mean_gain = statistics.fmean(gains)
        console.print(f"rank minus {other[:-5]}, paired over sets: {mean_gain:+.3f} (SE {error:.3f})")
    console.print(
        f"inference quality: fast SRCC {fast['srcc']:.3f} vs sampled n={args.samples} "
        f"{statistics.fmean(r['srcc'] for r in runs):.3f}; per set, rank {mean_sd('rank_srcc')} vs per-image "
        f"at equal tokens {mean_sd('per_image_srcc')} (rank better in {wins} of {len(sets)} sets)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from trainer.cli import quiet_libraries

    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    base = base_model(args)
    out = asyncio.run(measure(args, base))
    (args.out / "inference_quality.json").write_text(json.dumps(out, indent=1) + "\n")
    report(out, args)


if __name__ == "__main__":
    main()
