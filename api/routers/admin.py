"""Admin API: start, watch and cancel evolution rounds; list model versions and roll back or forward."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.auth import AdminDep
from api.deps import ServiceDep
from api.errors import error_answers
from api.routers.images import Sha256
from iqa import keys, registry, retention
from iqa.engines.base import EngineUnavailable
from iqa.models import ApiKey, EvolutionRound, ModelVersion
from iqa.protocol import RoundOut, VersionOut
from trainer import lifecycle
from trainer.config import RoundOverrides
from worker.dispatch import DispatchUnavailable

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=error_answers(401, 404, 503)
)
# Database ids: 32-bit in PostgreSQL; a larger one is a 422, never a database error.
RoundId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="Round id.")]
VersionId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="Model version id.")]
KeyId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="API key id.")]


@router.post(
    "/evolutions",
    status_code=202,
    response_model=RoundOut,
    responses=error_answers(400, 409, 422),
    summary="Start an evolution round",
)
async def start_round(
    request: Request,
    service: ServiceDep,
    overrides: Annotated[RoundOverrides | None, Body()] = None,
) -> RoundOut:
    dispatcher = request.app.state.dispatcher

    def create() -> EvolutionRound:
        with service.sessions() as session:
            lifecycle.reap_stale_rounds(session, service.round_stale_after)
            return lifecycle.create_round(
                session, "manual", overrides or RoundOverrides(), service.engine.active.version_id
            )

    try:
        await asyncio.to_thread(dispatcher.check)
        row = await asyncio.to_thread(create)
    except lifecycle.RoundConflict as error:
        raise HTTPException(409, str(error)) from error
    except DispatchUnavailable as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "10"}) from error
    try:
        await asyncio.to_thread(dispatcher.submit, row.id)
    except DispatchUnavailable as error:
        message = f"could not be queued: {error}"

        def fail() -> None:
            with service.sessions() as session:
                lifecycle.finish(session, row.id, "failed", error=message)

        await asyncio.to_thread(fail)
        raise HTTPException(503, str(error), headers={"Retry-After": "10"}) from error
    return RoundOut.of(row)


@router.get(
    "/evolutions", response_model=list[RoundOut], responses=error_answers(422), summary="Rounds, newest first"
)
async def list_rounds(
    service: ServiceDep, limit: Annotated[int, Query(ge=1, le=500, description="Most rounds returned.")] = 50
) -> list[RoundOut]:
    def load() -> list[RoundOut]:
        with service.sessions() as session:
            rows = session.scalars(
                select(EvolutionRound).order_by(EvolutionRound.id.desc()).limit(limit)
            ).all()
            return [RoundOut.of(r) for r in rows]

    return await asyncio.to_thread(load)


def _round_or_404(service, round_id: int) -> EvolutionRound:
    with service.sessions() as session:
        row = session.get(EvolutionRound, round_id)
        if row is None:
            raise HTTPException(404, f"no evolution round {round_id}")
        return row


@router.get(
    "/evolutions/{round_id}",
    response_model=RoundOut,
    responses=error_answers(422),
    summary="One round: state, progress, gate",
)
async def get_round(round_id: RoundId, service: ServiceDep) -> RoundOut:
    return RoundOut.of(await asyncio.to_thread(_round_or_404, service, round_id))


@router.post(
    "/evolutions/{round_id}/cancel",
    status_code=202,
    response_model=RoundOut,
    responses=error_answers(422),
    summary="Cancel a round",
)
async def cancel_round(round_id: RoundId, service: ServiceDep) -> RoundOut:
    def cancel() -> EvolutionRound:
        _round_or_404(service, round_id)
        with service.sessions() as session:
            return lifecycle.request_cancel(session, round_id)

    return RoundOut.of(await asyncio.to_thread(cancel))


@router.get("/models", response_model=list[VersionOut], summary="Model versions, newest first")
async def list_models(service: ServiceDep) -> list[VersionOut]:
    def load() -> list[VersionOut]:
        with service.sessions() as session:
            return [VersionOut.from_row(v) for v in registry.list_versions(session)]

    return await asyncio.to_thread(load)


@router.post(
    "/models/{version_id}/activate",
    response_model=VersionOut,
    responses=error_answers(409, 422),
    summary="Roll back or forward",
)
async def activate_model(version_id: VersionId, service: ServiceDep) -> VersionOut:
    """Load the version in this process first; only a version that loads is marked active for all."""

    def load() -> ModelVersion:
        with service.sessions() as session:
            row = session.get(ModelVersion, version_id)
            if row is None:
                raise HTTPException(404, f"no model version {version_id}")
            return row

    row = await asyncio.to_thread(load)
    try:
        await service.activate_version(registry.to_spec(row))
    except EngineUnavailable:
        raise
    except Exception as error:
        raise HTTPException(409, f"version {row.name} cannot be loaded: {error}") from error
    return VersionOut.from_row(await asyncio.to_thread(load))


class KeyRequest(BaseModel):
    """A new client API key."""

    model_config = {"extra": "forbid", "strict": True}

    name: str = Field("", max_length=100, description="Whose key it is (for your records).")


class KeyCreated(BaseModel):
    """The new key: `key` is shown this once; only its hash is kept."""

    id: int
    name: str
    key: str = Field(description="Send as `Authorization: Bearer <key>` or `X-API-Key: <key>` on /v1/*.")


class KeyOut(BaseModel):
    """A client API key as stored (never the key itself)."""

    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None


@router.post(
    "/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=error_answers(400, 422),
    summary="New client key",
)
async def create_key(body: Annotated[KeyRequest | None, Body()], service: ServiceDep) -> KeyCreated:
    """From the first key on, /v1/* needs a key."""

    def create() -> KeyCreated:
        with service.sessions.begin() as session:
            row, key = keys.create_key(session, (body or KeyRequest()).name)
            created = KeyCreated(id=row.id, name=row.name, key=key)
        service.key_check.forget()
        return created

    return await asyncio.to_thread(create)


@router.get("/keys", response_model=list[KeyOut], summary="Client keys (never the keys themselves)")
async def list_keys(service: ServiceDep) -> list[KeyOut]:
    def load() -> list[KeyOut]:
        with service.sessions() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
            return [KeyOut.model_validate(r, from_attributes=True) for r in rows]

    return await asyncio.to_thread(load)


@router.delete(
    "/keys/{key_id}", response_model=KeyOut, responses=error_answers(422), summary="Revoke a client key"
)
async def revoke_key(key_id: KeyId, service: ServiceDep) -> KeyOut:
    def revoke() -> KeyOut:
        with service.sessions.begin() as session:
            row = keys.revoke_key(session, key_id)
            if row is None:
                raise HTTPException(404, f"no API key {key_id}")
            revoked = KeyOut.model_validate(row, from_attributes=True)
        service.key_check.forget()
        return revoked

    return await asyncio.to_thread(revoke)


class DeletedOut(BaseModel):
    """What went with the image."""

    sha256: str
    predictions: int = Field(description="Predictions (the image's cached results) removed.")
    comparisons: int
    pseudo_labels: int
    bytes_removed: bool = Field(description="False when the bytes were already gone.")


@router.delete(
    "/images/{sha256}", response_model=DeletedOut, responses=error_answers(422), summary="Delete an image"
)
async def delete_image(sha256: Sha256, service: ServiceDep) -> DeletedOut:
    """The bytes, every row that names the image, its cached results; a running round is not disturbed."""

    def remove() -> DeletedOut:
        with service.sessions() as session:
            deleted = retention.delete_image(session, service.store, sha256)
        if deleted is None:
            raise HTTPException(404, f"no image with sha256 {sha256}")
        return DeletedOut(**asdict(deleted))

    return await asyncio.to_thread(remove)
