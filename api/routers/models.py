"""The model version that answers requests."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import ClientKeyDep, RateLimitDep
from api.deps import ServiceDep
from api.errors import error_answers
from iqa.protocol import ModelsResponse, ModelVersionOut

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[ClientKeyDep, RateLimitDep])


@router.get(
    "/models",
    response_model=ModelsResponse,
    responses=error_answers(401, 429, 503),
    summary="The active model version",
)
async def active_model(service: ServiceDep) -> ModelsResponse:
    spec = service.engine.active
    return ModelsResponse(
        active=ModelVersionOut.of(spec),
        kind=spec.kind,
        engine=service.settings.engine,
        prompt_profile=service.settings.prompt_profile,
    )
