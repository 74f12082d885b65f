"""Helpers of the vLLM integration tests: model versions, exact-transport images, the local reference."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from api.app import create_app
from iqa import registry
from iqa.engines.base import GenerationRequest, ModelSpec, Sampling
from iqa.engines.local import LocalEngine
from iqa.images import encode_for_transport
from iqa.models import ModelVersion
from iqa.service import IQAService
from iqa.settings import Settings
from tests.imagegen import encode, photo

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_PIXELS = Settings.model_fields["model_max_pixels"].default
ADMIN_TOKEN = "vllm-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_lora(base_dir: Path, out_dir: Path, seed: int, rank: int) -> Path:
    """A LoRA of the tiny model on the language model only, with random non-zero A and B.

    `exclude_modules` keeps the vision tower out: it has modules of the same names, which vLLM would
    refuse. Random B (peft's default is zero) makes the adapter change the greedy outputs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGETS,
        exclude_modules=r".*visual.*",
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def fixed_point_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like image that the engine's JPEG transport leaves pixel-for-pixel unchanged.

    Re-encoding a decoded JPEG with the same settings converges in a few rounds. With such an image,
    vLLM decodes exactly the pixels the local engine is given, so greedy outputs can be compared.
    """
    image = photo(width, height, seed)
    for _ in range(30):
        decoded = Image.open(io.BytesIO(encode_for_transport(image, MAX_PIXELS))).convert("RGB")
        if np.array_equal(np.asarray(decoded), np.asarray(image)):
            return image
        image = decoded
    raise AssertionError(f"no JPEG fixed point for photo({width}, {height}, {seed}); pick another seed")


def png(image: Image.Image) -> bytes:
    """Lossless upload bytes: the API decodes exactly these pixels."""
    return encode(image, "PNG")


def same_completion(local: str, remote: str) -> bool:
    """Equal completions, up to one detokenizer difference: vLLM holds back trailing bytes that do not
    form a whole UTF-8 character (transformers shows them as U+FFFD). Any other difference is real."""
    return local.rstrip("\ufffd") == remote


class LocalReference:
    """Greedy completions of the local (transformers) engine, one engine per model version, cached."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, str], LocalEngine] = {}
        self._cache: dict[tuple, str] = {}

    async def complete(self, spec: ModelSpec, images: tuple[Image.Image, ...], text: str) -> str:
        key = (spec.kind, spec.path, tuple(im.tobytes() for im in images), text)
        if key not in self._cache:
            engine = self._engines.get((spec.kind, spec.path))
            if engine is None:
                engine = self._engines[(spec.kind, spec.path)] = LocalEngine(spec, dtype="float32")
                await engine.start()
            result = await engine.generate(GenerationRequest(images, text, 1, Sampling(temperature=0.0)))
            self._cache[key] = result.texts[0]
        return self._cache[key]

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()


def api_settings(data_dir: Path, vllm_url: str, model_dir: Path, **overrides: object) -> Settings:
    """Service settings for the vLLM engine on the tiny model; greedy and unconstrained unless overridden."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "engine": "vllm",
        "vllm_url": vllm_url,
        "model": str(model_dir),
        "model_name": "tiny-base",
        "temperature": 0.0,
        "constrain_answers": False,
        "vllm_timeout_s": 60.0,
        "admin_token": ADMIN_TOKEN,
        # The follower can undo an admin activation it races with (api/routers/admin.py); these tests
        # activate through the admin API only.
        "active_version_poll_s": 3600.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def running_api(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, IQAService]]:
    """The app with its lifespan (database, engine) running, and an HTTP client talking to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=120) as client:
            yield client, app.state.service


def register_version(service: IQAService, name: str, kind: str, path: Path, base: Path | None) -> ModelSpec:
    """A new version row (as a round would add), so predictions can be logged against it."""
    with service.sessions.begin() as session:
        row = ModelVersion(
            name=name, kind=kind, path=str(path), base_path=str(base) if base else None, untrained=True
        )
        session.add(row)
        session.flush()
        return registry.to_spec(row)
