"""The protocol: the API's response models, which the Python client (`evoq.client`) parses too.

Every field is described, so the OpenAPI page documents the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from iqa.engines.base import ModelSpec
from iqa.models import EvolutionRound, ModelVersion
from iqa.prompts import reasoning_of


class ErrorDetail(BaseModel):
    """What went wrong."""

    type: str = Field(
        description="Machine-readable kind, e.g. `invalid_request`, `too_large`, `unavailable`."
    )
    message: str = Field(description="What was wrong and how to fix it, for a person.")


class ErrorResponse(BaseModel):
    """Every error answer of the API has this shape."""

    error: ErrorDetail


class ModelVersionOut(BaseModel):
    """The model version that produced an answer."""

    id: int = Field(description="Model version id (database row).")
    name: str = Field(description="Version name; `demo (untrained)` for the built-in random demo model.")
    untrained: bool = Field(description="True when the scores come from an untrained model and mean nothing.")

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelVersionOut:
        return cls(id=spec.version_id, name=spec.name, untrained=spec.untrained)


ScoreMode = Literal["sampled", "fast"]


class ScoreItem(BaseModel):
    """The score of one uploaded image."""

    sha256: str = Field(description="SHA-256 of the uploaded bytes; the image's id in this service.")
    score: float | None = Field(
        description="In [1, 5]. sampled: mean of the valid samples, null when none parsed; fast: the "
        "expected score of the answer-digit distribution."
    )
    std: float | None = Field(
        description="Standard deviation of the valid sampled scores (fast: of the read distribution)."
    )
    valid_samples: int = Field(description="Samples whose answer parsed as a score (0 for fast).")
    samples: int = Field(description="Samples drawn (0 for fast: nothing is sampled).")
    mode: ScoreMode = Field("sampled", description="How the score was made: `sampled` or `fast`.")
    distribution: dict[str, float] | None = Field(
        None, description="fast: probability of each first answer digit, `1`..`5`; null for sampled."
    )
    cached: bool = Field(description="True when answered from an earlier identical request.")
    prediction_id: int | None = Field(description="Id of the logged prediction row; null when not kept.")
    model_version: ModelVersionOut = Field(description="The model version that produced this score.")
    reasoning: list[str] | None = Field(
        None, description="The thinking text of each sample, when `return_reasoning` was set."
    )


class ScoreResponse(BaseModel):
    """Scores for every image of the request, in request order."""

    results: list[ScoreItem] = Field(description="One result per uploaded image, in request order.")


class CompareResponse(BaseModel):
    """Which of two images looks better, by majority of votes with the order randomised."""

    sha256_a: str = Field(description="SHA-256 of image_a.")
    sha256_b: str = Field(description="SHA-256 of image_b.")
    prob_a_better: float | None = Field(
        description="Share of valid votes for image_a; null when no vote was valid."
    )
    winner: str | None = Field(description="`a`, `b`, or null for a tie.")
    votes_a: int = Field(description="Votes for image_a.")
    votes_b: int = Field(description="Votes for image_b.")
    invalid_votes: int = Field(description="Votes whose answer was not 0 or 1.")
    votes: int = Field(description="Votes drawn (half with each image shown first); 0 for fast.")
    mode: ScoreMode = Field(
        "sampled",
        description="`sampled` votes, or `fast`: one reading of the vote digit in each order, averaged.",
    )
    comparison_id: int | None = Field(description="Id of the logged comparison row; null when not kept.")
    model_version: ModelVersionOut = Field(description="The model version that cast the votes.")
    reasoning: list[str] | None = Field(None, description="The thinking text of each vote, on request.")


class RankItem(BaseModel):
    """One image of a ranked set, in rank order."""

    rank: int = Field(description="1 = best.")
    index: int = Field(description="Position of the image in the request's `images`.")
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")
    score: float = Field(description="Bradley-Terry latent score (log-odds scale; differences matter).")
    ci_low: float = Field(description="Lower end of the score's 95% interval (Laplace approximation).")
    ci_high: float = Field(description="Upper end of the score's 95% interval.")
    wins: int = Field(description="Votes this image won.")
    losses: int = Field(description="Votes this image lost.")


class RankPair(BaseModel):
    """The votes between two images of the set (indices into `images`)."""

    a: int = Field(description="Index of the first image.")
    b: int = Field(description="Index of the second image.")
    votes_a: int = Field(description="Votes for image a.")
    votes_b: int = Field(description="Votes for image b.")
    invalid_votes: int = Field(description="Votes whose answer was not 0 or 1.")
    comparison_ids: list[int] = Field(description="The logged comparison rows (empty when not kept).")


class RankResponse(BaseModel):
    """The set in rank order, with latent scores, intervals, and the votes they came from."""

    results: list[RankItem] = Field(description="Every image once, best first.")
    pairs: list[RankPair] = Field(description="Every compared pair and its votes.")
    votes: int = Field(description="Votes cast in all.")
    model_version: ModelVersionOut = Field(description="The model version that cast the votes.")


class PredictionOut(BaseModel):
    """A logged prediction."""

    id: int
    score: float | None
    std: float | None = Field(description="Std of the valid sampled scores.")
    valid_samples: int
    samples: int
    model_version_id: int
    created_at: datetime


class ImageOut(BaseModel):
    """A stored image's metadata and its recent predictions."""

    sha256: str
    width: int
    height: int
    format: str = Field(description="Decoded file format, e.g. JPEG.")
    byte_size: int
    first_seen_at: datetime
    last_seen_at: datetime
    times_seen: int = Field(description="How many requests carried these exact bytes.")
    source: str = Field(description="The endpoint that first received the image.")
    predictions: list[PredictionOut] = Field(description="Most recent first.")


class ModelsResponse(BaseModel):
    """The version answering requests now."""

    active: ModelVersionOut
    kind: str = Field(description="base, lora or full.")
    engine: str = Field(description="`local` or `vllm`.")
    prompt_profile: str = Field(description="`evoquality` or `visualquality-r1`.")


class RoundOut(BaseModel):
    """An evolution round as stored."""

    id: int
    state: str = Field(
        description="queued, voting, training, evaluating, swapping, succeeded, rejected, "
        "failed or cancelled."
    )
    trigger: str = Field(description="manual, schedule or cli.")
    settings: dict[str, Any]
    progress: dict[str, Any] | None = Field(description="Current stage with done/total counters.")
    parent_version_id: int | None = Field(description="The version that voted and was trained on.")
    result_version_id: int | None = Field(description="The version the round produced, if any.")
    metrics: dict[str, Any] | None
    gate: dict[str, Any] | None = Field(description="The gate's verdict: passed, reasons, checks.")
    timings: dict[str, Any] | None = Field(description="Seconds per stage.")
    error: str | None
    worker: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: EvolutionRound) -> RoundOut:
        return cls.model_validate(row, from_attributes=True)


class VersionOut(ModelVersionOut):
    """A model version with its lineage and status."""

    kind: str
    path: str
    base_path: str | None
    parent_id: int | None
    status: str = Field(description="registered, active, retired or failed.")
    created_at: datetime
    activated_at: datetime | None
    metrics: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: ModelVersion) -> VersionOut:
        return cls(
            id=row.id,
            name=row.name,
            untrained=row.untrained,
            kind=row.kind,
            path=row.path,
            base_path=row.base_path,
            parent_id=row.parent_id,
            status=row.status,
            created_at=row.created_at,
            activated_at=row.activated_at,
            metrics=row.metrics,
        )


def reasoning_texts(completions: list[str]) -> list[str]:
    """The thinking of each completion, for `return_reasoning`."""
    return [reasoning_of(c) for c in completions]
