"""An evolution round on the images the service logged: the same code under Celery and in-process.

`execute_round` drives `trainer.round.run_round` and persists every step in the database (state,
progress, heartbeat, pseudo-labels, gate verdict, timings); it never lets a candidate replace the
active model unless the gate passed and the checkpoint loaded. Promotion marks the new version active
in the database; every API process follows within `EVOQ_ACTIVE_VERSION_POLL_S` (the in-process runner
also swaps its own engine at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from iqa import registry, rounds
from iqa.engines.base import Engine, ModelSpec
from iqa.models import EvolutionRound, Image, ModelVersion, PseudoLabel
from iqa.settings import Settings
from iqa.store import ImageStore
from trainer import checkpoint
from trainer.gate import GateThresholds, GateVerdict, gate_inputs, judge
from trainer.grpo import TrainSettings
from trainer.pool import load_pool
from trainer.round import RoundConfig, RoundResult, local_engine, run_round

log = logging.getLogger(__name__)

# open_engine(spec, is_parent): a started engine answering with `spec`; `is_parent` marks the version
# being evolved (the serving one, which the in-process runner does not load twice).
OpenEngine = Callable[[ModelSpec, bool], AbstractAsyncContextManager[Engine]]
Activate = Callable[[ModelSpec], Awaitable[None]]
HEARTBEAT_S = 5.0
# trainer.round stage -> round state
_STATES = {
    "variants": "voting",  # making the round-2 variants, before the votes
    "voting": "voting",
    "scoring-before": "voting",
    "training": "training",
    "scoring-after": "evaluating",
}


def worker_name() -> str:
    """host:pid of the process running a round (shown in the admin API)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def round_config(settings: Settings, overrides: dict[str, Any]) -> RoundConfig:
    """The trainer's config from the service settings and an admin's per-round overrides."""
    value = {
        "pairs": settings.round_pairs,
        "votes": settings.round_votes,
        "generations": settings.round_generations,
        "steps": settings.round_steps,
        "method": settings.round_method,
        "learning_rate": settings.round_learning_rate,
        "holdout_fraction": settings.round_holdout_fraction,
        "variants_per_image": settings.round_variants_per_image,
        "variant_pairs": None,
        "seed": 0,
        **overrides,
    }
    train = TrainSettings(
        generations=value["generations"],
        steps=value["steps"],
        learning_rate=value["learning_rate"],
        lora=value["method"] == "lora",
        max_completion_length=settings.max_new_tokens,
        device=settings.device,
    )
    return RoundConfig(
        pairs=value["pairs"],
        votes=value["votes"],
        holdout=value["holdout_fraction"],
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        constrain_answers=settings.constrain_answers,
        profile=settings.prompt_profile,
        max_pixels=settings.model_max_pixels,
        device=settings.device,
        seed=value["seed"],
        variants_per_image=value["variants_per_image"],
        variant_pairs=value["variant_pairs"],
        train=train,
    )


def _pool_images(session: Session, limit: int) -> list[Image]:
    return list(
        session.scalars(select(Image).order_by(Image.last_seen_at.desc(), Image.id.desc()).limit(limit))
    )


class _Reporter:
    """Persists progress at most once a second, beats the heart, and stops the round on cancel."""

    def __init__(self, sessions: sessionmaker[Session], round_id: int) -> None:
        self.sessions = sessions
        self.round_id = round_id
        self.state = "voting"
        self.last_write = 0.0
        self.cancelled = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        state = _STATES.get(stage, self.state)
        now = time.monotonic()
        with self.sessions() as session:
            if state != self.state:
                rounds.advance(session, self.round_id, state)
                self.state = state
            elif now - self.last_write < 1.0 and done < total:
                return
            self.last_write = now
            if not rounds.report_progress(session, self.round_id, done, total):
                self.cancelled = True
                raise rounds.RoundCancelled(f"round {self.round_id} was cancelled")


class _Heartbeat:
    """Beats every few seconds from a thread, so long training steps do not look like a dead worker."""

    def __init__(self, sessions: sessionmaker[Session], round_id: int) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sessions, round_id), daemon=True)

    def _run(self, sessions: sessionmaker[Session], round_id: int) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                with sessions() as session:
                    rounds.heartbeat(session, round_id)
            except Exception:
                log.warning("heartbeat of round %s failed", round_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _validation_srcc(settings: Settings, model_path: str) -> float:
    from trainer.cli import evaluate_csv

    result = evaluate_csv(
        Path(settings.validation_csv or ""),
        model_path,
        settings.score_samples,
        max_new_tokens=settings.max_new_tokens,
        constrain_answers=settings.constrain_answers,
        temperature=settings.temperature,
        profile=settings.prompt_profile,
        device=settings.device,
        max_pixels=settings.model_max_pixels,
    )
    return float(result.correlations["srcc"])


def _store_labels(session: Session, round_id: int, result: RoundResult, sha_of: dict[str, int]) -> int:
    """Copy the round's voted pairs between logged images into `pseudo_labels` (train and hold-out).

    Same-reference pairs are skipped: each holds a synthetic variant, which is no client image and has
    no `images` row to refer to. They stay in the version's `pseudo_labels.json` with every other pair.
    """
    rows = [
        row for row in json.loads((result.path / "pseudo_labels.json").read_text()) if row["kind"] == "random"
    ]
    for row in rows:
        session.add(
            PseudoLabel(
                round_id=round_id,
                image_a_id=sha_of[row["image_i"]],
                image_b_id=sha_of[row["image_j"]],
                votes_a=row["votes_i"],
                votes_b=row["votes_j"],
                invalid_votes=row["invalid"],
                p_star=row["p_star"],
                holdout=row["split"] == "holdout",
            )
        )
    return len(rows)


async def execute_round(
    round_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    open_engine: OpenEngine,
    activate: Activate | None = None,
) -> str:
    """Run a queued round to a final state and return it; every failure ends the round as `failed`.

    Only a database that stops answering can leave a round unfinished; it is then failed by
    `rounds.reap_stale_rounds` once its heartbeat is stale.
    """
    try:
        return await _execute(round_id, settings, sessions, open_engine, activate)
    except rounds.RoundCancelled as error:
        with sessions() as session:
            rounds.finish(session, round_id, "cancelled", error=str(error))
        return "cancelled"
    except Exception as error:
        log.exception("round %s failed", round_id)
        with sessions() as session:
            rounds.finish(session, round_id, "failed", error=f"{type(error).__name__}: {error}")
        return "failed"


async def _execute(
    round_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    open_engine: OpenEngine,
    activate: Activate | None,
) -> str:
    started = time.perf_counter()
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        overrides = dict(row.settings or {})
        parent_row = session.get(ModelVersion, row.parent_version_id) if row.parent_version_id else None
        parent_row = parent_row or registry.active_version(session)
        if parent_row is None:
            raise RuntimeError("no model version to evolve")
        parent = registry.to_spec(parent_row)
        images = _pool_images(session, overrides.pop("max_images", settings.round_max_images))
        rounds.advance(session, round_id, "voting", worker=worker_name())
    store = ImageStore(Path(settings.image_store or ""))
    paths = [store.path_for(image.sha256) for image in images]
    id_of = {f"{image.sha256[:2]}/{image.sha256[2:4]}/{image.sha256}": image.id for image in images}
    config = round_config(settings, overrides)
    parent_path = checkpoint.resolve_model(parent.path).path  # how run_round will name the parent

    @asynccontextmanager
    async def open_for_round(spec: ModelSpec) -> AsyncIterator[Engine]:
        # The parent votes under its database version; the candidate has none yet (id -1).
        if spec.path == parent_path:
            async with open_engine(parent, True) as engine:
                yield engine
        else:
            candidate = replace(spec, version_id=-1, name=f"candidate of round {round_id}")
            async with open_engine(candidate, False) as engine:
                yield engine

    with _Heartbeat(sessions, round_id):
        pool = await asyncio.to_thread(
            load_pool, store.root, config.max_pixels, [p for p in paths if p.exists()]
        )
        result = await run_round(
            parent.path,
            pool,
            Path(settings.checkpoints_dir or ""),
            config,
            open_engine=open_for_round,
            progress=_Reporter(sessions, round_id),
        )
        verdict = await _judge(settings, parent, result)

    metrics = result.manifest["metrics"]
    timings = {**result.manifest["timings"], "round_s": time.perf_counter() - started}
    with sessions() as session:
        _store_labels(session, round_id, result, id_of)
        version = registry.register_version(
            session,
            name=result.model.name,
            kind=result.model.kind,
            path=result.model.path,
            base_path=result.model.adapter_base,
            parent_id=parent.version_id,
            untrained=parent.untrained,
            metrics=metrics,
            manifest=result.manifest,
        )
        session.commit()
        fields = {
            "result_version_id": version.id,
            "metrics": metrics,
            "gate": verdict.to_dict(),
            "timings": timings,
        }
        if not verdict.passed:
            rounds.finish(session, round_id, "rejected", error="; ".join(verdict.reasons), **fields)
            return "rejected"
        candidate = registry.to_spec(version)
        rounds.advance(session, round_id, "swapping")
    try:
        if activate is not None:
            await activate(candidate)
        else:
            async with open_engine(candidate, False):  # a broken checkpoint fails here, not in the API
                pass
    except Exception as error:
        log.exception("round %s: the new checkpoint would not load", round_id)
        with sessions() as session:
            session.get_one(ModelVersion, candidate.version_id).status = "failed"
            rounds.finish(session, round_id, "failed", error=f"swap refused: {error}", **fields)
        return "failed"
    with sessions() as session:
        registry.mark_active(session, session.get_one(ModelVersion, candidate.version_id))
        session.commit()
        rounds.finish(session, round_id, "succeeded", **fields)
    return "succeeded"


async def _judge(settings: Settings, parent: ModelSpec, result: RoundResult) -> GateVerdict:
    """The gate on the round's before/after metrics (and the validation CSV when configured)."""
    metrics = result.manifest["metrics"]
    active_metrics = gate_inputs(metrics["before"])
    candidate_metrics = gate_inputs(metrics["after"])
    if settings.validation_csv is not None:
        active_metrics["srcc"] = await asyncio.to_thread(_validation_srcc, settings, parent.path)
        candidate_metrics["srcc"] = await asyncio.to_thread(_validation_srcc, settings, str(result.path))
    thresholds = GateThresholds(
        agreement_tolerance=settings.gate_agreement_tolerance,
        max_parse_failure=settings.gate_max_parse_failure,
        min_spread=settings.gate_min_spread,
    )
    return judge(active_metrics, candidate_metrics, thresholds)


async def run_round_in_process(service: Any, round_id: int) -> str:
    """The embedded runner: vote with the serving engine, swap it in place when the gate passes."""

    open_other = worker_open_engine(service.settings)

    @asynccontextmanager
    async def open_engine(spec: ModelSpec, is_parent: bool) -> AsyncIterator[Engine]:
        if is_parent and spec.version_id == service.engine.active.version_id:
            yield service.engine  # the serving engine votes; round work yields to clients there
            return
        async with open_other(spec, is_parent) as engine:
            yield engine

    return await execute_round(
        round_id, service.settings, service.sessions, open_engine, service.engine.activate
    )


def worker_open_engine(settings: Settings) -> OpenEngine:
    """Engines for a Celery worker: a local engine per version, released after each stage."""

    @asynccontextmanager
    async def open_engine(spec: ModelSpec, is_parent: bool) -> AsyncIterator[Engine]:
        async with local_engine(
            spec,
            profile=settings.prompt_profile,
            device=settings.device,
            max_pixels=settings.model_max_pixels,
        ) as engine:
            yield engine

    return open_engine
