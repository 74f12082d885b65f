"""The one settings object. Every value comes from the environment (prefix `EVOQ_`) or a `.env` file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PromptProfile = Literal["evoquality", "visualquality-r1"]
EngineKind = Literal["local", "vllm"]


class Settings(BaseSettings):
    """Service configuration; see the table in README.md."""

    model_config = SettingsConfigDict(env_prefix="EVOQ_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Folder for the SQLite file, images and models.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `<data_dir>/evoq.db`."
    )
    image_store: str | None = Field(
        None,
        description="Image folder, or an fsspec URL shared by every host (e.g. s3://bucket/images); "
        "default `<data_dir>/images`.",
    )
    image_store_options: dict[str, Any] = Field(
        default_factory=dict,
        description='fsspec options of a URL store as JSON, e.g. {"endpoint_url": "http://minio:9000"}; '
        "credentials come from the file system's own environment (AWS_ACCESS_KEY_ID, ...).",
    )
    model: str | None = Field(
        None,
        description="Checkpoint path or hub id (e.g. ByteDance/EvoQuality); unset = tiny demo model.",
    )
    model_name: str | None = Field(None, description="Name reported for the model; default: `model`.")
    engine: EngineKind = Field("local", description="`local` (in-process transformers) or `vllm`.")
    vllm_url: str = Field("http://127.0.0.1:8001", description="Base URL of the vLLM OpenAI server.")
    vllm_api_key: SecretStr | None = Field(None, description="API key of the vLLM server, if it has one.")
    vllm_timeout_s: float = Field(120.0, gt=0, description="Timeout of one vLLM request.")
    device: str = Field("auto", description="Torch device for the local engine: auto, cpu, cuda.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for the local engine (auto: bf16 on GPU, fp32 on CPU)."
    )
    prompt_profile: PromptProfile = Field(
        "evoquality", description="Answer format: `evoquality` (\\boxed{}) or `visualquality-r1`."
    )
    score_samples: int = Field(8, ge=1, le=64, description="Default samples per score.")
    compare_votes: int = Field(8, ge=2, le=64, description="Default votes per comparison.")
    max_samples: int = Field(64, ge=1, le=256, description="Largest `samples`/`votes` a client may ask.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_new_tokens: int | None = Field(
        None, ge=8, le=8192, description="Tokens per completion; default: the model's own, else 1024."
    )
    constrain_answers: bool | None = Field(
        None,
        description="Constrain decoding so every completion ends in a parsable answer; "
        "default: on for the demo model only.",
    )
    model_max_pixels: int = Field(
        1280 * 28 * 28, ge=28 * 28, description="Images are downscaled to this many pixels for the model."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads of the local engine's torch; default: torch's own choice."
    )
    batch_window_ms: float = Field(5.0, ge=0, le=1000, description="Local engine batching window.")
    max_batch_rows: int = Field(64, ge=1, description="Most sequences in one local forward batch.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest upload (413).")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest width*height (413).")
    min_image_side: int = Field(16, ge=1, description="Smallest width or height (422).")
    max_images_per_request: int = Field(16, ge=1, description="Most `images` in one score request.")
    admin_token: SecretStr | None = Field(None, description="Bearer token; unset = admin API off.")
    require_api_keys: bool = Field(
        False,
        description="/v1/* needs a client API key even before one exists (it always does once one does).",
    )
    rate_limit: str | None = Field(
        None,
        description="Requests per client (API key, else address) on /v1/*, e.g. `120/minute`; unset = off.",
    )
    rate_limit_storage: str = Field(
        "memory://", description="Where rate-limit counts live: `memory://` (this process) or a redis:// URL."
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Images not seen for this many days are deleted with their rows; unset = kept.",
    )
    allow_unkept_requests: bool = Field(
        False,
        description="Whether a request may ask (keep=false) to be scored without being stored or logged.",
    )
    max_queued_requests: int = Field(
        256, ge=0, description="Client requests at the engine at once; beyond, 503 at once (0 = unbounded)."
    )

    # ---- self-improvement rounds ----
    rounds_backend: Literal["inprocess", "celery"] = Field(
        "inprocess", description="`inprocess` (embedded, no broker) or `celery` (workers on Redis)."
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    rounds_scheduled: bool = Field(
        True, description="Whether the schedule starts rounds by itself; admin-triggered rounds always run."
    )
    round_vllm_url: str | None = Field(
        None,
        description="With the vllm engine: a vLLM server for round work (votes, held-out scores); "
        "default: the serving one, at background priority. Several, comma-separated, spread voting "
        "shards over them (the first also scores the round's models).",
    )
    voting_shards: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Split a Celery round's votes into this many shards on the `voting` queue; 0: the "
        "round's own worker votes.",
    )
    voting_shard_timeout_s: float = Field(
        120.0, gt=0, description="A voting shard whose worker sent no heartbeat for this long is sent again."
    )
    voting_shard_attempts: int = Field(
        3, ge=1, description="Times a voting shard may be started before the round fails."
    )
    train_device: str | None = Field(
        None, description="Torch device of the training process (e.g. cuda:1); default: `device`."
    )
    train_report_to: str = Field(
        "none", description="Trackers TRL reports training metrics to (tensorboard, wandb, ...); none = off."
    )
    train_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Training processes (torchrun, one per GPU; gloo on CPU): 1 trains in one process.",
    )
    train_deepspeed: str | None = Field(
        None, description="DeepSpeed JSON config for training (e.g. deploy/deepspeed/zero3.json); none: off."
    )
    checkpoints_dir: Path | None = Field(
        None, description="Where round checkpoints go; default `<data_dir>/checkpoints`."
    )
    active_version_poll_s: float = Field(
        2.0, gt=0, description="How often an API process checks the database for a new active version."
    )
    round_check_interval_s: float = Field(
        60.0, gt=0, description="How often the beat checks whether a scheduled round is due."
    )
    round_every_hours: float = Field(24.0, gt=0, description="Scheduled rounds: at most one per this period.")
    round_min_new_images: int = Field(
        64, ge=1, description="Scheduled rounds start only when this many new images arrived since the last."
    )
    round_stale_after_s: float = Field(
        900.0, gt=0, description="A running round with no heartbeat for this long is marked failed."
    )
    round_max_images: int = Field(
        2000, ge=4, description="Most logged images (newest first) in a round's pool."
    )
    round_pairs: int = Field(512, ge=2, description="Pairs voted per round (paper: 20000).")
    round_votes: int = Field(8, ge=2, le=64, description="Votes per pair, K (paper: 32).")
    round_generations: int = Field(8, ge=2, le=64, description="GRPO group size, G (paper: 32).")
    round_steps: int = Field(100, ge=1, description="GRPO optimiser steps per round.")
    round_images_per_step: int = Field(
        4, ge=2, description="Images per GRPO step (whole pairs; paper: 4 per GPU)."
    )
    round_eval_samples: int = Field(
        2,
        ge=1,
        le=64,
        description="Sampled answers per held-out image for the gate's parse-failure and spread checks "
        "(agreement is read in one pass).",
    )
    round_method: Literal["lora", "full"] = Field("lora", description="LoRA adapter or full fine-tuning.")
    round_lora_rank: int = Field(
        16, ge=1, le=256, description="LoRA rank of round adapters (vLLM's --max-lora-rank must allow it)."
    )
    round_learning_rate: float = Field(1e-5, gt=0, description="GRPO learning rate (paper, full FT: 3e-7).")
    round_holdout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of voted pairs kept out of training for the gate."
    )
    round_variants_per_image: int = Field(
        0,
        ge=0,
        le=64,
        description="Synthetic variants per pool image, paired with their reference (paper, round 2: 10); "
        "0 = off.",
    )
    gate_max_parse_failure: float = Field(0.1, ge=0, le=1, description="Gate: most unparsable answers.")
    gate_min_spread: float = Field(
        0.05, ge=0, description="Gate: least std of scores across images (0: no check)."
    )
    gate_min_spread_ratio: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Gate: the candidate's read score spread must keep this share of the active model's "
        "(scores pulled toward one value are a partial collapse; skipped below gate_min_spread).",
    )
    gate_min_agreement_gain: float = Field(
        0.02,
        ge=-1,
        le=1,
        description="Gate: held-out agreement must rise by more than this, a least practical gain "
        "(a round that learned nothing gained under 0.015 on the organism; -0.05: it may fall by 0.05).",
    )
    gate_agreement_z: float = Field(
        1.645,
        ge=0,
        description="Gate: where scores are read in one pass, the per-pair agreement gain must exceed "
        "the minimum gain by this many standard errors (1.645: one-sided 95%).",
    )
    validation_csv: Path | None = Field(
        None, description="Optional CSV (image path, mos): the gate then also requires SRCC not to drop."
    )

    @field_validator("train_device", "train_deepspeed", "image_store", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """docker compose passes `${VAR:-}` as an empty string: that means unset. A folder may be a Path."""
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return None if value == "" else value

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'evoq.db').resolve()}"
        if self.image_store is None:
            self.image_store = str(self.data_dir / "images")
        if self.checkpoints_dir is None:
            self.checkpoints_dir = self.data_dir / "checkpoints"
        return self

    @property
    def round_vllm_urls(self) -> list[str]:
        """The round vLLM servers of `round_vllm_url`, in order (none: the serving one)."""
        return [url.strip() for url in (self.round_vllm_url or "").split(",") if url.strip()]

    @property
    def demo_model_dir(self) -> Path:
        """Where the tiny demo model is built when no model is configured."""
        return self.data_dir / "models" / "demo"


@lru_cache
def get_settings() -> Settings:
    """Settings read once per process."""
    return Settings()
