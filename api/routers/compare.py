"""POST /v1/compare: which of two images has the better perceptual quality."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from api.auth import ClientKey, RateLimitDep
from api.deps import ServiceDep
from api.errors import error_answers
from api.routers.score import MODE_HELP, OPTIONAL_VOTES, check_count, check_keep, read_upload
from iqa.protocol import CompareResponse, ModelVersionOut, ScoreMode, reasoning_texts

router = APIRouter(prefix="/v1", tags=["compare"], dependencies=[RateLimitDep])


@router.post(
    "/compare",
    response_model=CompareResponse,
    responses=error_answers(400, 401, 413, 415, 422, 429, 503),
    summary="Compare the quality of two images",
)
async def compare(
    service: ServiceDep,
    api_key_id: ClientKey,
    image_a: Annotated[UploadFile, File(description="The first image.")],
    image_b: Annotated[UploadFile, File(description="The second image.")],
    votes: Annotated[
        int | None,
        Form(description="Votes to draw (half with each image first); default EVOQ_COMPARE_VOTES."),
        OPTIONAL_VOTES,
    ] = None,
    return_reasoning: Annotated[bool, Form(description="Include each vote's reasoning text.")] = False,
    mode: Annotated[ScoreMode, Form(description=MODE_HELP)] = "sampled",
    keep: Annotated[
        bool,
        Form(
            description="false: score without storing or logging anything (where EVOQ_ALLOW_UNKEPT_REQUESTS)."
        ),
    ] = True,
) -> CompareResponse:
    check_count("votes", votes, 2, service.settings.max_samples)
    check_keep(keep, service.settings.allow_unkept_requests)
    upload_a = await read_upload(image_a, "image_a")
    upload_b = await read_upload(image_b, "image_b")
    result = await service.compare(upload_a, upload_b, votes, api_key_id, keep, mode)
    return CompareResponse(
        sha256_a=result.sha256_a,
        sha256_b=result.sha256_b,
        prob_a_better=result.prob_a_better,
        winner=result.winner,
        votes_a=result.votes_a,
        votes_b=result.votes_b,
        invalid_votes=result.invalid,
        votes=result.votes_a + result.votes_b + result.invalid,
        comparison_id=result.comparison_id,
        model_version=ModelVersionOut.of(result.model),
        reasoning=reasoning_texts(result.completions) if return_reasoning else None,
        mode=result.mode,
    )
