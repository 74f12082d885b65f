"""FastAPI app factory: settings in, a ready app out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.limits import BodySizeLimit, EngineAdmission, RateLimit
from api.observability import ObservabilityMiddleware, forget_this_process, service_registry
from api.observability import router as metrics_router
from api.routers import admin, compare, dashboard, health, images, models, rank, score
from iqa.db import make_engine, make_sessionmaker, upgrade_database
from iqa.engines import build_engine
from iqa.retention import purge_expired
from iqa.service import IQAService, register_configured_model
from iqa.settings import Settings, get_settings
from trainer.lifecycle import start_scheduled_round
from worker.dispatch import CeleryDispatcher, InProcessDispatcher, RoundDispatcher

log = logging.getLogger(__name__)

DESCRIPTION = """Perceptual image-quality assessment with a vision-language model (EvoQuality).

`POST /v1/score` rates images from 1 (very poor) to 5 (excellent); `POST /v1/compare` says which of two
images looks better, with a probability; `POST /v1/rank` orders a set of 2 to 64 images from pairwise
votes, with latent scores and 95% intervals. Every image is stored and logged; errors are always
`{"error": {"type": ..., "message": ...}}`.
"""


async def start_service(settings: Settings, migrate: bool = True) -> IQAService:
    """Migrate the database, register the configured model and start the engine."""
    if migrate:
        await asyncio.to_thread(upgrade_database, settings.database_url or "")
    db = make_engine(settings.database_url or "")
    spec = await asyncio.to_thread(register_configured_model, settings, make_sessionmaker(db))
    engine = build_engine(settings, spec)
    await engine.start()
    log.info("serving %s (version %d) with the %s engine", spec.name, spec.version_id, settings.engine)
    return IQAService(settings, engine, db)


async def follow_active_version(service: IQAService, interval_s: float) -> None:
    """Keep this process on the version the database marks active (after rounds and rollbacks)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await service.follow_active_version()
        except Exception:  # the database may be down for a while; keep serving and try again
            log.warning("could not check the active model version", exc_info=True)


def purge_old_images(service: IQAService) -> int:
    """The retention job of the embedded default: delete images older than `EVOQ_RETENTION_DAYS`."""
    with service.sessions() as session:
        return len(
            purge_expired(session, service.store, timedelta(days=service.settings.retention_days or 0))
        )


async def run_schedule(service: IQAService, dispatcher: RoundDispatcher) -> None:
    """The embedded default's beat: start a scheduled round in this process when one is due."""
    while True:
        await asyncio.sleep(service.settings.round_check_interval_s)
        try:

            def due() -> int | None:
                with service.sessions() as session:
                    round_ = start_scheduled_round(session, service.settings)
                    return round_.id if round_ else None

            round_id = await asyncio.to_thread(due)
            if round_id is not None:
                dispatcher.submit(round_id)
            removed = 0
            if service.settings.retention_days is not None:
                removed = await asyncio.to_thread(purge_old_images, service)
            if removed:
                log.info("retention: %d images deleted", removed)
        except Exception:
            log.warning("the round schedule check failed", exc_info=True)


def make_dispatcher(service: IQAService) -> RoundDispatcher:
    """Celery workers in production; this process itself on the embedded default."""
    if service.settings.rounds_backend == "celery":
        return CeleryDispatcher(service.settings)
    return InProcessDispatcher(service, asyncio.get_running_loop())


def create_app(settings: Settings | None = None, migrate: bool = True) -> FastAPI:
    """The API; the service (model, database) starts with the app's lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await start_service(settings, migrate)
        app.state.service = service
        app.state.metrics_registry = service_registry(service)
        app.state.rate_limit = (
            RateLimit(settings.rate_limit, settings.rate_limit_storage) if settings.rate_limit else None
        )
        app.state.dispatcher = make_dispatcher(service)
        background = [asyncio.create_task(follow_active_version(service, settings.active_version_poll_s))]
        if settings.rounds_backend == "inprocess":
            background.append(asyncio.create_task(run_schedule(service, app.state.dispatcher)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await service.engine.close()
            service.db.dispose()
            forget_this_process()

    app = FastAPI(title="EvoQuality Service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    routers = (score.router, compare.router, rank.router, images.router, models.router, health.router)
    routers = (*routers, admin.router)
    for router in (*routers, dashboard.page_router, dashboard.data_router, metrics_router):
        app.include_router(router)
    body_limit = settings.max_upload_bytes * settings.max_images_per_request + 64 * 1024
    app.add_middleware(BodySizeLimit, max_bytes=body_limit)
    app.add_middleware(EngineAdmission)  # sheds model requests beyond the queue bound before the body
    app.add_middleware(ObservabilityMiddleware)  # outermost: counts and times every answer, 413s too
    return app
