"""A round of the service, from queued to a final state: the one home of the round lifecycle.

State machine, in the database (shared by the API, which queues, watches and cancels rounds, and by
whatever runs them: a Celery worker or the API process itself):

    queued -> voting -> training -> evaluating -> swapping -> succeeded
                                               \\-> rejected (the gate said no; the active model stays)
    any running state -> failed (error, or its worker died: no heartbeat) | cancelled (on request)

The `lock` column is 1 for the one round that is queued or running and NULL otherwise; its unique
constraint makes a second concurrent round impossible even across processes and crashes. A round whose
heartbeat is older than the stale timeout is failed by `reap_stale_rounds`, which frees the lock; the
active model is never touched by that.

`execute_round` drives `trainer.round.run_round` (the algorithm) and persists every step: state,
progress and heartbeat from a thread (never on the event loop), pseudo-labels, gate verdict, timings.
A candidate replaces the active model only if the gate passed and it loaded. Round work goes to the
engines of `RoundEngines`: with the vllm engine, votes and held-out scores go to vLLM (the serving
server at background priority, or `EVOQ_ROUND_VLLM_URL`), and a LoRA candidate is scored there under a
provisional adapter name, then promoted or unloaded; nothing but the training process loads the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from iqa import registry
from iqa.engines import build_engine
from iqa.engines.base import Engine, ModelSpec
from iqa.models import ROUND_ACTIVE_STATES, EvolutionRound, Image, ModelVersion, PseudoLabel, utcnow
from iqa.settings import Settings
from iqa.store import ImageStore, service_store
from trainer.config import RoundOverrides, pool_limit, round_config
from trainer.gate import GateThresholds, GateVerdict, gate_inputs, judge
from trainer.pool import load_pool
from trainer.round import RoundResult, local_engine, run_round
from trainer.shards import ShardedVoter

log = logging.getLogger(__name__)

FINAL_STATES = ("succeeded", "rejected", "failed", "cancelled")
_ORDER = ("queued", "voting", "training", "evaluating", "swapping")
HEARTBEAT_S = 1.0  # how often progress is written and the heartbeat beats
SNAPSHOT_THREADS = 16  # pool images fetched at once into a round's snapshot
# trainer.round stage -> round state
_STATES = {
    "variants": "voting",  # making the round-2 variants, before the votes
    "voting": "voting",
    "scoring-before": "voting",
    "training": "training",
    "scoring-after": "evaluating",
}


class RoundConflict(RuntimeError):
    """Another round is queued or running."""


class RoundCancelled(RuntimeError):
    """Raised inside a running round when an admin asked to cancel it."""


# ---- the state machine ---------------------------------------------------------------------------


def create_round(
    session: Session, trigger: str, overrides: RoundOverrides, parent_version_id: int | None
) -> EvolutionRound:
    """Queue a new round, or raise RoundConflict when one is already queued or running."""
    round_ = EvolutionRound(
        trigger=trigger,
        settings=overrides.model_dump(exclude_none=True),
        parent_version_id=parent_version_id,
        progress={"stage": "queued", "done": 0, "total": 0},
    )
    session.add(round_)
    try:
        session.commit()
    except IntegrityError as error:
        session.rollback()
        running = current_round(session)
        detail = f" (round {running.id} is {running.state})" if running else ""
        raise RoundConflict(f"an evolution round is already in progress{detail}") from error
    return round_


def current_round(session: Session) -> EvolutionRound | None:
    """The round holding the lock, if any."""
    return session.scalars(select(EvolutionRound).where(EvolutionRound.lock == 1)).first()


def advance(session: Session, round_id: int, state: str, worker: str | None = None) -> EvolutionRound:
    """Move a running round to the next running state; raise RoundCancelled when cancel was asked."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    if round_.state not in ROUND_ACTIVE_STATES:
        raise RuntimeError(f"round {round_id} already ended ({round_.state})")
    if round_.cancel_requested:
        raise RoundCancelled(f"round {round_id} was cancelled")
    if _ORDER.index(state) < _ORDER.index(round_.state):
        raise RuntimeError(f"round {round_id} cannot go back from {round_.state} to {state}")
    now = utcnow()
    values: dict[str, Any] = {"state": state, "heartbeat_at": now, "started_at": round_.started_at or now}
    if state != round_.state:
        values["progress"] = {"stage": state, "done": 0, "total": 0}
    if worker:
        values["worker"] = worker
    # Conditional on what was read: a cancel committed since (a queued round is ended at once) wins.
    moved = session.execute(
        update(EvolutionRound)
        .where(
            EvolutionRound.id == round_id,
            EvolutionRound.state == round_.state,
            EvolutionRound.cancel_requested.is_(False),
        )
        .values(**values)
    ).rowcount
    session.commit()
    if not moved:
        raise RoundCancelled(f"round {round_id} was cancelled")
    return session.get_one(EvolutionRound, round_id, populate_existing=True)


def report_progress(session: Session, round_id: int, done: int, total: int) -> bool:
    """Store progress and beat the heart; returns False when a cancel was requested."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    round_.progress = {"stage": round_.state, "done": done, "total": total}
    round_.heartbeat_at = utcnow()
    session.commit()
    return not round_.cancel_requested


def heartbeat(session: Session, round_id: int) -> bool:
    """Mark the round alive; returns False when a cancel was requested."""
    session.execute(
        update(EvolutionRound)
        .where(EvolutionRound.id == round_id, EvolutionRound.lock == 1)
        .values(heartbeat_at=utcnow())
    )
    session.commit()
    cancelled = session.scalar(select(EvolutionRound.cancel_requested).where(EvolutionRound.id == round_id))
    return not cancelled


def finish(session: Session, round_id: int, state: str, **fields: Any) -> EvolutionRound:
    """End a round in a final state, release the lock, and record what happened."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state} is not a final state")
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    round_.state = state
    round_.lock = None
    round_.finished_at = utcnow()
    for name, value in fields.items():
        setattr(round_, name, value)
    session.commit()
    return round_


def request_cancel(session: Session, round_id: int) -> EvolutionRound:
    """Ask a round to stop; a queued round is cancelled at once, a running one at its next check."""
    round_ = session.get_one(EvolutionRound, round_id, populate_existing=True)
    if round_.state in FINAL_STATES:
        return round_
    if round_.state == "queued":
        ended = session.execute(  # only while still queued: a runner may have started it since
            update(EvolutionRound)
            .where(EvolutionRound.id == round_id, EvolutionRound.state == "queued")
            .values(state="cancelled", lock=None, finished_at=utcnow(), error="cancelled before it started")
        ).rowcount
        session.commit()
        if ended:
            return session.get_one(EvolutionRound, round_id, populate_existing=True)
    session.execute(update(EvolutionRound).where(EvolutionRound.id == round_id).values(cancel_requested=True))
    session.commit()
    return session.get_one(EvolutionRound, round_id, populate_existing=True)


def reap_stale_rounds(session: Session, stale_after: timedelta) -> list[int]:
    """Fail rounds whose worker stopped beating (crashed or killed) or that no worker ever took."""
    cutoff = utcnow() - stale_after
    stale = session.scalars(
        select(EvolutionRound).where(
            EvolutionRound.lock == 1,
            func.coalesce(EvolutionRound.heartbeat_at, EvolutionRound.created_at) < cutoff,
        )
    ).all()
    for round_ in stale:
        if round_.state == "queued":
            error = "no worker started the round; the active model was left unchanged"
        else:
            error = (
                f"worker {round_.worker or '?'} stopped reporting during {round_.state}; "
                "the active model was left unchanged"
            )
        finish(session, round_.id, "failed", error=error)
    return [r.id for r in stale]


def images_since_last_round(session: Session) -> int:
    """Images first seen after the newest round was created (all images when there was none)."""
    last = last_round_created(session)
    query = select(func.count(Image.id))
    if last is not None:
        query = query.where(Image.first_seen_at > last)
    return session.scalar(query) or 0


def last_round_created(session: Session) -> datetime | None:
    """When the newest round was created, or None."""
    return session.scalar(select(func.max(EvolutionRound.created_at)))


def start_scheduled_round(session: Session, settings: Settings) -> EvolutionRound | None:
    """Queue a `schedule` round when one is due; None when not (or one is already running).

    Due means: scheduled rounds are on, none ran within `round_every_hours`, and at least
    `round_min_new_images` images arrived since the last one. Stale rounds of dead workers are failed
    first, so a crash never blocks the schedule for good.
    """
    reap_stale_rounds(session, timedelta(seconds=settings.round_stale_after_s))
    if not settings.rounds_scheduled or current_round(session) is not None:
        return None
    last = last_round_created(session)
    if last is not None and utcnow() - last < timedelta(hours=settings.round_every_hours):
        return None
    if images_since_last_round(session) < settings.round_min_new_images:
        return None
    active = registry.active_version(session)
    try:
        return create_round(session, "schedule", RoundOverrides(), active.id if active else None)
    except RoundConflict:
        return None


# ---- engines for round work ----------------------------------------------------------------------


class RoundEngines(Protocol):
    """Where a service round sends its work, and how its candidate becomes the active model."""

    def parent(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        """A started engine answering with the version being evolved (votes, held-out scores)."""
        ...

    def candidate(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        """A started engine answering with the unregistered candidate (held-out scores)."""
        ...

    async def promote(self, version: ModelSpec) -> None:
        """Make the registered candidate `version` the active model (in the database too); raise if it
        cannot serve, leaving the active model as it was."""
        ...

    async def discard(self) -> None:
        """Release whatever the candidate still holds (an adapter loaded for its evaluation)."""
        ...

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        """Whether the parent's engine stays loaded while the child trains anyway (see trainer.round)."""
        ...


def _uses_vllm(settings: Settings) -> bool:
    return settings.engine == "vllm"


class WorkerEngines:
    """Engines of a round outside the API (a Celery worker).

    With the vllm engine, votes and scores go to vLLM (`EVOQ_ROUND_VLLM_URL`, else the serving server
    at background priority); each version is loaded there as an adapter under a name of its own and
    unloaded afterwards. The API processes load a promoted version themselves when they follow the
    database (a LoRA load takes milliseconds). A full-weight candidate is scored on a dedicated round
    server when one is set (it reloads its weights; the serving one is untouched), else by a local
    engine on the training device, the only case where this process loads the model.
    With the local engine, each stage gets a local engine, released after it.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._candidate: Engine | None = None

    def _vllm(self, spec: ModelSpec) -> Engine:
        return build_engine(self.settings, spec, vllm_url=(self.settings.round_vllm_urls or [None])[0])

    @asynccontextmanager
    async def _local(self, spec: ModelSpec, device: str) -> AsyncIterator[Engine]:
        s = self.settings
        async with local_engine(
            spec, profile=s.prompt_profile, device=device, max_pixels=s.model_max_pixels
        ) as engine:
            yield engine

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        return self._parent_on_vllm(spec)  # a vLLM server holds it anyway; a local engine is released

    def _parent_on_vllm(self, spec: ModelSpec) -> bool:
        # A full version other than the served weights would need a reload of the serving server.
        return _uses_vllm(self.settings) and (spec.kind != "full" or bool(self.settings.round_vllm_url))

    @asynccontextmanager
    async def parent(self, spec: ModelSpec) -> AsyncIterator[Engine]:
        if not self._parent_on_vllm(spec):
            async with self._local(spec, self.settings.device) as engine:
                yield engine
            return
        engine = self._vllm(spec)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()

    @asynccontextmanager
    async def candidate(self, spec: ModelSpec) -> AsyncIterator[Engine]:
        s = self.settings
        if _uses_vllm(s) and (spec.kind == "lora" or s.round_vllm_url):
            engine = self._vllm(spec)
            await engine.start()
            self._candidate = engine  # kept until promote or discard
            yield engine
            return
        async with self._local(spec, s.train_device or s.device) as engine:
            yield engine

    async def promote(self, version: ModelSpec) -> None:
        await self.discard()  # its adapter was only for the evaluation; the API loads its own

        def mark() -> None:
            with self.sessions() as session:
                registry.mark_active(session, session.get_one(ModelVersion, version.version_id))
                session.commit()

        await asyncio.to_thread(mark)

    async def discard(self) -> None:
        engine, self._candidate = self._candidate, None
        if engine is not None:
            await engine.close()


class InProcessEngines:
    """Engines of a round inside the API process (the embedded default, or rounds without Celery).

    The serving engine votes (round work yields to clients there). With vLLM and no round server, a
    LoRA candidate is staged on the serving engine under a provisional adapter name and promoted in
    place (no second load); otherwise it is scored as `WorkerEngines` would, and promotion loads it
    into the serving engine. Promotion holds the service's activation lock, as the follower does.
    """

    def __init__(self, service: Any) -> None:
        from iqa.engines.vllm import VLLMEngine

        self.service = service
        self.other = WorkerEngines(service.settings, service.sessions)
        engine = service.engine
        self._stager = (
            engine if isinstance(engine, VLLMEngine) and not service.settings.round_vllm_url else None
        )
        self._staged: Any = None

    def _serving_is_parent(self, spec: ModelSpec) -> bool:
        serving = self.service.engine
        return spec.version_id == serving.active.version_id and not self.service.settings.round_vllm_url

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        return self._serving_is_parent(spec) or self.other.holds_parent_while_training(spec)

    @asynccontextmanager
    async def parent(self, spec: ModelSpec) -> AsyncIterator[Engine]:
        if self._serving_is_parent(spec):
            yield self.service.engine
            return
        async with self.other.parent(spec) as engine:
            yield engine

    @asynccontextmanager
    async def candidate(self, spec: ModelSpec) -> AsyncIterator[Engine]:
        if self._stager is not None and spec.kind == "lora":
            self._staged = await self._stager.stage(spec)
            yield self._staged
            return
        async with self.other.candidate(spec) as engine:
            yield engine

    async def promote(self, version: ModelSpec) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            await self.service.activate_version(version, staged=staged)
            return
        await self.other.discard()
        await self.service.activate_version(version)

    async def discard(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None and self._stager is not None:
            await self._stager.discard(staged)
        await self.other.discard()


# ---- running a round -----------------------------------------------------------------------------


def worker_name() -> str:
    """host:pid of the process running a round (shown in the admin API)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Tracker:
    """The round's progress hook. It only records (stage, done, total) in memory, so it never blocks the
    caller (the event loop, when the API runs the round); a thread writes state, progress and heartbeat
    every `HEARTBEAT_S` and raises the cancel flag the hook then acts on."""

    def __init__(self, sessions: sessionmaker[Session], round_id: int) -> None:
        self.sessions = sessions
        self.round_id = round_id
        self._lock = threading.Lock()
        self._wanted = ("voting", 0, 0)
        self._written: tuple[str, int, int] | None = None
        self._state = "voting"
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"round-{round_id}-tracker", daemon=True)

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self._wanted = (_STATES.get(stage, self._wanted[0]), done, total)
        if self.cancelled.is_set():
            raise RoundCancelled(f"round {self.round_id} was cancelled")

    def _write(self) -> None:
        with self._lock:
            wanted = self._wanted
        with self.sessions() as session:
            state, done, total = wanted
            if state != self._state:
                advance(session, self.round_id, state)
                self._state = state
            if wanted != self._written:
                alive = report_progress(session, self.round_id, done, total)
                self._written = wanted
            else:
                alive = heartbeat(session, self.round_id)
        if not alive:
            self.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except RoundCancelled:
                self.cancelled.set()
            except Exception:
                log.warning("progress of round %s could not be written", self.round_id, exc_info=True)

    def __enter__(self) -> _Tracker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Start:
    overrides: RoundOverrides
    parent: ModelSpec
    hashes: list[str]  # the pool's images, newest first
    image_ids: dict[str, int]  # pool image id (relative path) -> images.id


def _begin(settings: Settings, sessions: sessionmaker[Session], round_id: int) -> _Start:
    """Read what the round needs and mark it voting (raises RoundCancelled if it was cancelled)."""
    with sessions() as session:
        row = session.get_one(EvolutionRound, round_id)
        overrides = RoundOverrides.model_validate(row.settings or {})
        parent_row = session.get(ModelVersion, row.parent_version_id) if row.parent_version_id else None
        parent_row = parent_row or registry.active_version(session)
        if parent_row is None:
            raise RuntimeError("no model version to evolve")
        images = list(
            session.scalars(
                select(Image)
                .order_by(Image.last_seen_at.desc(), Image.id.desc())
                .limit(pool_limit(settings, overrides))
            )
        )
        advance(session, round_id, "voting", worker=worker_name())
        parent = registry.to_spec(parent_row)
    ids = {ImageStore.key_for(image.sha256): image.id for image in images}
    return _Start(overrides, parent, [image.sha256 for image in images], ids)


@dataclass
class _ForRound:
    """`trainer.round`'s engines for one service round: the parent under its database version, the
    candidate as an unregistered version (id -1) with the round's name."""

    engines: RoundEngines
    parent_spec: ModelSpec
    round_id: int

    def parent(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        return self.engines.parent(self.parent_spec)

    def holds_parent_while_training(self, spec: ModelSpec) -> bool:
        return self.engines.holds_parent_while_training(self.parent_spec)

    def candidate(self, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        return self.engines.candidate(
            replace(spec, version_id=-1, name=f"candidate of round {self.round_id}")
        )


async def execute_round(
    round_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    engines: RoundEngines,
    send_shard: Callable[[int, int], None] | None = None,
) -> str:
    """Run a queued round to a final state and return it; every failure ends the round as `failed`.

    With `send_shard(round_id, shard)` (a Celery worker's) and `EVOQ_VOTING_SHARDS` > 0, the votes are
    split into shards for the `voting` queue (`trainer.shards`).

    Only a database that stops answering can leave a round unfinished; it is then failed by
    `reap_stale_rounds` once its heartbeat is stale.
    """

    def end(state: str, error: str) -> None:
        with sessions() as session:
            finish(session, round_id, state, error=error)

    try:
        return await _execute(round_id, settings, sessions, engines, send_shard)
    except RoundCancelled as error:
        await asyncio.to_thread(end, "cancelled", str(error))
        return "cancelled"
    except Exception as error:
        log.exception("round %s failed", round_id)
        await asyncio.to_thread(end, "failed", f"{type(error).__name__}: {error}")
        return "failed"
    finally:
        await engines.discard()


@contextmanager
def _pool_snapshot(store: ImageStore, hashes: list[str], snapshot: Path) -> Iterator[list[Path]]:
    """The pool's files for the round's lifetime: hard links into a local store (a copy across file
    systems), downloads from a remote one. Deleting an image (on request or by retention) then never
    pulls a file from under the voting or the training, and every worker host reads from one store."""
    snapshot.mkdir(parents=True, exist_ok=True)

    def fetch(sha256: str) -> Path | None:
        target = snapshot / store.key_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.copy_to(sha256, target)
        except FileNotFoundError:  # deleted before the round started
            return None
        return target

    try:
        # Several at once: from an object store each file is a round trip; a local store's links are
        # cheap either way.
        with ThreadPoolExecutor(SNAPSHOT_THREADS) as pool:
            copied = [path for path in pool.map(fetch, hashes) if path is not None]
        yield copied
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def _store_labels(
    session: Session, round_id: int, result: RoundResult, ids: dict[str, int]
) -> tuple[int, int]:
    """The round's voted pairs between logged images, as `pseudo_labels` rows (train and hold-out);
    returns (stored, dropped because an image was deleted while the round ran).

    Same-reference pairs are skipped: each holds a synthetic variant, which is no client image and has
    no `images` row to refer to. They stay in the version's `pseudo_labels.json` with every other pair.
    """
    rows = [row for row in result.labels if row["kind"] == "random"]
    wanted = {ids[row[key]] for row in rows for key in ("image_i", "image_j")}
    alive = set(session.scalars(select(Image.id).where(Image.id.in_(wanted)))) if wanted else set()
    kept = [row for row in rows if ids[row["image_i"]] in alive and ids[row["image_j"]] in alive]
    for row in kept:
        session.add(
            PseudoLabel(
                round_id=round_id,
                image_a_id=ids[row["image_i"]],
                image_b_id=ids[row["image_j"]],
                votes_a=row["votes_i"],
                votes_b=row["votes_j"],
                invalid_votes=row["invalid"],
                p_star=row["p_star"],
                holdout=row["split"] == "holdout",
            )
        )
    return len(kept), len(rows) - len(kept)


async def _execute(
    round_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    engines: RoundEngines,
    send_shard: Callable[[int, int], None] | None,
) -> str:
    started = time.perf_counter()
    start = await asyncio.to_thread(_begin, settings, sessions, round_id)
    config = round_config(settings, start.overrides)
    store = service_store(settings)
    snapshot = Path(settings.checkpoints_dir or "") / f".pool-of-round-{round_id}"
    with _Tracker(sessions, round_id) as tracker, _pool_snapshot(store, start.hashes, snapshot) as paths:
        pool = await asyncio.to_thread(load_pool, snapshot, config.max_pixels, paths)
        result = await run_round(
            start.parent.path,
            pool,
            Path(settings.checkpoints_dir or ""),
            config,
            engines=_ForRound(engines, start.parent, round_id),
            progress=tracker,
            voter=ShardedVoter(settings, sessions, round_id, start.parent, send_shard)
            if send_shard is not None and settings.voting_shards
            else None,
        )
        verdict = await _judge(settings, start.parent, result)
        if tracker.cancelled.is_set():
            raise RoundCancelled(f"round {round_id} was cancelled")

    metrics = result.manifest["metrics"]
    fields = {"metrics": metrics, "gate": verdict.to_dict()}

    def register() -> ModelSpec | None:
        with sessions() as session:
            _, dropped = _store_labels(session, round_id, result, start.image_ids)
            if dropped:  # the audit says so; the version's pseudo_labels.json still lists every pair by hash
                fields["metrics"] = {**metrics, "pairs_of_deleted_images": dropped}
            version = registry.register_version(
                session,
                name=result.model.name,
                kind=result.model.kind,
                path=result.model.path,
                base_path=result.model.adapter_base,
                parent_id=start.parent.version_id,
                untrained=start.parent.untrained,
                metrics=metrics,
                manifest=result.manifest,
            )
            session.commit()
            fields["result_version_id"] = version.id
            fields["timings"] = {**result.manifest["timings"], "round_s": time.perf_counter() - started}
            if not verdict.passed:
                finish(session, round_id, "rejected", error="; ".join(verdict.reasons), **fields)
                return None
            advance(session, round_id, "swapping")
            return registry.to_spec(version)

    candidate = await asyncio.to_thread(register)
    if candidate is None:
        return "rejected"
    try:
        await engines.promote(candidate)
    except Exception as error:
        log.exception("round %s: the new checkpoint would not serve", round_id)
        message = f"swap refused: {error}"

        def refuse() -> None:
            with sessions() as session:
                session.get_one(ModelVersion, candidate.version_id).status = "failed"
                finish(session, round_id, "failed", error=message, **fields)

        await asyncio.to_thread(refuse)
        return "failed"

    def succeed() -> None:
        with sessions() as session:
            fields["timings"]["round_s"] = time.perf_counter() - started
            finish(session, round_id, "succeeded", **fields)

    await asyncio.to_thread(succeed)
    return "succeeded"


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
        device=settings.train_device or settings.device,
        max_pixels=settings.model_max_pixels,
    )
    return float(result.correlations["srcc"])


async def _judge(settings: Settings, parent: ModelSpec, result: RoundResult) -> GateVerdict:
    """The gate on the round's before/after metrics (and the validation CSV when configured)."""
    metrics = result.manifest["metrics"]
    active_metrics = gate_inputs(metrics["before"])
    candidate_metrics = gate_inputs(metrics["after"])
    if settings.validation_csv is not None:
        active_metrics["srcc"] = await asyncio.to_thread(_validation_srcc, settings, parent.path)
        candidate_metrics["srcc"] = await asyncio.to_thread(_validation_srcc, settings, str(result.path))
    thresholds = GateThresholds(
        min_agreement_gain=settings.gate_min_agreement_gain,
        agreement_z=settings.gate_agreement_z,
        max_parse_failure=settings.gate_max_parse_failure,
        min_spread=settings.gate_min_spread,
        min_spread_ratio=settings.gate_min_spread_ratio,
    )
    return judge(active_metrics, candidate_metrics, thresholds)


async def run_round_in_process(service: Any, round_id: int) -> str:
    """The embedded runner: the serving engine votes, and the candidate is swapped in place."""
    return await execute_round(round_id, service.settings, service.sessions, InProcessEngines(service))
