"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import ServiceDep
from api.errors import error_answers, error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses=error_answers(503), summary="Readiness: the database and the engine answer")
async def readyz(service: ServiceDep) -> JSONResponse:
    try:
        status = await service.readiness()
    except Exception as error:  # any failure means not ready; say which
        return error_response(503, "not_ready", f"not ready: {error}", {"Retry-After": "5"})
    return JSONResponse({"status": "ready", **status})
