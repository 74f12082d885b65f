"""Probe an organism recipe before spending rounds on it: build one base and print how much room its
votes leave.

Rounds teach the score prompt the order the compare prompt votes, so a recipe is worth a bench run only
if its voter's ranking lies well above its scores (bench/results/organism-2026-12-05-voter-ranking.md).
Per build this prints and appends to `DIR/probes.jsonl`: held-out score SRCC/PLCC, vote accuracy on the
bench's 300 held-out pairs, the voter's ranking over 8 partners, and the room between them (about 5
minutes a base on 2 cores). Example:

    .venv/bin/python bench/organism_recipe.py --out runs/probes --seed 16 head_steps=3000 score_content_bias=4
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.organism import HELDOUT_PAIRS_SEED, VOTER_PARTNERS_SEED  # noqa: E402
from bench.organism import parse_args as bench_args  # noqa: E402
from trainer.metrics import correlations  # noqa: E402
from trainer.organism.build import Recipe, ensure_organism  # noqa: E402
from trainer.organism.data import heldout_split  # noqa: E402
from trainer.organism.measure import (  # noqa: E402
    evaluate_split,
    load_reader,
    partner_pairs,
    true_pairs,
    voter_ranking,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Recipe fields as NAME=VALUE")
    args = parser.parse_args(argv)
    default = Recipe(seed=args.seed)
    overrides = {}
    for item in args.overrides:
        name, _, value = item.partition("=")
        if not hasattr(default, name):
            parser.error(f"Recipe has no field {name!r}")
        kind = type(getattr(default, name))
        if kind is bool:  # bool("False") is True: read booleans by their words
            if value not in ("True", "False"):
                parser.error(f"{name} takes True or False, not {value!r}")
            overrides[name] = value == "True"
        else:
            overrides[name] = kind(value)
    label = "-".join(f"{k}{v}" for k, v in overrides.items()) or "default"
    base = args.out / f"{label}-s{args.seed}"
    record = ensure_organism(base, replace(default, **overrides))
    bench = bench_args(["--out", str(args.out)])  # the held-out split and pairs the bench measures on
    heldout = heldout_split(bench.heldout_scenes)
    reader = load_reader(base)
    evaluation = evaluate_split(
        reader, heldout, true_pairs(heldout, bench.vote_pairs, seed=HELDOUT_PAIRS_SEED)
    )
    ranking = voter_ranking(
        reader, heldout, partner_pairs(len(heldout), bench.voter_partners, seed=VOTER_PARTNERS_SEED)
    )
    voter = correlations(ranking, [s.mos for s in heldout])
    row = {
        "seed": args.seed,
        "overrides": overrides,
        "build_s": round(record["timings"]["total_s"]),
        "srcc": round(evaluation.correlations["srcc"], 3),
        "plcc": round(evaluation.correlations["plcc"], 3),
        "vote_accuracy": round(evaluation.vote_accuracy, 3),
        "voter_srcc": round(voter["srcc"], 3),
        "room": round(voter["srcc"] - evaluation.correlations["srcc"], 3),
        # How much the score path follows true quality and the warm-up's content confound.
        "slope_mos": round(evaluation.slopes["mos"], 3),
        "slope_content": round(evaluation.slopes["content"], 3),
    }
    with (args.out / "probes.jsonl").open("a") as log:
        log.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
