"""POST /v1/score: perceptual quality scores for one or more images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from pydantic import WithJsonSchema

from api.auth import ClientKey, RateLimitDep
from api.deps import ServiceDep
from api.errors import error_answers
from iqa.protocol import ModelVersionOut, ScoreItem, ScoreMode, ScoreResponse, reasoning_texts
from iqa.service import Upload

router = APIRouter(prefix="/v1", tags=["score"], dependencies=[RateLimitDep])


async def read_upload(file: UploadFile, field: str) -> Upload:
    """The bytes and declared type of one multipart file."""
    return Upload(await file.read(), file.filename, file.content_type, field)


# An optional form count is left out or sent as an integer; "null" is not one (documented as parsed). The
# upper bound is a setting (EVOQ_MAX_SAMPLES), checked by `check_count`.
OPTIONAL_COUNT = WithJsonSchema({"type": "integer", "minimum": 1})
OPTIONAL_VOTES = WithJsonSchema({"type": "integer", "minimum": 2})
MODE_HELP = (
    "sampled (default): reasoning completions, averaged; fast: one deterministic pass that reads the "
    "answer's digit distribution after a think-free prefix (samples/votes unused)."
)


def check_keep(keep: bool, allowed: bool) -> None:
    """422 for keep=false where the operator does not allow it."""
    if not keep and not allowed:
        raise HTTPException(
            422, "keep: false is not allowed on this service (EVOQ_ALLOW_UNKEPT_REQUESTS is off)"
        )


def check_count(name: str, value: int | None, low: int, high: int) -> None:
    """422 for a sample or vote count outside [low, high]."""
    if value is not None and not low <= value <= high:
        raise HTTPException(422, f"{name}: must be between {low} and {high}; got {value}")


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=False,
    responses=error_answers(400, 401, 413, 415, 422, 429, 503),
    summary="Score the perceptual quality of images (1 = very poor, 5 = excellent)",
)
async def score(
    service: ServiceDep,
    api_key_id: ClientKey,
    images: Annotated[
        list[UploadFile],
        File(description="One or more image files (JPEG, PNG, WebP, BMP, TIFF, GIF); repeat the field."),
        WithJsonSchema({"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}),
    ],
    samples: Annotated[
        int | None,
        Form(description="Samples per image; default from settings (EVOQ_SCORE_SAMPLES)."),
        OPTIONAL_COUNT,
    ] = None,
    return_reasoning: Annotated[bool, Form(description="Include each sample's reasoning text.")] = False,
    mode: Annotated[ScoreMode, Form(description=MODE_HELP)] = "sampled",
    keep: Annotated[
        bool,
        Form(
            description="false: score without storing or logging anything (where EVOQ_ALLOW_UNKEPT_REQUESTS)."
        ),
    ] = True,
) -> ScoreResponse:
    settings = service.settings
    check_keep(keep, settings.allow_unkept_requests)
    check_count("samples", samples, 1, settings.max_samples)
    if len(images) > settings.max_images_per_request:
        raise HTTPException(
            422, f"images: at most {settings.max_images_per_request} per request; got {len(images)}"
        )
    uploads = [await read_upload(f, "images") for f in images]
    results = await service.score(uploads, samples, api_key_id, keep, mode)
    return ScoreResponse(
        results=[
            ScoreItem(
                sha256=r.sha256,
                score=r.score,
                std=r.std,
                valid_samples=r.valid_samples,
                samples=r.samples,
                cached=r.cached,
                prediction_id=r.prediction_id,
                model_version=ModelVersionOut.of(r.model),
                reasoning=reasoning_texts(r.completions) if return_reasoning else None,
                mode=r.mode,
                distribution=r.distribution,
            )
            for r in results
        ]
    )
