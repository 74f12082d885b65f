"""Which GRPO settings let a round lift the organism? One vote, many trainings (issue 13, item 4).

`.venv/bin/python bench/organism_sweep.py --out DIR --seeds 3 4 --variants "" "learning_rate=1e-3" ...`
builds (or reuses, as `bench/organism.py` does) the organism base of each seed, runs round 1 with the
service's `trainer.round.run_round` once per variant of its GRPO settings (`TrainSettings` fields as
`key=value`, `;`-separated; "" is the bench's defaults), and reports each candidate's held-out
PLCC / SRCC, its change from the base, the scores' slopes on true quality and on the warm-up's content
confound, and the gate's paired agreement gain. Every variant of a seed trains on the same votes: the
first round votes, the others replay its `VotingResult` (same pairs, same split, same pseudo-labels),
so the variants differ only in training (and in the training's own nondeterminism, about 0.01 SRCC).
`--rounds 2` chains a second round per variant (it votes with its own parent, as the service does);
`--shuffle-labels` makes them the shuffled-label control; `--controls N` adds, per variant, N round-1
control rounds on the same votes (the first with the real round 1's seed, so it differs from it only in
the permuted labels; the others with other seeds, so that one control's spread can be seen); other
options are `bench/organism.py`'s.
Writes `DIR/sweep.md` and `DIR/sweep.json`; the last line printed names the best variant by mean
change in SRCC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.organism import ReplayVoter, round_config, write_pool  # noqa: E402
from bench.organism import parse_args as organism_args  # noqa: E402
from trainer.config import TrainSettings  # noqa: E402
from trainer.round import run_round  # noqa: E402

CONTROL = "control #"  # a round-1 control's name: "<variant> control #<replicate>"


def parse_variant(text: str) -> dict[str, Any]:
    """`"learning_rate=1e-3;steps=120"` -> typed `TrainSettings` overrides ("" -> none)."""
    hints = typing.get_type_hints(TrainSettings)
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, _, value = item.partition("=")
        if key not in hints:
            raise SystemExit(f"unknown TrainSettings field {key!r}")
        kind = next(t for t in typing.get_args(hints[key]) or (hints[key],) if t is not type(None))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--variants", nargs="+", default=[""])
    parser.add_argument("--rounds", type=int, default=1, help="chain this many rounds per variant")
    parser.add_argument("--shuffle-labels", action="store_true", help="the shuffled-label control rounds")
    parser.add_argument("--controls", type=int, default=0, help="round-1 controls per variant, same votes")
    own, rest = parser.parse_known_args()
    args = organism_args(["--out", str(own.out), *rest])  # the organism bench's round settings

    from trainer.cli import quiet_libraries
    from trainer.gate import paired_gain
    from trainer.organism.build import Recipe, ensure_organism
    from trainer.organism.data import heldout_split, pool_split
    from trainer.organism.measure import evaluate_split, load_reader, true_pairs

    quiet_libraries()
    heldout = heldout_split(args.heldout_scenes)
    heldout_pairs = true_pairs(heldout, args.vote_pairs, seed=1)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}

    def evaluate(model: Path) -> dict[str, Any]:
        held = evaluate_split(load_reader(model), heldout, heldout_pairs)
        return {**held.correlations, "slopes": held.slopes, "vote_accuracy": held.vote_accuracy}

    for seed in own.seeds:
        folder = own.out.resolve() / f"seed{seed}"
        base = folder / "base"
        log = lambda line, s=seed: print(f"  [seed {s}] {line}", flush=True)  # noqa: E731
        ensure_organism(base, Recipe(seed=seed), log)
        write_pool(folder / "pool", pool_split(args.pool_references, args.pool_per_reference, seed), seed)
        rows: dict[str, Any] = {"base": evaluate(base)}
        print(f"[seed {seed}] base SRCC {rows['base']['srcc']:.3f}", flush=True)
        first_votes = ReplayVoter()  # every variant's round 1 votes with the base: one vote serves all
        for variant in own.variants:
            # (round, shuffled?, seed, name): the variant's chained rounds, then its round-1 controls
            runs = [(t, own.shuffle_labels, seed * 100 + t, f"r{t}") for t in range(1, own.rounds + 1)]
            runs += [(1, True, seed * 100 + 1 + 1000 * r, f"{CONTROL}{r + 1}") for r in range(own.controls)]
            for t, shuffled, round_seed, suffix in runs:
                config = round_config(args, round_seed)
                config = replace(
                    config,
                    shuffle_labels=shuffled,
                    train=replace(config.train, **parse_variant(variant)),
                )
                target = folder / f"sweep-{len(rows):02d}"
                mark = time.perf_counter()
                voter = first_votes if t == 1 else None  # later rounds vote with their own parent
                if t == 1:  # the variant's round 1 and each of its controls start from the base
                    parent = base
                result = asyncio.run(run_round(parent, folder / "pool", target, config, voter=voter))
                metrics = result.manifest["metrics"]
                paired = paired_gain(
                    metrics["before"].get("holdout_read_pairs"), metrics["after"].get("holdout_read_pairs")
                )
                name = f"{variant or 'defaults'} {suffix}"
                rows[name] = {
                    **evaluate(result.path),
                    "gate_gain": paired[0] if paired else None,
                    "gate_se": paired[1] if paired else None,
                    "reward_first": result.manifest["training"].get("reward_first"),
                    "reward_last": result.manifest["training"].get("reward_last"),
                    "kl_last": result.manifest["training"].get("kl_last"),
                    "training_s": result.manifest["timings"]["training_s"],
                    "round_s": time.perf_counter() - mark,
                }
                row = rows[name]
                print(
                    f"[seed {seed}] {name}: SRCC {row['srcc']:.3f} "
                    f"({row['srcc'] - rows['base']['srcc']:+.3f}) PLCC {row['plcc']:.3f} "
                    f"slopes {row['slopes']['mos']:.3f}/{row['slopes']['content']:.3f} "
                    f"gate gain {row['gate_gain'] or 0:+.4f} training {row['training_s']:.0f} s",
                    flush=True,
                )
                parent = result.path
        results["seeds"][str(seed)] = rows
        (own.out / "sweep.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    report = write_report(own.out, results)
    print(report)


def write_report(out: Path, results: dict[str, Any]) -> str:
    """sweep.md: per variant, the change in SRCC and PLCC on every seed and their means."""
    seeds = list(results["seeds"])
    names = [n for n in next(iter(results["seeds"].values())) if n != "base"]
    lines = [
        "| variant | "
        + " | ".join(f"seed {s}: ΔSRCC / ΔPLCC / quality, content slope / gate gain" for s in seeds)
        + " | mean ΔSRCC | mean ΔPLCC |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    best = None
    for name in names:
        cells, d_srcc, d_plcc = [], [], []
        for s in seeds:
            rows = results["seeds"][s]
            if name not in rows:
                cells.append("-")
                continue
            row, base = rows[name], rows["base"]
            d_srcc.append(row["srcc"] - base["srcc"])
            d_plcc.append(row["plcc"] - base["plcc"])
            cells.append(
                f"{d_srcc[-1]:+.3f} / {d_plcc[-1]:+.3f} / {row['slopes']['mos']:.2f}, "
                f"{row['slopes']['content']:.2f} / {row['gate_gain'] or 0:+.3f}"
            )
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {np.mean(d_srcc):+.3f} | {np.mean(d_plcc):+.3f} |"
        )
        if CONTROL not in name and (best is None or np.mean(d_srcc) > best[1]):
            best = (name, float(np.mean(d_srcc)))
    base_rows = {s: results["seeds"][s]["base"] for s in seeds}
    bases = ", ".join(
        f"seed {s} SRCC {b['srcc']:.3f} slopes {b['slopes']['mos']:.2f}, {b['slopes']['content']:.2f}"
        for s, b in base_rows.items()
    )
    controls: dict[str, list[float]] = {}  # variant -> ΔSRCC of each of its controls on every seed
    for rows in results["seeds"].values():
        for name, row in rows.items():
            if CONTROL in name:
                controls.setdefault(name.split(f" {CONTROL}")[0], []).append(
                    row["srcc"] - rows["base"]["srcc"]
                )
    for variant, deltas in controls.items():
        spread = np.std(deltas, ddof=1) if len(deltas) > 1 else 0.0
        lines.append(
            f"\nControls of {variant}: mean ΔSRCC {np.mean(deltas):+.3f}, sd {spread:.3f}, "
            f"range {min(deltas):+.3f} to {max(deltas):+.3f} ({len(deltas)} rounds)"
        )
    text = "\n".join([f"Bases: {bases}", "", *lines, ""])
    (out / "sweep.md").write_text(text)
    if best:
        text += f"\nsweep: best variant by mean ΔSRCC: {best[0]} ({best[1]:+.3f})"
    return text


if __name__ == "__main__":
    main()
