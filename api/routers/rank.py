"""POST /v1/rank: a set of images in quality order, from pairwise votes and a Bradley-Terry fit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import WithJsonSchema

from api.auth import ClientKey, RateLimitDep
from api.deps import ServiceDep
from api.errors import error_answers
from api.routers.score import check_count, check_keep, read_upload
from iqa.protocol import ModelVersionOut, RankItem, RankPair, RankResponse
from iqa.ranking import interval
from iqa.service import MAX_RANK_IMAGES, MIN_RANK_IMAGES

router = APIRouter(prefix="/v1", tags=["rank"], dependencies=[RateLimitDep])

MAX_RANK_VOTES = 4096


@router.post(
    "/rank",
    response_model=RankResponse,
    responses=error_answers(400, 401, 413, 415, 422, 429, 503),
    summary="Rank 2 to 64 images by quality (pairwise votes, Bradley-Terry fit, 95% intervals)",
)
async def rank(
    service: ServiceDep,
    api_key_id: ClientKey,
    images: Annotated[
        list[UploadFile],
        File(description=f"{MIN_RANK_IMAGES} to {MAX_RANK_IMAGES} distinct image files; repeat the field."),
        WithJsonSchema(
            {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": MIN_RANK_IMAGES,
                "maxItems": MAX_RANK_IMAGES,
            }
        ),
    ],
    votes: Annotated[
        int | None,
        Form(
            description="Total vote budget: two votes on each pair of a connected first design, the rest "
            "on the least certain neighbours; default EVOQ_COMPARE_VOTES per image."
        ),
        WithJsonSchema({"type": "integer", "minimum": 2, "maximum": MAX_RANK_VOTES}),
    ] = None,
    seed: Annotated[int | None, Form(description="Seed of the first design (default 0).")] = None,
    keep: Annotated[
        bool,
        Form(
            description="false: rank without storing or logging anything (where EVOQ_ALLOW_UNKEPT_REQUESTS)."
        ),
    ] = True,
) -> RankResponse:
    check_keep(keep, service.settings.allow_unkept_requests)
    check_count("votes", votes, 2, MAX_RANK_VOTES)
    check_count("images", len(images), MIN_RANK_IMAGES, MAX_RANK_IMAGES)
    uploads = [await read_upload(f, "images") for f in images]
    ranked = await service.rank(uploads, votes, api_key_id, keep, seed)
    fit, tallies = ranked.plan.fit, ranked.plan.tallies.values()
    assert fit is not None  # the plan always fits once
    wins = [0] * len(uploads)
    losses = [0] * len(uploads)
    for t in tallies:
        wins[t.i] += t.wins_i
        wins[t.j] += t.wins_j
        losses[t.i] += t.wins_j
        losses[t.j] += t.wins_i
    results = []
    for position, k in enumerate(fit.order(), start=1):
        low, high = interval(fit, k)
        results.append(
            RankItem(
                rank=position,
                index=k,
                sha256=ranked.images[k].sha256,
                score=fit.scores[k],
                ci_low=low,
                ci_high=high,
                wins=wins[k],
                losses=losses[k],
            )
        )
    pairs = [
        RankPair(
            a=t.i,
            b=t.j,
            votes_a=t.wins_i,
            votes_b=t.wins_j,
            invalid_votes=t.invalid,
            comparison_ids=ranked.comparison_ids.get((t.i, t.j), []),
        )
        for t in sorted(tallies, key=lambda t: (t.i, t.j))
    ]
    return RankResponse(
        results=results,
        pairs=pairs,
        votes=ranked.plan.votes,
        model_version=ModelVersionOut.of(ranked.model),
    )
