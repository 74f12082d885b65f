"""Stored images and their predictions."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from api.auth import ClientKeyDep, RateLimitDep
from api.deps import ServiceDep
from api.errors import error_answers
from iqa import records
from iqa.protocol import ImageOut, PredictionOut

router = APIRouter(prefix="/v1", tags=["images"], dependencies=[ClientKeyDep, RateLimitDep])

Sha256 = Annotated[
    str, Path(pattern="^[0-9a-f]{64}$", description="SHA-256 of the image bytes, lower-case hex.")
]


@router.get(
    "/images/{sha256}",
    response_model=ImageOut,
    responses=error_answers(401, 404, 422, 429, 503),
    summary="An image's metadata and recent predictions",
)
async def get_image(sha256: Sha256, service: ServiceDep) -> ImageOut:
    def load() -> ImageOut | None:
        with service.sessions() as session:
            found = records.image_with_predictions(session, sha256)
            if found is None:
                return None
            image, predictions = found
            return ImageOut(
                sha256=image.sha256,
                width=image.width,
                height=image.height,
                format=image.format,
                byte_size=image.byte_size,
                first_seen_at=image.first_seen_at,
                last_seen_at=image.last_seen_at,
                times_seen=image.times_seen,
                source=image.source,
                predictions=[
                    PredictionOut(
                        id=p.id,
                        score=p.score,
                        std=p.score_std,
                        valid_samples=p.valid_samples,
                        samples=p.samples,
                        model_version_id=p.model_version_id,
                        created_at=p.created_at,
                    )
                    for p in predictions
                ],
            )

    image = await asyncio.to_thread(load)
    if image is None:
        raise HTTPException(404, f"no image with sha256 {sha256}")
    return image
