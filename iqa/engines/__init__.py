"""Model engines behind one interface (`iqa.engines.base.Engine`)."""

from __future__ import annotations

from iqa.engines.base import Engine, ModelSpec
from iqa.settings import Settings


def build_engine(settings: Settings, model: ModelSpec, vllm_url: str | None = None) -> Engine:
    """The engine the settings ask for, set to serve `model` once started (on `vllm_url`, when given,
    instead of `EVOQ_VLLM_URL`: a round's own server)."""
    if settings.engine == "local":
        from iqa.engines.local import LocalEngine

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)  # process-wide: the engine is its main user
        return LocalEngine(
            model,
            profile=settings.prompt_profile,
            device=settings.device,
            dtype=settings.dtype,
            max_pixels=settings.model_max_pixels,
            batch_window_ms=settings.batch_window_ms,
            max_batch_rows=settings.max_batch_rows,
        )
    if settings.engine == "vllm":
        from iqa.engines.vllm import VLLMEngine

        return VLLMEngine(
            model,
            base_url=vllm_url or settings.vllm_url,
            adapter_dir=settings.data_dir / "models" / "vllm-adapters",
            api_key=settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None,
            timeout_s=settings.vllm_timeout_s,
            profile=settings.prompt_profile,
            max_pixels=settings.model_max_pixels,
        )
    raise ValueError(f"unknown engine {settings.engine!r}")
