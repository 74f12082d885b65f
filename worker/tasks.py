"""Celery tasks: run a round (training queue), vote one of its shards (voting queue) and the schedule
tick (maintenance queue, from beat). The round itself is `trainer.lifecycle` (its shards
`trainer.shards`); this is only its Celery wiring."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from functools import cache

from sqlalchemy.orm import Session, sessionmaker

from iqa.db import make_engine, make_sessionmaker
from iqa.engines.base import Engine, ModelSpec
from iqa.retention import purge_expired
from iqa.settings import Settings, get_settings
from iqa.store import service_store
from trainer.lifecycle import WorkerEngines, execute_round, start_scheduled_round, worker_name
from trainer.shards import vote_shard as vote_one_shard
from worker.celery_app import EVOLVE_TASK, VOTE_SHARD_TASK, celery_app

log = logging.getLogger(__name__)


@cache
def _sessions() -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(get_settings().database_url or ""))


@celery_app.task(name=EVOLVE_TASK, acks_late=False)
def evolve_round(round_id: int) -> str:
    """Run one queued round to its final state (stored in the database) and return that state."""
    settings = get_settings()
    engines = WorkerEngines(settings, _sessions())
    return asyncio.run(execute_round(round_id, settings, _sessions(), engines, send_shard))


def send_shard(round_id: int, shard: int) -> None:
    """Queue one voting shard of a round (`EVOQ_VOTING_SHARDS`)."""
    vote_shard.apply_async(args=[round_id, shard])


@celery_app.task(name=VOTE_SHARD_TASK, acks_late=False)
def vote_shard(round_id: int, shard: int) -> str:
    """Vote one shard of a round's pairs with the round's parent model; returns what became of it."""

    def engine_for(settings: Settings, spec: ModelSpec) -> AbstractAsyncContextManager[Engine]:
        return WorkerEngines(settings, _sessions()).parent(spec)

    return asyncio.run(
        vote_one_shard(get_settings(), _sessions(), round_id, shard, worker_name(), engine_for)
    )


@celery_app.task(name="worker.tasks.retention_tick")
def retention_tick() -> int:
    """Delete the images older than `EVOQ_RETENTION_DAYS` (none when it is unset); returns how many."""
    settings = get_settings()
    if settings.retention_days is None:
        return 0
    with _sessions()() as session:
        removed = purge_expired(
            session,
            service_store(settings),
            timedelta(days=settings.retention_days),
        )
    if removed:
        log.info("retention: %d images deleted", len(removed))
    return len(removed)


@celery_app.task(name="worker.tasks.schedule_tick")
def schedule_tick() -> int | None:
    """Start a round when the schedule says one is due; returns its id."""
    with _sessions()() as session:
        round_ = start_scheduled_round(session, get_settings())
    if round_ is None:
        return None
    log.info("scheduled round %s queued", round_.id)
    evolve_round.apply_async(args=[round_.id])
    return round_.id
