"""Model engines behind one interface (`iqa.engines.base.Engine`)."""

from __future__ import annotations

from iqa.engines.base import Engine, ModelSpec
from iqa.settings import Settings


def build_engine(settings: Settings, model: ModelSpec) -> Engine:
    """The engine the settings ask for, set to serve `model` once started."""
    if settings.engine == "local":
        from iqa.engines.local import LocalEngine

        return LocalEngine(
            model,
            profile=settings.prompt_profile,
            device=settings.device,
            dtype=settings.dtype,
            max_pixels=settings.model_max_pixels,
            batch_window_ms=settings.batch_window_ms,
            max_batch_rows=settings.max_batch_rows,
        )
    raise NotImplementedError(f"engine {settings.engine!r} is not available yet")
