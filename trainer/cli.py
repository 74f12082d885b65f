"""What `evoq evolve` and `evoq eval` do, with rich progress bars and tables (the typer layer: evoq.cli)."""

from __future__ import annotations

import asyncio
import csv
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iqa.engines.base import Sampling
from iqa.settings import PromptProfile
from trainer.checkpoint import resolve_model
from trainer.config import RoundConfig
from trainer.metrics import correlations
from trainer.pool import load_image, load_pool
from trainer.round import RoundResult, local_engine, run_round, score_images

console = Console(stderr=True)


@contextmanager
def stage_bars(title: str) -> Iterator[Any]:
    """Progress bars, one per round stage; yields the `progress(stage, done, total)` hook."""
    with Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        console.print(title)
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield progress


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_table(result: RoundResult) -> Table:
    """The gate metrics before and after a round, and the training figures."""
    manifest = result.manifest
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    table = Table(title=f"{manifest['name']}  ({result.path})")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("holdout_agreement", "parse_failure_rate", "score_spread", "mean_score"):
        table.add_row(key, _fmt(before[key]), _fmt(after[key]))
    training = manifest["training"]
    table.add_row("reward (first / last step)", _fmt(training["reward_first"]), _fmt(training["reward_last"]))
    labels = manifest["pseudo_labels"]
    table.add_row("pairs train / held out", str(labels["train_pairs"]), str(labels["holdout_pairs"]))
    timings = manifest["timings"]
    table.add_row("time vote / train (s)", _fmt(timings["voting_s"], 1), _fmt(timings["training_s"], 1))
    return table


def quiet_libraries() -> None:
    """Keep the terminal for our progress bars: no weight-loading bars or deprecation notices from HF."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)\b")


def evolve(images: Path, model: str, out: Path, rounds: int, config: RoundConfig) -> list[RoundResult]:
    """`rounds` rounds; the checkpoint of each round is the voting model of the next."""
    quiet_libraries()
    pool = load_pool(images, config.max_pixels)
    if pool.rejected:
        console.print(f"[yellow]{len(pool.rejected)} unusable files left out of the pool")
    out.mkdir(parents=True, exist_ok=True)
    results: list[RoundResult] = []
    current = model
    for index in range(rounds):
        round_config = replace(config, seed=config.seed + index)
        with stage_bars(f"round {index + 1}/{rounds}: {len(pool)} images, model {current}") as progress:
            result = asyncio.run(run_round(current, pool, out, round_config, progress=progress))
        console.print(round_table(result))
        results.append(result)
        current = str(result.path)
    return results


@dataclass(frozen=True)
class EvalResult:
    """Correlations of a model's mean scores with MOS, how many samples did not parse, and per image
    (path, mos, score, std, valid samples)."""

    model: str
    correlations: dict[str, float | int]
    rows: int
    unparsable: int
    samples: int
    items: list[tuple[str, float, float | None, float | None, int]]


@dataclass(frozen=True)
class MosColumns:
    """Where a MOS file keeps its data: by header name (e.g. KonIQ's `image_name` and `MOS`), or, when
    both are None, the first two columns; image paths are relative to `images_dir` (default: the CSV's
    folder)."""

    image: str | None = None
    mos: str | None = None
    images_dir: Path | None = None


def read_mos_csv(path: Path, columns: MosColumns | None = None) -> list[tuple[Path, float]]:
    """(image path, MOS) rows. Without column names the first two columns are read and a header row is
    skipped; relative paths are relative to `columns.images_dir` or the CSV's folder."""
    columns = columns or MosColumns()
    root = columns.images_dir or path.parent
    rows: list[tuple[Path, float]] = []
    with path.open(newline="") as handle:
        if columns.image or columns.mos:
            reader = csv.DictReader(handle)
            missing = [c for c in (columns.image, columns.mos) if c and c not in (reader.fieldnames or [])]
            if missing or not (columns.image and columns.mos):
                raise ValueError(f"{path}: needs both columns, has {reader.fieldnames}; missing {missing}")
            records = [(r[columns.image], r[columns.mos]) for r in reader]
            header_allowed = False
        else:
            records = [(r[0], r[1]) if len(r) >= 2 else (r[0] if r else "", None) for r in csv.reader(handle)]
            header_allowed = True
        for image_text, mos_text in records:
            if not image_text or not image_text.strip():
                continue
            if mos_text is None:
                raise ValueError(f"{path}: row {image_text!r} needs an image path and a MOS")
            try:
                mos = float(mos_text)
            except ValueError:
                if rows or not header_allowed:
                    raise ValueError(f"{path}: MOS {mos_text!r} is not a number") from None
                continue  # the header
            image = Path(image_text.strip())
            rows.append((image if image.is_absolute() else root / image, mos))
    if not rows:
        raise ValueError(f"{path} has no (image, mos) rows")
    return rows


def evaluate_csv(
    csv_path: Path,
    model: str,
    samples: int,
    *,
    columns: MosColumns | None = None,
    max_new_tokens: int | None = None,
    constrain_answers: bool | None = None,
    temperature: float = 1.0,
    profile: PromptProfile = "evoquality",
    device: str = "auto",
    max_pixels: int = 1280 * 28 * 28,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score every image of the CSV with `model` (mean of `samples`) and correlate with the MOS."""
    rows = read_mos_csv(csv_path, columns)
    source = resolve_model(model)
    constrain = source.untrained if constrain_answers is None else constrain_answers
    sampling = Sampling(temperature, max_new_tokens=max_new_tokens, constrain="score" if constrain else None)
    images = [load_image(path, max_pixels) for path, _ in rows]

    async def score() -> list:
        async with local_engine(
            source.spec(), profile=profile, device=device, max_pixels=max_pixels
        ) as engine:
            return await score_images(engine, images, samples, sampling, profile, progress=progress)

    results = asyncio.run(score())
    total = sum(r.samples for r in results)
    return EvalResult(
        model=source.name,
        correlations=correlations([r.score for r in results], [mos for _, mos in rows]),
        rows=len(rows),
        unparsable=total - sum(r.valid for r in results),
        samples=total,
        items=[(str(p), mos, r.score, r.std, r.valid) for (p, mos), r in zip(rows, results, strict=True)],
    )


def write_eval_items(result: EvalResult, out: Path) -> None:
    """Per-image scores beside the MOS, as CSV."""
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "mos", "score", "std", "valid_samples"])
        for path, mos, score, std, valid in result.items:
            writer.writerow([path, mos, "" if score is None else score, "" if std is None else std, valid])


def evaluate_csv_with_bars(csv_path: Path, model: str, samples: int, **options: Any) -> EvalResult:
    """`evaluate_csv` for the terminal: a progress bar and no library chatter."""
    quiet_libraries()
    with stage_bars(f"scoring the images of {csv_path} with {model}") as progress:
        return evaluate_csv(
            csv_path, model, samples, progress=lambda done, total: progress("scoring", done, total), **options
        )


def eval_table(result: EvalResult) -> Table:
    """PLCC / SRCC / KRCC as one row."""
    table = Table(title=f"{result.model}: correlation with MOS")
    for column in ("n", "PLCC", "SRCC", "KRCC", "unparsable"):
        table.add_column(column, justify="right")
    c = result.correlations
    table.add_row(
        str(c["n"]),
        _fmt(c["plcc"], 4),
        _fmt(c["srcc"], 4),
        _fmt(c["krcc"], 4),
        f"{result.unparsable}/{result.samples}",
    )
    return table
