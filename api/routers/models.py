"""The model version that answers requests."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ServiceDep
from iqa.protocol import ModelsResponse, ModelVersionOut

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="The active model version")
async def active_model(service: ServiceDep) -> ModelsResponse:
    spec = service.engine.active
    return ModelsResponse(
        active=ModelVersionOut.of(spec),
        kind=spec.kind,
        engine=service.settings.engine,
        prompt_profile=service.settings.prompt_profile,
    )
