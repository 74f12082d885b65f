"""The `evoq` command. Heavy imports stay inside the commands so `evoq --help` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Options shared by `evolve` and `eval`.
MaxNewTokens = Annotated[int | None, typer.Option(help="Completion budget; default: the model's.")]
Constrain = Annotated[
    bool | None,
    typer.Option("--constrain/--no-constrain", help="Force parsable answers; default: demo only."),
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]

app = typer.Typer(help="EvoQuality Service: self-improving image-quality assessment.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="Log level of the app and uvicorn.")] = "info",
    log_json: Annotated[bool, typer.Option("--log-json", help="Log lines as JSON objects.")] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes on one port (EVOQ_ENGINE=vllm only: the local engine would load the "
            "model in each); the vLLM server needs --max-loras of at least workers + 2.",
        ),
    ] = 1,
) -> None:
    """Start the HTTP API (settings from EVOQ_* variables; the embedded default needs none).

    Log lines of the app and uvicorn go to stderr with the request id (also sent as `X-Request-ID`)."""
    import uvicorn

    from api.app import create_app
    from api.observability import log_config
    from api.workers import WorkersRefused, serve_workers

    if workers == 1:
        config = log_config(log_level, log_json)
        uvicorn.run(create_app(), host=host, port=port, log_level=log_level, log_config=config)
        return
    try:
        serve_workers(workers, host=host, port=port, log_level=log_level, log_json=log_json)
    except WorkersRefused as error:
        raise typer.BadParameter(str(error), param_hint="--workers") from error


@app.command()
def score(
    paths: Annotated[list[Path], typer.Argument(help="Image files and folders.")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Also the folders' subfolders.")
    ] = False,
    samples: Annotated[
        int | None, typer.Option(min=1, help="Samples per image; default: the service's.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="FILE.csv or FILE.jsonl; default: CSV on stdout.")] = None,
    url: Annotated[
        str | None, typer.Option(help="Score through this running service (images are logged).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Score in process with this model (nothing stored).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Uploads in flight with --url.")] = 8,
    device: Device = "auto",
    mode: Annotated[
        str, typer.Option(help="sampled (reasoning samples, averaged) or fast (one deterministic reading).")
    ] = "sampled",
) -> None:
    """Score files and folders: one row per image (path, sha256, score, std, valid_samples,
    model_version, cached, error); a file that cannot be scored gets an empty score and the error."""
    import asyncio

    from rich.progress import Progress

    from evoq.batch import collect_files, score_in_process, score_via_service, write_rows

    if (url is None) == (model is None):
        raise typer.BadParameter("give exactly one of --url (a running service) or --model")
    if mode not in ("sampled", "fast"):
        raise typer.BadParameter(f"--mode must be sampled or fast; got {mode!r}")
    try:
        files = collect_files(paths, recursive)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error)) from error
    with Progress(transient=True, console=_stderr()) as bars:
        task = bars.add_task("scoring", total=len(files))

        def tick() -> None:
            bars.advance(task)

        if url is not None:
            rows = asyncio.run(score_via_service(url, files, samples, concurrency, tick, mode))  # type: ignore[arg-type]
        else:
            rows = asyncio.run(score_in_process(model or "", files, samples or 8, device, tick, mode))  # type: ignore[arg-type]
    write_rows(rows, out)
    failed = sum(1 for row in rows if row.error)
    _stderr().print(f"{len(rows) - failed} scored, {failed} failed" + (f"; written to {out}" if out else ""))


@app.command()
def compare(
    image_a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First image.")],
    image_b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second image.")],
    votes: Annotated[int | None, typer.Option(min=2, help="Votes (half with each image first).")] = None,
    url: Annotated[str | None, typer.Option(help="Compare through this running service.")] = None,
    model: Annotated[str | None, typer.Option(help="Compare in process with this model.")] = None,
    device: Device = "auto",
) -> None:
    """Which of two images looks better (JSON: prob_a_better, winner, votes)."""
    import asyncio
    import json

    from evoq.batch import compare_in_process, compare_via_service

    if (url is None) == (model is None):
        raise typer.BadParameter("give exactly one of --url (a running service) or --model")
    if url is not None:
        answer = asyncio.run(compare_via_service(url, image_a, image_b, votes))
    else:
        answer = asyncio.run(compare_in_process(model or "", image_a, image_b, votes or 8, device))
    typer.echo(json.dumps(answer, indent=1))


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Random seed of the weights (and of the organism's data).")] = 0,
    organism: Annotated[
        bool,
        typer.Option(
            "--organism",
            help="Build the model organism instead: the tiny model with weak real quality perception "
            "from a supervised warm-up on synthetic distortions (CPU, about 5 minutes; still a demo).",
        ),
    ] = False,
) -> None:
    """Build the tiny untrained Qwen2.5-VL used by the demo and the tests (offline, about a second)."""
    if organism:
        from trainer.organism.build import Recipe, build_organism

        typer.echo(build_organism(out_dir, Recipe(seed=seed), log=lambda line: typer.echo(line, err=True)))
        return
    from iqa.demo_model import build_demo_model

    typer.echo(build_demo_model(out_dir, seed=seed))


@app.command()
def migrate() -> None:
    """Apply the database migrations (run once before starting several API replicas)."""
    from iqa.db import upgrade_database
    from iqa.settings import get_settings

    upgrade_database(get_settings().database_url or "")
    typer.echo("database is at the newest migration")


@app.command()
def evolve(
    images: Annotated[Path, typer.Option(help="Folder of unlabeled images (searched recursively).")],
    model: Annotated[
        str, typer.Option(help="Model that votes in round 1: base folder, hub id or checkpoint.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the versioned checkpoints (v001, v002, ...).")],
    rounds: Annotated[int, typer.Option(min=1, help="Rounds T; round t's model votes in round t+1.")] = 1,
    pairs: Annotated[int, typer.Option(min=1, help="Pairs M sampled per round.")] = 128,
    votes: Annotated[int, typer.Option(min=1, help="Votes K per pair.")] = 8,
    generations: Annotated[int, typer.Option(min=2, help="GRPO rollouts G per image.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="GRPO optimizer steps per round.")] = 16,
    images_per_step: Annotated[int, typer.Option(min=2, help="Images per GRPO step (whole pairs).")] = 4,
    lora: Annotated[
        bool, typer.Option("--lora/--full", help="LoRA on the language model, or full FT.")
    ] = True,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    learning_rate: Annotated[
        float | None, typer.Option(help="Default: 1e-5 with LoRA, 3e-7 (the paper's) with full FT.")
    ] = None,
    beta: Annotated[float, typer.Option(min=0.0, help="KL weight to the lineage's base model.")] = 0.05,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of pairs kept for the gate.")] = 0.2,
    eval_samples: Annotated[int, typer.Option(min=1, help="Score samples per held-out image.")] = 4,
    max_new_tokens: MaxNewTokens = None,
    constrain: Constrain = None,
    label_rule: Annotated[str, typer.Option(help="Pseudo-label: `hard` (paper) or `soft`.")] = "hard",
    variants_per_image: Annotated[
        int, typer.Option(min=0, help="Synthetic variants per image, paired with it (paper, round 2: 10).")
    ] = 0,
    variant_pairs: Annotated[
        int | None, typer.Option(min=0, help="Same-reference pairs per round; default: as many as --pairs.")
    ] = None,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of round 1 (round t uses seed + t - 1).")] = 0,
) -> None:
    """Run T EvoQuality rounds on a folder of images: vote, train with GRPO, gate metrics, checkpoint."""
    from trainer.cli import evolve as run_evolve
    from trainer.config import RoundConfig, TrainSettings

    if label_rule not in ("hard", "soft"):
        raise typer.BadParameter("label-rule must be `hard` or `soft`")
    train = TrainSettings(
        generations=generations,
        steps=steps,
        images_per_step=images_per_step,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=2 * lora_rank,
        learning_rate=learning_rate,
        beta=beta,
        device=device,
    )
    config = RoundConfig(
        pairs=pairs,
        votes=votes,
        holdout=holdout,
        eval_samples=eval_samples,
        max_new_tokens=max_new_tokens,
        constrain_answers=constrain,
        label_rule=label_rule,  # type: ignore[arg-type]
        device=device,
        seed=seed,
        variants_per_image=variants_per_image,
        variant_pairs=variant_pairs,
        train=train,
    )
    for result in run_evolve(images, model, out, rounds, config):
        typer.echo(result.path)


@app.command("eval")
def evaluate(
    csv_file: Annotated[
        Path, typer.Option("--csv", exists=True, dir_okay=False, help="CSV of images and MOS.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Base folder, hub id or evolved checkpoint folder.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Evaluate a running service instead (images are logged).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Score samples per image (score = their mean).")] = 8,
    image_column: Annotated[
        str | None, typer.Option(help="Header of the image column (KonIQ: image_name).")
    ] = None,
    mos_column: Annotated[str | None, typer.Option(help="Header of the MOS column (KonIQ: MOS).")] = None,
    images_dir: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write per-image scores (path, mos, score, ...) here.")
    ] = None,
    prompt_profile: Annotated[str, typer.Option(help="evoquality or visualquality-r1.")] = "evoquality",
    max_new_tokens: MaxNewTokens = None,
    constrain: Constrain = None,
    device: Device = "auto",
) -> None:
    """Print PLCC, SRCC and KRCC between a model's (or a service's) scores and the MOS of a CSV.

    Without column names the CSV's first two columns are (image path, MOS)."""
    import asyncio

    from rich.console import Console

    from trainer.cli import (
        EvalResult,
        MosColumns,
        eval_table,
        evaluate_csv_with_bars,
        read_mos_csv,
        write_eval_items,
    )
    from trainer.metrics import correlations

    if (url is None) == (model is None):
        raise typer.BadParameter("give exactly one of --model or --url")
    if prompt_profile not in ("evoquality", "visualquality-r1"):
        raise typer.BadParameter("prompt-profile must be evoquality or visualquality-r1")
    columns = MosColumns(image_column, mos_column, images_dir)
    if url is not None:
        from evoq.batch import score_via_service

        rows = read_mos_csv(csv_file, columns)
        scored = asyncio.run(score_via_service(url, [p for p, _ in rows], samples, 8, lambda: None))
        result = EvalResult(
            model=next((r.model_version for r in scored if r.model_version), url),
            correlations=correlations([r.score for r in scored], [mos for _, mos in rows]),
            rows=len(rows),
            unparsable=sum(1 for r in scored if r.score is None),
            samples=len(rows),
            items=[
                (r.path, mos, r.score, r.std, r.valid_samples or 0)
                for r, (_, mos) in zip(scored, rows, strict=True)
            ],
        )
    else:
        result = evaluate_csv_with_bars(
            csv_file,
            model or "",
            samples,
            columns=columns,
            max_new_tokens=max_new_tokens,
            constrain_answers=constrain,
            profile=prompt_profile,  # type: ignore[arg-type]
            device=device,
        )
    Console().print(eval_table(result))
    if out is not None:
        write_eval_items(result, out)


if __name__ == "__main__":
    app()
