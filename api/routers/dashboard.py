"""The dashboard: one page at /dashboard, its data at /admin/dashboard (admin token), charts by Plotly
served from the installed `plotly` package (no CDN: the page works offline).

The page is a shell with no data in it; it asks for the admin token once (kept in the browser's
localStorage) and sends it as a bearer token, as any admin client does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy import select

from api.auth import AdminDep
from api.deps import ServiceDep, SettingsDep
from api.errors import error_answers
from iqa import registry
from iqa.models import EvolutionRound, ModelVersion, Prediction, PseudoLabel
from iqa.protocol import RoundOut, VersionOut

PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"
RECENT_PREDICTIONS = 2000  # score distributions use the newest predictions
MARGIN_BINS = 10


def plotly_js() -> Path:
    """plotly.min.js as the installed `plotly` package ships it."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def admin_enabled(settings: SettingsDep) -> None:
    """The page exists only where the admin API does."""
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise HTTPException(404, "the dashboard is off with the admin API: set EVOQ_ADMIN_TOKEN to enable it")


page_router = APIRouter(include_in_schema=False, dependencies=[Depends(admin_enabled)])
data_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@page_router.get("/dashboard")
async def dashboard() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@page_router.get("/dashboard/plotly.min.js")
async def plotly_script() -> FileResponse:
    return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


def _round_view(row: EvolutionRound, version: ModelVersion | None, margins: list[int]) -> dict[str, Any]:
    metrics = row.metrics or {}
    training = (version.manifest or {}).get("training", {}) if version is not None else {}
    return {
        **RoundOut.of(row).model_dump(mode="json"),
        # As the gate judged it (soft agreement where the round measured it).
        "agreement": {
            side: ((row.gate or {}).get("checks", {}).get("agreement") or {}).get(key)
            for side, key in (("before", "active"), ("after", "candidate"))
        },
        "parse_failure": {k: (metrics.get(k) or {}).get("parse_failure_rate") for k in ("before", "after")},
        "per_step": [
            {"step": s.get("step"), "reward": s.get("reward"), "kl": s.get("kl")}
            for s in training.get("per_step", [])
        ],
        "margins": margins,
    }


def dashboard_data(sessions: Any, active_id: int) -> dict[str, Any]:
    """Everything the page draws, in one read."""
    with sessions() as session:
        versions = registry.list_versions(session)
        by_id = {v.id: v for v in versions}
        rounds = session.scalars(select(EvolutionRound).order_by(EvolutionRound.id.desc()).limit(50)).all()
        labels = session.execute(
            select(PseudoLabel.round_id, PseudoLabel.votes_a, PseudoLabel.votes_b).where(
                PseudoLabel.round_id.in_([r.id for r in rounds])
            )
        ).all()
        histograms: dict[int, list[int]] = {r.id: [0] * MARGIN_BINS for r in rounds}
        for round_id, votes_a, votes_b in labels:
            total = votes_a + votes_b
            margin = abs(votes_a - votes_b) / total if total else 0.0
            histograms[round_id][min(MARGIN_BINS - 1, int(margin * MARGIN_BINS))] += 1
        recent = session.execute(
            select(Prediction.model_version_id, Prediction.score)
            .where(Prediction.score.is_not(None))
            .order_by(Prediction.id.desc())
            .limit(RECENT_PREDICTIONS)
        ).all()
        scores: dict[str, list[float]] = {}
        for version_id, score in recent:
            name = by_id[version_id].name if version_id in by_id else str(version_id)
            scores.setdefault(name, []).append(score)
        return {
            "active_version_id": active_id,
            "versions": [VersionOut.from_row(v).model_dump(mode="json") for v in versions],
            "rounds": [
                _round_view(
                    r, by_id.get(r.result_version_id) if r.result_version_id else None, histograms[r.id]
                )
                for r in rounds
            ],
            "margin_bins": [round(k / MARGIN_BINS, 2) for k in range(MARGIN_BINS)],
            "scores": scores,
        }


@data_router.get("/dashboard", responses=error_answers(401, 404, 503), summary="What the dashboard draws")
async def dashboard_json(service: ServiceDep) -> dict[str, Any]:
    return await asyncio.to_thread(dashboard_data, service.sessions, service.engine.active.version_id)
