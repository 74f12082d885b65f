"""Database tables (SQLAlchemy 2 ORM). The schema itself is created by the Alembic migrations only."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

MODEL_KINDS = ("base", "lora", "full")
MODEL_STATUSES = ("registered", "active", "retired", "failed")

# Deterministic constraint names: SQLite batch migrations and PostgreSQL ALTERs can then find them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime, the only kind the database columns hold."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that stores UTC and always reads back aware UTC datetimes.

    SQLite has no time zones and returns naive values; PostgreSQL returns the session's zone. This makes
    both behave the same. Naive datetimes are refused on write, since their zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime (iqa.models.utcnow)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; its metadata is Alembic's `target_metadata`."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


class ModelVersion(Base):
    """One checkpoint the service can serve: the base model, or a LoRA/full checkpoint from a round."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(f"kind IN {MODEL_KINDS!r}", name="kind"),
        CheckConstraint(f"status IN {MODEL_STATUSES!r}", name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Folder or hub id; for a LoRA version, the adapter folder.
    path: Mapped[str] = mapped_column(String(1000))
    # For a LoRA version: the base model the adapter applies to.
    base_path: Mapped[str | None] = mapped_column(String(1000))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[str] = mapped_column(String(16), default="registered", server_default="registered")
    # True for the randomly initialised demo model: its scores mean nothing.
    untrained: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None]
    metrics: Mapped[dict[str, Any] | None]
    manifest: Mapped[dict[str, Any] | None]

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class ApiKey(Base):
    """A client's key for /v1/*: only its SHA-256 is kept (the key itself is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Image(Base):
    """An image seen by the service; its bytes live in the content-addressed store under `storage_key`."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    storage_key: Mapped[str] = mapped_column(String(200))
    width: Mapped[int]
    height: Mapped[int]
    format: Mapped[str] = mapped_column(String(16))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Indexed: rounds sample recent images, retention prunes old ones.
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    times_seen: Mapped[int] = mapped_column(default=1, server_default="1")
    # Which endpoint first brought the image in: score, compare, upload, ...
    source: Mapped[str] = mapped_column(String(32))


class Prediction(Base):
    """One scoring of one image by one model version; also the result cache for repeated requests."""

    __tablename__ = "predictions"
    # The cache lookup: latest result for (image, model version, sampling settings). Its leading column
    # also serves lookups by image alone, so image_id needs no index of its own.
    __table_args__ = (
        Index("ix_predictions_cache_lookup", "image_id", "model_version_id", "sampling_key", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))  # which client asked
    # Mean of the valid samples; None when no sample gave a parsable score.
    score: Mapped[float | None]
    score_std: Mapped[float | None]
    valid_samples: Mapped[int]
    samples: Mapped[int]
    prompt_profile: Mapped[str] = mapped_column(String(32))
    # Digest of everything that changes the output distribution (profile, samples, temperature, ...).
    sampling_key: Mapped[str] = mapped_column(String(200))
    latency_ms: Mapped[float]
    completions: Mapped[list[str]]  # empty for a one-pass reading (sampling key `...;mode=fast`)
    # A one-pass reading's P(first answer digit) for "1".."5"; None for sampled scores.
    distribution: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship()
    model_version: Mapped[ModelVersion] = relationship()


class Comparison(Base):
    """One pairwise comparison (majority vote over samples) of two images by one model version."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_a_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    image_b_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))  # which client asked
    votes_a: Mapped[int]
    votes_b: Mapped[int]
    invalid_votes: Mapped[int]
    # Share of valid votes for image A; None when no vote was valid.
    prob_a_better: Mapped[float | None]
    prompt_profile: Mapped[str] = mapped_column(String(32))
    sampling_key: Mapped[str] = mapped_column(String(200))
    latency_ms: Mapped[float]
    completions: Mapped[list[str]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image_a: Mapped[Image] = relationship(foreign_keys=[image_a_id])
    image_b: Mapped[Image] = relationship(foreign_keys=[image_b_id])
    model_version: Mapped[ModelVersion] = relationship()


ROUND_STATES = (
    "queued",
    "voting",
    "training",
    "evaluating",
    "swapping",
    "succeeded",
    "rejected",
    "failed",
    "cancelled",
)
ROUND_ACTIVE_STATES = ROUND_STATES[:5]


class EvolutionRound(Base):
    """One EvoQuality round, persisted as a state machine so any process can watch or recover it.

    `lock` is 1 while the round is queued or running and NULL once it ends; its unique constraint
    makes "one round at a time" a database guarantee that outlives a crashed worker.
    """

    __tablename__ = "evolution_rounds"
    __table_args__ = (CheckConstraint(f"state IN {ROUND_STATES!r}", name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", server_default="queued", index=True)
    lock: Mapped[int | None] = mapped_column(unique=True, default=1)
    trigger: Mapped[str] = mapped_column(String(16))  # manual, schedule, cli
    settings: Mapped[dict[str, Any]]
    progress: Mapped[dict[str, Any] | None]  # {"stage", "done", "total"}
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    metrics: Mapped[dict[str, Any] | None]
    gate: Mapped[dict[str, Any] | None]  # {"passed": bool, "reasons": [...], "checks": {...}}
    timings: Mapped[dict[str, Any] | None]  # seconds per stage
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))  # host:pid running it
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    parent_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[parent_version_id])
    result_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[result_version_id])


SHARD_STATES = ("queued", "running", "done", "cancelled")


class VoteShard(Base):
    """A share of a round's stage 1, voted by a worker on the `voting` queue (`trainer.shards`).

    `attempt` grows each time the shard is (re)claimed; a worker writes its votes only while its attempt
    is the current one, so a shard sent again after a lost heartbeat is counted once.
    """

    __tablename__ = "vote_shards"
    __table_args__ = (
        UniqueConstraint("round_id", "shard"),
        CheckConstraint(f"state IN {SHARD_STATES!r}", name="state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("evolution_rounds.id", ondelete="CASCADE"))
    shard: Mapped[int]
    pairs: Mapped[list[Any]] = mapped_column(JSON)  # [[store key a, store key b], ...]
    request: Mapped[dict[str, Any]]  # the parent model and how to vote (`trainer.shards.ShardRequest`)
    state: Mapped[str] = mapped_column(String(16), default="queued", server_default="queued")
    attempt: Mapped[int] = mapped_column(default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    done_pairs: Mapped[int] = mapped_column(default=0, server_default="0")
    votes: Mapped[list[Any] | None] = mapped_column(JSON)  # [[votes_a, votes_b, invalid], ...] once done


class PseudoLabel(Base):
    """A voted pair of a round: vote counts and the pseudo-preference p*(a, b)."""

    __tablename__ = "pseudo_labels"

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("evolution_rounds.id", ondelete="CASCADE"), index=True)
    image_a_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    image_b_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    votes_a: Mapped[int]
    votes_b: Mapped[int]
    invalid_votes: Mapped[int]
    p_star: Mapped[float]
    holdout: Mapped[bool] = mapped_column(default=False, server_default=false())
