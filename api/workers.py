"""`evoq serve --workers N`: several API processes on one port, for the vLLM engine.

One process spends its CPU on HTTP, multipart parsing, hashing, decoding and logging while vLLM does
the model's work elsewhere, so with a fast model the API process becomes the bottleneck. uvicorn's
workers share the listening socket; what they must not each do at start-up (migrate the schema,
register the base model) is done once here, before they start. Counters and histograms of all workers
are merged at `/metrics` through prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`,
a fresh folder per run). Everything else the workers share lives in the database and the store
already: the result cache, the active version (each worker follows it), rounds.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from fastapi import FastAPI

from iqa.settings import Settings, get_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkersRefused(ValueError):
    """The settings cannot run several API processes (the message says what to change)."""


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse set-ups where N processes would silently behave unlike one."""
    if workers <= 1:
        return
    if settings.engine != "vllm":
        raise WorkersRefused(
            f"{workers} workers need EVOQ_ENGINE=vllm: the {settings.engine} engine would load the model "
            "in every worker"
        )
    if settings.rate_limit and settings.rate_limit_storage.startswith("memory://"):
        raise WorkersRefused(
            "a rate limit counted in memory would allow each worker its own quota: set "
            "EVOQ_RATE_LIMIT_STORAGE to a redis:// URL"
        )


def prepare_workers(settings: Settings) -> None:
    """Migrate the database and register the configured model once, so workers never race on them."""
    from iqa.db import make_engine, make_sessionmaker, upgrade_database
    from iqa.service import register_configured_model

    url = settings.database_url or ""
    upgrade_database(url)
    db = make_engine(url)
    try:
        register_configured_model(settings, make_sessionmaker(db))
    finally:
        db.dispose()


def create_worker_app() -> FastAPI:
    """The app of one worker (uvicorn imports it by name in each process): migrated already."""
    from api.app import create_app

    return create_app(migrate=False)


def serve_workers(workers: int, *, host: str, port: int, log_level: str, log_json: bool) -> None:
    """Check, prepare, then run `workers` uvicorn processes until stopped."""
    import uvicorn

    from api.observability import log_config

    settings = get_settings()
    check_workers(settings, workers)
    prepare_workers(settings)
    metrics_dir = tempfile.mkdtemp(prefix="evoq-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when each worker imports it
    try:
        uvicorn.run(
            "api.workers:create_worker_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level=log_level,
            log_config=log_config(log_level, log_json),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
