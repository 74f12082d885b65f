"""The one engine interface that scoring, voting and the trainer talk to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

AnswerKind = Literal["score", "vote"]


class EngineUnavailable(RuntimeError):
    """The model backend cannot answer now (down, loading, overloaded); the API maps it to 503."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled. Part of the result-cache key."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the model's own default
    constrain: AnswerKind | None = None  # force a parsable answer of this kind (demo model)
    seed: int | None = None
    background: bool = False  # round work: served after client requests (not part of the key)

    def key(self) -> str:
        """A stable text form for cache keys and logs."""
        return (
            f"t={self.temperature:g};p={self.top_p:g};max={self.max_new_tokens or 'model'};"
            f"c={self.constrain or '-'};seed={self.seed if self.seed is not None else '-'}"
        )


@dataclass(frozen=True)
class ModelSpec:
    """A servable model version: where its weights are and how to load them."""

    version_id: int
    name: str
    kind: Literal["base", "lora", "full"]
    path: str  # folder or hub id; for a LoRA, the adapter folder
    base_path: str | None = None  # for a LoRA: the base model it applies to
    untrained: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """n samples for one chat turn: the images, then the text."""

    images: tuple[Image.Image, ...]
    text: str
    n: int
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class GenerationResult:
    """The completions and the model version that produced them."""

    texts: list[str]
    model: ModelSpec


@dataclass(frozen=True)
class ReadingRequest:
    """One chat turn continued by assistant-turn `prefixes`: the next token's log-probability of each
    of `candidates` (single tokens) after each prefix. A one-pass read of the model's answer."""

    images: tuple[Image.Image, ...]
    text: str
    prefixes: tuple[str, ...]
    candidates: tuple[str, ...]
    background: bool = False  # round work: served after client requests


@dataclass(frozen=True)
class ReadingResult:
    """`logprobs[k][c]`: log-probability of candidate c after prefix k, over the whole vocabulary
    (None where the engine could not see it: vLLM returns only its top tokens)."""

    logprobs: list[list[float | None]]
    model: ModelSpec


@runtime_checkable
class Engine(Protocol):
    """Generate samples for image chats at the active model version; swap versions atomically."""

    @property
    def active(self) -> ModelSpec:
        """The version that new requests are answered by."""
        ...

    async def start(self) -> None:
        """Load or connect; after this the engine answers."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """n completions for one request, all from the same model version."""
        ...

    async def read(self, request: ReadingRequest) -> ReadingResult:
        """Next-token log-probabilities after each prefix, all from the same model version."""
        ...

    async def activate(self, model: ModelSpec) -> None:
        """Make `model` the active version; requests in flight finish on the old one."""
        ...

    async def health(self) -> dict:
        """A small status dict; raises EngineUnavailable when the engine cannot answer."""
        ...

    async def close(self) -> None:
        """Release the model and any connections."""
        ...
