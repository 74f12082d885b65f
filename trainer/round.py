"""One EvoQuality round over a pool of images, end to end: pairs, votes, GRPO, gate metrics, checkpoint.

The current model votes through the `Engine` interface (so the same code runs on the local engine or
on vLLM); GRPO runs in a spawned child process that gets only plain data (image paths, preferences,
settings), so every byte it allocated goes back to the system when it exits; the new model is then
scored on the held-out pairs beside the old one. The version folder is published only once all of
that succeeded. `progress(stage, done, total)` reports each stage so a caller can show or persist it.

With `variants_per_image` (the paper's round-2 option) the pool also gets synthetic variants, written
into the version folder (`trainer.variants`), and same-reference pairs join the random ones; both
kinds are voted, split, trained on and gated alike.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import shutil
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image

from iqa.engines.base import Engine, ModelSpec, Sampling
from iqa.reading import ScoreReading, read_score
from iqa.scoring import ScoreResult, score_image
from iqa.settings import PromptProfile
from trainer import checkpoint
from trainer.checkpoint import ModelSource
from trainer.config import RoundConfig, TrainJob
from trainer.metrics import (
    parse_failure_rate,
    pseudo_label_agreement,
    read_pair_agreement,
    read_pair_order,
    score_spread,
    soft_pseudo_label_agreement,
)
from trainer.pairs import sample_group_pairs, sample_pairs, split_holdout
from trainer.pool import Pool, load_pool
from trainer.process import train
from trainer.variants import VARIANTS_DIR, add_variants
from trainer.voting import PairLabel, Voter, VotingResult, vote_pairs

Progress = Callable[[str, int, int], None]
T = TypeVar("T")


class RoundEngines(Protocol):
    """Where a round's model work goes: the parent votes and is scored, then the candidate is scored."""

    def parent(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        """A started engine answering with the parent `spec`."""
        ...

    def candidate(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        """A started engine answering with the trained candidate `spec` (not registered anywhere yet)."""
        ...

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        """Whether the parent's engine stays loaded while the child trains anyway (a vLLM server, the
        serving engine): then the parent's held-out evaluation runs beside the training, not before it."""
        ...


@dataclass(frozen=True)
class RoundResult:
    """The published version, its lineage entry and its manifest."""

    path: Path
    model: ModelSource
    manifest: dict[str, Any]
    labels: list[dict[str, Any]]  # the voted pairs by image id, as in `pseudo_labels.json`


@asynccontextmanager
async def local_engine(
    spec: ModelSpec,
    *,
    profile: PromptProfile = "evoquality",
    device: str = "auto",
    max_pixels: int = 1280 * 28 * 28,
) -> AsyncIterator[Engine]:
    """A started in-process engine for `spec`, closed (its memory released) when the block ends."""
    from iqa.engines.local import LocalEngine

    engine = LocalEngine(spec, profile=profile, device=device, max_pixels=max_pixels)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@dataclass(frozen=True)
class LocalEngines:
    """The default `RoundEngines`: an in-process engine per stage, closed after it, so no model is held
    in this process while the child trains."""

    profile: PromptProfile = "evoquality"
    device: str = "auto"
    max_pixels: int = 1280 * 28 * 28

    def parent(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        return local_engine(spec, profile=self.profile, device=self.device, max_pixels=self.max_pixels)

    candidate = parent

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        return False  # released first: the child may need the device's memory


def _sampling(config: RoundConfig, constrain: bool, kind: str) -> Sampling:
    """Round work is `background`: an engine that also serves clients answers them first."""
    return Sampling(
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        constrain=kind if constrain else None,  # type: ignore[arg-type]
        background=True,
    )


async def _each_bounded(
    images: Sequence[Image.Image],
    work: Callable[[Image.Image], Awaitable[T]],
    concurrency: int,
    progress: Callable[[int, int], None] | None,
) -> list[T]:
    """`work` on every image, at most `concurrency` in flight, reporting each one done."""
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def one(image: Image.Image) -> T:
        nonlocal done
        async with semaphore:
            result = await work(image)
        done += 1
        if progress is not None:
            progress(done, len(images))
        return result

    return list(await asyncio.gather(*(one(image) for image in images)))


async def score_images(
    engine: Engine,
    images: Sequence[Image.Image],
    n: int,
    sampling: Sampling,
    profile: PromptProfile,
    concurrency: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[ScoreResult]:
    """n score samples for every image, at most `concurrency` requests in flight."""
    return await _each_bounded(
        images, lambda image: score_image(engine, image, n, sampling, profile), concurrency, progress
    )


async def read_images(
    engine: Engine,
    images: Sequence[Image.Image],
    profile: PromptProfile,
    concurrency: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[ScoreReading]:
    """The one-pass score reading of every image (round work), at most `concurrency` in flight."""
    return await _each_bounded(
        images, lambda image: read_score(engine, image, profile, background=True), concurrency, progress
    )


def gate_metrics(
    scores: dict[int, ScoreResult],
    holdout: Sequence[PairLabel],
    readings: dict[int, ScoreReading] | None = None,
) -> dict[str, Any]:
    """The label-free checks of a model on the held-out pairs: agreement, parse failures, spread.

    With `readings`, agreement is also read deterministically, per pair and in `holdout` order, so the
    gate can compare two models pair by pair: as the Thurstone chance (`holdout_read_pairs`, what the
    gate tests) and as the read order (`holdout_order_pairs`, which only swaps move); `holdout_readings`
    keeps each held-out image's read (mean, std) so another statistic can be computed later.
    """
    read: dict[str, Any] = {}
    if readings is not None:
        distributions = {
            index: None if r.score is None else (r.score, r.std or 0.0) for index, r in readings.items()
        }
        per_pair = read_pair_agreement(distributions, holdout)
        counted = [c for c in per_pair if c is not None]
        order = read_pair_order(distributions, holdout)
        ordered = [c for c in order if c is not None]
        read = {
            "holdout_read_agreement": statistics.fmean(counted) if counted else math.nan,
            "holdout_read_pairs": per_pair,
            "holdout_order_agreement": statistics.fmean(ordered) if ordered else math.nan,
            "holdout_order_pairs": order,
            "holdout_readings": {str(i): None if d is None else list(d) for i, d in distributions.items()},
            "read_spread": score_spread({k: r.score for k, r in readings.items()}),
            "read_coverage": statistics.fmean([r.coverage for r in readings.values()] or [math.nan]),
        }
    means = {index: result.score for index, result in scores.items()}
    parsed = {index: [v for v in result.scores if v is not None] for index, result in scores.items()}
    samples = sum(result.samples for result in scores.values())
    invalid = samples - sum(result.valid for result in scores.values())
    valid_means = [m for m in means.values() if m is not None]
    return _json_safe(
        {
            "holdout_agreement": pseudo_label_agreement(means, holdout),
            "holdout_soft_agreement": soft_pseudo_label_agreement(parsed, holdout),
            "parse_failure_rate": parse_failure_rate(invalid, samples),
            "score_spread": score_spread(means),
            "mean_score": statistics.fmean(valid_means) if valid_means else math.nan,
            "images": len(scores),
            "pairs": len(holdout),
            "decided_pairs": sum(not label.tie for label in holdout),
            "samples": samples,
            **read,
        }
    )


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: undefined metrics are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _start_training(
    job: TrainJob, steps: int, report: Progress, stop: threading.Event
) -> asyncio.Future[dict[str, Any]]:
    report("training", 0, steps)
    return asyncio.ensure_future(asyncio.to_thread(train, job, report, stop))


def _degree(n_images: int, n_pairs: int, wanted: int) -> int:
    """The wanted minimum degree, lowered to what n_pairs pairs over n_images images can give."""
    return max(0, min(wanted, n_images - 1, (2 * n_pairs) // max(1, n_images)))


def _label_stats(
    voting: VotingResult,
    train: list[PairLabel],
    holdout: list[PairLabel],
    config: RoundConfig,
    pair_kinds: list[str],
):
    margins = [label.margin for label in voting.labels]
    return {
        "pairs": len(voting.labels),
        "random_pairs": pair_kinds.count("random"),
        "variant_pairs": pair_kinds.count("same-reference"),
        "votes_per_pair": config.votes,
        "votes": voting.votes,
        "invalid_votes": voting.invalid_votes,
        "invalid_rate": voting.invalid_rate,
        "ties": voting.ties,
        "mean_margin": statistics.fmean(margins) if margins else None,
        "label_rule": config.label_rule,
        "min_margin": config.min_margin,
        "train_pairs": len(train),
        "holdout_pairs": len(holdout),
    }


async def run_round(
    model: str | Path,
    pool: Pool | Path,
    out_dir: Path,
    config: RoundConfig,
    *,
    engines: RoundEngines | None = None,
    progress: Progress | None = None,
    voter: Voter | None = None,
) -> RoundResult:
    """Run one round with `model` voting on `pool`; publish `<out_dir>/vNNN` and return it.

    `engines` say where the votes and scores go (default: `LocalEngines` on the config's device);
    `voter`, where stage 1 runs instead of the parent's engine (voting shards, `trainer.shards`).
    """
    report = progress or (lambda stage, done, total: None)
    parent = checkpoint.resolve_model(model)
    if isinstance(pool, Path):
        pool = load_pool(pool, config.max_pixels)
    n = len(pool)
    if n < 3:
        raise ValueError(f"a round needs at least 3 usable images; {pool.root} has {n}")
    engines = engines or LocalEngines(config.profile, config.device, config.max_pixels)
    constrain = parent.untrained if config.constrain_answers is None else config.constrain_answers
    n_pairs = min(config.pairs, n * (n - 1) // 2)
    degree = _degree(n, n_pairs, config.min_degree)
    pairs = sample_pairs(n, n_pairs, degree, config.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    version = checkpoint.next_version(out_dir)
    staging = checkpoint.staging_dir(out_dir, version)
    stop_training = threading.Event()
    training_run: asyncio.Future[dict[str, Any]] | None = None
    try:  # a failed round leaves no half-written version behind
        groups: list[list[int]] = []
        if config.variants_per_image:
            # Written into the version folder: the trainer loads them by path, and the version keeps them.
            pool, groups = await asyncio.to_thread(
                add_variants,
                pool,
                config.variants_per_image,
                config.seed,
                staging / VARIANTS_DIR,
                lambda done, total: report("variants", done, total),
            )
        timings["variants_s"] = time.perf_counter() - started
        wanted = config.pairs if config.variant_pairs is None else config.variant_pairs
        n_variant_pairs = min(wanted, sum(len(g) * (len(g) - 1) // 2 for g in groups))
        pairs = pairs + sample_group_pairs(groups, n_variant_pairs, config.seed)
        pair_kinds = ["random"] * n_pairs + ["same-reference"] * n_variant_pairs

        mark = time.perf_counter()
        async with engines.parent(parent.spec()) as engine:
            voting = await (voter or vote_pairs)(
                engine,
                pool.images,
                pairs,
                config.votes,
                _sampling(config, constrain, "vote"),
                config.profile,
                config.concurrency,
                lambda done, total: report("voting", done, total),
                rule=config.label_rule,
                min_margin=config.min_margin,
                image_ids=pool.ids,
            )
            timings["voting_s"] = time.perf_counter() - mark
            train_part, holdout_part = split_holdout(range(len(voting.labels)), config.holdout, config.seed)
            split = {k: "holdout" for k in holdout_part}
            split |= {k: "train" for k in train_part if voting.labels[k].margin >= config.min_margin}
            train = [voting.labels[k] for k in train_part if split.get(k) == "train"]
            holdout = [voting.labels[k] for k in holdout_part]
            if not train:
                raise ValueError("no training pairs left after the hold-out split and the margin filter")
            settings = replace(
                config.train,
                seed=config.seed,
                temperature=config.temperature,
                constrain_answers=constrain,
                max_completion_length=config.train.max_completion_length or config.max_new_tokens,
            )
            job = TrainJob(
                parent=parent,
                image_ids=pool.ids,
                image_paths=[str(p) for p in pool.paths],
                preferences=_training_preferences(pool, train, config),
                settings=settings,
                output_dir=str(staging),
                profile=config.profile,
                max_pixels=config.max_pixels,
            )
            beside = engines.holds_parent_while_training(parent.spec())
            if beside:
                training_mark = time.perf_counter()
                training_run = _start_training(job, settings.steps, report, stop_training)
            mark = time.perf_counter()
            # Beside the training, its steps are the progress shown (two stages would take turns).
            before = await _score_holdout(
                engine, pool, holdout, config, constrain, "scoring-before", None if beside else report
            )
            timings["scoring_before_s"] = time.perf_counter() - mark

        if not beside:
            training_mark = time.perf_counter()
            training_run = _start_training(job, settings.steps, report, stop_training)
        training = await training_run
        timings["training_s"] = time.perf_counter() - training_mark

        checkpoint.copy_processor_files(parent.adapter_base or parent.root, staging)
        kind = "lora" if settings.lora else "full"
        adapter_base = (parent.adapter_base or parent.path) if kind == "lora" else None
        name = f"{checkpoint.root_name(parent)}-evoq-{checkpoint.version_dir_name(version)}"
        candidate = ModelSource(
            path=str(staging),
            kind=kind,
            root=parent.root,
            name=name,
            version=version,
            round=parent.round + 1,
            adapter_base=adapter_base,
            untrained=parent.untrained,
        )
        mark = time.perf_counter()
        async with engines.candidate(candidate.spec()) as engine:
            timings["candidate_load_s"] = time.perf_counter() - mark  # e.g. the adapter into vLLM
            after = await _score_holdout(engine, pool, holdout, config, constrain, "scoring-after", report)
        timings["scoring_after_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - started

        manifest = {
            "format": checkpoint.MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "round": candidate.round,
            "kind": kind,
            "created_at": checkpoint.utc_now(),
            "base_model": {"path": parent.root, "untrained": parent.untrained},
            "adapter_base": adapter_base,
            "parent": {
                "path": parent.path,
                "name": parent.name,
                "kind": parent.kind,
                "version": parent.version,
            },
            "reference_model": training["reference_model"],
            "settings": {
                **asdict(config),
                "train": asdict(settings),
                "pairs_used": n_pairs,
                "min_degree_used": degree,
                "variant_pairs_used": n_variant_pairs,
            },
            "pool": {
                "root": str(pool.root),
                "images": n,
                "rejected": len(pool.rejected),
                "rejected_files": pool.rejected,
                "variants": len(pool) - n,
                # relative to the version folder; `variants.json` there lists each variant's reference
                "variants_dir": VARIANTS_DIR if groups else None,
            },
            "pseudo_labels": _label_stats(voting, train, holdout, config, pair_kinds),
            "training": training,
            "metrics": {"before": before, "after": after},
            "timings": timings,
        }
        checkpoint.write_manifest(staging, manifest)
        labels = _label_rows(pool, voting, split, pair_kinds)
        (staging / "pseudo_labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        path = checkpoint.publish(staging, out_dir, version)
    except BaseException:
        if training_run is not None and not training_run.done():  # the parent's evaluation failed beside it
            stop_training.set()
            await asyncio.gather(training_run, return_exceptions=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RoundResult(path, replace(candidate, path=str(path)), manifest, labels)


async def _score_holdout(
    engine: Engine,
    pool: Pool,
    holdout: list[PairLabel],
    config: RoundConfig,
    constrain: bool,
    stage: str,
    report: Progress | None,
) -> dict[str, Any]:
    indices = sorted({index for label in holdout for index in (label.i, label.j)})
    # In a thread: variant images are read from their files (the engine may be serving clients).
    images = await asyncio.to_thread(lambda: [pool.images[k] for k in indices])
    # Both at once: an engine that batches (vLLM, the local engine) fills its batches from the two.
    results, readings = await asyncio.gather(
        score_images(
            engine,
            images,
            config.eval_samples,
            _sampling(config, constrain, "score"),
            config.profile,
            config.concurrency,
            None if report is None else lambda done, total: report(stage, done, total),
        ),
        read_images(engine, images, config.profile, config.concurrency),
    )
    return {
        "model": engine.active.name,
        **gate_metrics(
            dict(zip(indices, results, strict=True)), holdout, dict(zip(indices, readings, strict=True))
        ),
    }


def _training_preferences(
    pool: Pool, train: list[PairLabel], config: RoundConfig
) -> list[tuple[str, str, float]]:
    """(image i, image j, p*) of the training pairs; with `shuffle_labels`, p* permuted across pairs."""
    p_stars = [label.p_star for label in train]
    if config.shuffle_labels:
        random.Random(config.seed).shuffle(p_stars)
    return [(pool.ids[label.i], pool.ids[label.j], p) for label, p in zip(train, p_stars, strict=True)]


def _label_rows(
    pool: Pool, voting: VotingResult, split: dict[int, str], pair_kinds: list[str]
) -> list[dict[str, Any]]:
    """The voted pairs by image id, written beside the weights so a round can be audited or reused.

    `kind` is `random` (two pool images) or `same-reference` (an image and a variant, or two variants).
    """
    return [
        {
            "image_i": pool.ids[label.i],
            "image_j": pool.ids[label.j],
            "kind": kind,
            "split": split.get(k, "dropped"),
            **row,
        }
        for k, (label, row, kind) in enumerate(zip(voting.labels, voting.to_rows(), pair_kinds, strict=True))
    ]


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (the trainer), in MiB."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
