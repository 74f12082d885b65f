"""A round's settings, in one typed path: service settings + an admin's overrides -> `RoundConfig`.

`RoundConfig` (with its GRPO part, `TrainSettings`) is what `trainer.round.run_round` runs with; the
command line and the benches build it directly. The service builds it only through `round_config`,
from the `EVOQ_ROUND_*` settings and a `RoundOverrides` (the admin API's request body, stored with the
round), so a round's settings have one default each: the service setting's.

This module imports nothing heavy (no torch, no TRL): the API uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from iqa.settings import PromptProfile, Settings
from trainer.checkpoint import ModelSource
from trainer.voting import LabelRule


@dataclass(frozen=True)
class TrainSettings:
    """GRPO settings of a round. None means: chosen from the model and device (see each field)."""

    generations: int = 4  # G, rollouts per image (paper: 32)
    steps: int = 16  # optimizer steps
    images_per_step: int = 4  # images per generation batch, whole pairs (paper: 4 per GPU)
    micro_batches: int = 1  # gradient accumulation: split a step's B*G rows into this many passes
    learning_rate: float | None = None  # None: 1e-5 for LoRA, the paper's 3e-7 for full fine-tuning
    beta: float = 0.05
    epsilon: float = 0.2
    loss_type: str = "grpo"
    temperature: float = 1.0
    max_completion_length: int | None = None  # None: the model's max_new_tokens, else 1024
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool | None = None  # None: on for GPU, off for CPU
    constrain_answers: bool | None = None  # None: on for the untrained demo lineage only
    device: str = "auto"  # the training process's device, e.g. cuda:1 beside a vLLM on cuda:0
    report_to: str = "none"  # trackers TRL reports to: none, tensorboard, wandb, ... (comma-separated)
    processes: int = 1  # >1: torchrun with this many ranks (one per GPU; gloo on CPU), see trainer.launch
    deepspeed: str | None = None  # a DeepSpeed JSON config (ZeRO-3 for full fine-tuning), or None
    seed: int = 0

    def resolved_learning_rate(self) -> float:
        """The learning rate actually used."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-5 if self.lora else 3e-7


@dataclass(frozen=True)
class TrainJob:
    """Everything the training process needs, as plain picklable data."""

    parent: ModelSource
    image_ids: list[str]
    image_paths: list[str]
    preferences: list[tuple[str, str, float]]  # p*(first, second) of the training pairs
    settings: TrainSettings
    output_dir: str  # weights are saved here
    profile: PromptProfile = "evoquality"
    max_pixels: int = 1280 * 28 * 28


@dataclass(frozen=True)
class RoundConfig:
    """Settings of one round; `train` holds the GRPO ones. Recorded in the manifest as given."""

    pairs: int = 128  # M (paper: 20,000); capped at the number of distinct pairs
    votes: int = 8  # K per pair (paper: 32)
    min_degree: int = 2  # each image in at least this many pairs (lowered when M is too small)
    holdout: float = 0.2  # share of pairs kept out of training to judge the new model
    label_rule: LabelRule = "hard"
    min_margin: float = 0.0
    eval_samples: int = 2  # sampled answers per held-out image: the gate's parse and spread checks
    temperature: float = 1.0
    max_new_tokens: int | None = None  # completion budget for votes, scores and rollouts
    constrain_answers: bool | None = None  # None: on for the untrained demo lineage only
    concurrency: int = 16
    profile: PromptProfile = "evoquality"
    max_pixels: int = 1280 * 28 * 28
    device: str = "auto"  # local engines of the round (voting and scoring without vLLM)
    seed: int = 0
    # The paper's round-2 option: random synthetic variants of every pool image (paper: 10), and
    # `variant_pairs` pairs within each reference's group (None: as many as `pairs`, capped at what exists),
    # voted like the random pairs. 0 variants: off.
    variants_per_image: int = 0
    variant_pairs: int | None = None
    # Experiments only: train on the pseudo-labels permuted across the training pairs, which keeps
    # their distribution and breaks their link to the images (the control of `bench/organism.py`).
    shuffle_labels: bool = False
    train: TrainSettings = field(default_factory=TrainSettings)


class RoundOverrides(BaseModel):
    """Optional per-round overrides of the `EVOQ_ROUND_*` settings (the admin API's request body)."""

    model_config = {"extra": "forbid", "strict": True}  # `true` is no learning rate, "8" no count

    pairs: int | None = Field(None, ge=2, le=1_000_000, description="Pairs to vote on (M).")
    votes: int | None = Field(None, ge=2, le=64, description="Votes per pair (K).")
    generations: int | None = Field(None, ge=2, le=64, description="GRPO group size (G).")
    steps: int | None = Field(None, ge=1, le=1_000_000, description="GRPO optimiser steps.")
    images_per_step: int | None = Field(None, ge=2, le=1024, description="Images per GRPO step.")
    method: Literal["lora", "full"] | None = Field(None, description="LoRA adapter or full fine-tuning.")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Learning rate.")
    max_images: int | None = Field(None, ge=4, description="Most logged images in the pool (newest first).")
    holdout_fraction: float | None = Field(None, ge=0, lt=1, description="Pairs kept out for the gate.")
    eval_samples: int | None = Field(None, ge=1, le=64, description="Score samples per held-out image.")
    variants_per_image: int | None = Field(
        None, ge=0, le=64, description="Synthetic variants per pool image (paper, round 2: 10); 0 = off."
    )
    variant_pairs: int | None = Field(
        None, ge=0, le=1_000_000, description="Same-reference pairs to vote on; default: as many as `pairs`."
    )
    seed: int | None = Field(None, description="Seed for pair sampling and training.")

    @field_validator(
        "pairs", "votes", "generations", "steps", "images_per_step", "max_images", "eval_samples",
        "variants_per_image", "variant_pairs", "seed", mode="before",
    )  # fmt: skip
    @classmethod
    def _integral(cls, value: object) -> object:
        """JSON Schema's integer includes 2.0: take an integral float as that integer (strict mode)."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


def round_config(settings: Settings, overrides: RoundOverrides | None = None) -> RoundConfig:
    """The config a service round runs with: each value from `overrides` when given, else the setting."""
    o = overrides or RoundOverrides()

    def pick(name: str):
        value = getattr(o, name)
        return getattr(settings, f"round_{name}") if value is None else value

    train = TrainSettings(
        generations=pick("generations"),
        steps=pick("steps"),
        images_per_step=pick("images_per_step"),
        learning_rate=pick("learning_rate"),
        lora=pick("method") == "lora",
        lora_rank=settings.round_lora_rank,
        lora_alpha=2 * settings.round_lora_rank,
        max_completion_length=settings.max_new_tokens,
        device=settings.train_device or settings.device,
        report_to=settings.train_report_to,
        processes=settings.train_processes,
        deepspeed=settings.train_deepspeed,
    )
    return RoundConfig(
        pairs=pick("pairs"),
        votes=pick("votes"),
        holdout=pick("holdout_fraction"),
        eval_samples=pick("eval_samples"),
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        constrain_answers=settings.constrain_answers,
        profile=settings.prompt_profile,
        max_pixels=settings.model_max_pixels,
        device=settings.device,
        seed=o.seed or 0,
        variants_per_image=pick("variants_per_image"),
        variant_pairs=o.variant_pairs,
        train=train,
    )


def pool_limit(settings: Settings, overrides: RoundOverrides | None = None) -> int:
    """Most logged images (newest first) in the round's pool."""
    value = (overrides or RoundOverrides()).max_images
    return settings.round_max_images if value is None else value
