"""`evoq score` and `evoq compare`: many files scored through a running service or in process.

Through a service (`--url`) each file is one upload, several in flight; the images are logged there
and join its round pool. In process (`--model`) a local engine scores them and nothing is stored.
A file that cannot be scored is a row with an empty score and the error, never the end of the run.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import httpx

from evoq.client import AsyncClient, ServiceError
from iqa.protocol import ScoreMode

Tick = Callable[[], None]


@dataclass
class ScoreRow:
    """One image's line of the output."""

    path: str
    sha256: str = ""
    score: float | None = None
    std: float | None = None
    valid_samples: int | None = None
    model_version: str = ""
    cached: bool | None = None
    error: str = ""


COLUMNS = [f.name for f in fields(ScoreRow)]


def collect_files(paths: Iterable[Path], recursive: bool) -> list[Path]:
    """The files named, and those in the folders named (their subfolders too with `recursive`), sorted;
    hidden files are skipped. A path that does not exist raises FileNotFoundError."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files += sorted(p for p in found if p.is_file() and not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def score_via_service(
    url: str,
    files: Sequence[Path],
    samples: int | None,
    concurrency: int,
    tick: Tick,
    mode: ScoreMode = "sampled",
) -> list[ScoreRow]:
    """Upload each file to `url`'s /v1/score, at most `concurrency` at a time."""
    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncClient(url) as client:

        async def one(path: Path) -> ScoreRow:
            async with semaphore:
                try:
                    [item] = (await client.score([path], samples, mode=mode)).results
                    return ScoreRow(
                        str(path), item.sha256, item.score, item.std, item.valid_samples,
                        item.model_version.name, item.cached,
                    )  # fmt: skip
                except ServiceError as error:
                    return ScoreRow(str(path), _sha256(path), error=error.message)
                except (OSError, httpx.TransportError) as error:  # unreadable file, or no answer
                    return ScoreRow(str(path), error=f"{type(error).__name__}: {error}")
                finally:
                    tick()

        return list(await asyncio.gather(*(one(path) for path in files)))


async def score_in_process(
    model: str, files: Sequence[Path], samples: int, device: str, tick: Tick, mode: ScoreMode = "sampled"
) -> list[ScoreRow]:
    """Score each file with a local engine on `model` (any folder or hub id a service could serve);
    `mode="fast"` reads each score in one pass (`valid_samples` 0)."""
    from iqa.engines.base import Sampling
    from iqa.images import ImageRejected, decode_image
    from iqa.reading import read_score
    from iqa.scoring import score_image
    from iqa.settings import Settings
    from trainer.checkpoint import resolve_model
    from trainer.round import local_engine

    settings = Settings(_env_file=None)
    source = resolve_model(model)
    sampling = Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        constrain="score" if source.untrained else None,
    )
    rows: list[ScoreRow] = []
    async with local_engine(source.spec(), device=device) as engine:
        for path in files:
            try:
                data = path.read_bytes()
                decoded = decode_image(
                    data,
                    max_bytes=settings.max_upload_bytes,
                    max_pixels=settings.max_image_pixels,
                    min_side=settings.min_image_side,
                )
                if mode == "fast":
                    reading = await read_score(engine, decoded.image, settings.prompt_profile)
                    score, std, valid = reading.score, reading.std, 0
                else:
                    result = await score_image(
                        engine, decoded.image, samples, sampling, settings.prompt_profile
                    )
                    score, std, valid = result.score, result.std, result.valid
                rows.append(ScoreRow(str(path), decoded.sha256, score, std, valid, source.name, False))
            except ImageRejected as error:
                rows.append(ScoreRow(str(path), hashlib.sha256(data).hexdigest(), error=error.message))
            except OSError as error:
                rows.append(ScoreRow(str(path), error=f"{type(error).__name__}: {error}"))
            tick()
    return rows


def write_rows(rows: Sequence[ScoreRow], out: Path | None) -> None:
    """CSV (default, and for `.csv`) or JSON lines (`.jsonl`), to `out` or standard output."""
    as_json = out is not None and out.suffix == ".jsonl"
    buffer = io.StringIO()
    if as_json:
        for row in rows:
            buffer.write(json.dumps(asdict(row)) + "\n")
    else:
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    if out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        out.write_text(buffer.getvalue())


async def compare_via_service(url: str, a: Path, b: Path, votes: int | None) -> dict:
    """The service's /v1/compare answer for two files."""
    async with AsyncClient(url) as client:
        return (await client.compare(a, b, votes)).model_dump(mode="json")


async def compare_in_process(model: str, a: Path, b: Path, votes: int, device: str) -> dict:
    """A comparison by a local engine on `model` (nothing stored)."""
    from iqa.engines.base import Sampling
    from iqa.images import decode_image
    from iqa.scoring import compare_images
    from iqa.settings import Settings
    from trainer.checkpoint import resolve_model
    from trainer.round import local_engine

    settings = Settings(_env_file=None)
    source = resolve_model(model)
    sampling = Sampling(temperature=settings.temperature, constrain="vote" if source.untrained else None)
    images = [
        decode_image(
            p.read_bytes(),
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
        )
        for p in (a, b)
    ]
    async with local_engine(source.spec(), device=device) as engine:
        result = await compare_images(
            engine, images[0].image, images[1].image, votes, sampling, settings.prompt_profile
        )
    return {
        "sha256_a": images[0].sha256,
        "sha256_b": images[1].sha256,
        "prob_a_better": result.prob_a_better,
        "winner": result.winner,
        "votes_a": result.votes_a,
        "votes_b": result.votes_b,
        "invalid_votes": result.invalid,
        "votes": votes,
        "model_version": source.name,
    }
