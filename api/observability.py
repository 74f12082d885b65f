"""What an operator sees: Prometheus metrics at `/metrics`, a request id on every answer and log line.

- HTTP: requests by route template, method and status, and latency histograms by route, measured by a
  plain ASGI middleware (streaming bodies untouched).
- The service's own counters (`iqa.metrics`): samples generated, parse failures, cache hits, local
  engine batch sizes.
- Read at scrape time: the engine's queue depth, and from the database, which several processes share,
  images stored, rounds by state, gate verdicts, the last finished round's stage durations and the
  active model version.
- Request id: the client's `X-Request-ID` (if sane) or a new one, returned in the same header and put
  on every log line written while the request runs (`request_id` in JSON logs).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iqa.models import EvolutionRound, Image, ModelVersion

REQUEST_ID = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

HTTP_REQUESTS = Counter(
    "evoq_http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_LATENCY = Histogram(
    "evoq_http_request_duration_seconds",
    "Time from request to the end of the answer, by route template.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text: this process's counters, then the gauges read now (off the event loop)."""
    import asyncio

    shared: CollectorRegistry = request.app.state.metrics_registry
    body = await asyncio.to_thread(lambda: generate_latest(process_counters()) + generate_latest(shared))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def process_counters() -> CollectorRegistry:
    """This process's counters, or, under `evoq serve --workers N` (prometheus_client's multiprocess
    mode), all workers' counters merged: a scrape reaches one worker but must count them all."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


def forget_this_process() -> None:
    """At a worker's exit: drop its live gauges from the merged metrics (counters keep counting)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def service_registry(service: Any) -> CollectorRegistry:
    """A registry of this app's scrape-time gauges (one per app: several apps may share a process)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(service))
    return registry


class ObservabilityMiddleware:
    """Counts and times every HTTP request and gives it a request id (header and log lines)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(template, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(template).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)


class ServiceCollector(Collector):
    """Gauges read when Prometheus scrapes: engine queue depth, and the shared state in the database."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "evoq_engine_queue_depth", "Requests waiting for the model.", labels=["queue"]
        )
        queue_depth = getattr(self.service.engine, "queue_depth", None)
        for name, value in (queue_depth() if queue_depth else {}).items():
            depth.add_metric([name], value)
        yield depth
        try:
            yield from self._from_database()
        except Exception:  # a database outage must not break the scrape of the other metrics
            logging.getLogger(__name__).warning("metrics: the database is not answering", exc_info=True)

    def _from_database(self) -> Iterator[GaugeMetricFamily]:
        with self.service.sessions() as session:
            images = session.scalar(select(func.count(Image.id))) or 0
            by_state = dict(
                session.execute(
                    select(EvolutionRound.state, func.count()).group_by(EvolutionRound.state)
                ).all()
            )
            active = session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).first()
            last = session.scalars(
                select(EvolutionRound)
                .where(EvolutionRound.finished_at.is_not(None))
                .order_by(EvolutionRound.id.desc())
                .limit(1)
            ).first()
            last_timings = dict(last.timings or {}) if last else {}
            last_id = last.id if last else None
        yield GaugeMetricFamily(
            "evoq_images_stored", "Distinct images in the store and the database.", images
        )
        rounds = GaugeMetricFamily("evoq_rounds", "Evolution rounds by state.", labels=["state"])
        for state in ("queued", "voting", "training", "evaluating", "swapping", "succeeded", "rejected",
                      "failed", "cancelled"):  # fmt: skip
            rounds.add_metric([state], by_state.get(state, 0))
        yield rounds
        verdicts = GaugeMetricFamily(
            "evoq_gate_verdicts", "Rounds the gate judged, by verdict.", labels=["verdict"]
        )
        verdicts.add_metric(["passed"], by_state.get("succeeded", 0))
        verdicts.add_metric(["refused"], by_state.get("rejected", 0))
        yield verdicts
        stages = GaugeMetricFamily(
            "evoq_last_round_stage_seconds", "Seconds per stage of the last finished round.", labels=["stage"]
        )
        for stage, seconds in last_timings.items():
            if isinstance(seconds, int | float):
                stages.add_metric([stage.removesuffix("_s")], float(seconds))
        yield stages
        yield GaugeMetricFamily("evoq_last_round_id", "Id of the last finished round.", last_id or 0)
        version = GaugeMetricFamily(
            "evoq_active_model_version", "The active model version (value: its id).", labels=["name"]
        )
        if active is not None:
            version.add_metric([active.name], active.id)
        yield version


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_config(level: str = "info", json_lines: bool = False) -> dict[str, Any]:
    """uvicorn's `log_config`: the app's loggers (`iqa`, `api`, `trainer`, `worker`) and uvicorn's,
    on stderr, with the request id; JSON lines as an option."""
    formatter = (
        {"()": JsonFormatter}
        if json_lines
        else {"format": "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    level = level.upper()
    loggers = {name: {"handlers": ["default"], "level": level, "propagate": False}
               for name in ("iqa", "api", "trainer", "worker", "uvicorn", "uvicorn.access")}  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": loggers,
    }
