"""Load a Qwen2.5-VL-family checkpoint (base, full fine-tune or LoRA) and its processor with transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from iqa.engines.base import ModelSpec

# model_type -> processor class, for building an image-only processor where torchvision is absent.
_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}

# transformers 5 swaps layers for kernels downloaded from the Hub when it moves a model to a GPU in
# training mode, unless told not to. On an offline GPU machine that fails the first GRPO step (seen on an
# H200), and online it runs code fetched at training time. Every model load here passes these.
MODEL_LOAD_KWARGS: dict[str, Any] = {"use_kernels": False}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPU, float32 on CPU (bf16 matmuls are slower on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _model_type(path: str) -> str:
    return transformers.AutoConfig.from_pretrained(path).model_type


def load_processor(path: str):
    """The checkpoint's processor; image-only when torchvision (needed for video) is not installed.

    transformers always builds the video processor of Qwen-VL models, and that needs torchvision,
    which has no CPU build for our torch. Images need only the PIL image processor, so where the
    import fails we build the same processor class without its video part.
    """
    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
    cls = getattr(transformers, _PROCESSOR_CLASSES.get(_model_type(path), "Qwen2_5_VLProcessor"))

    class ImageOnlyProcessor(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    return ImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def adapter_base(adapter_dir: str) -> str | None:
    """The base model recorded in a PEFT adapter folder."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


@dataclass
class LoadedModel:
    """A model ready to generate, with everything derived from it that generation needs."""

    spec: ModelSpec
    model: torch.nn.Module
    processor: object
    device: torch.device
    default_max_new_tokens: int | None
    vocabulary: Any = None  # token texts and answer grammars, built on first constrained request
    candidate_ids: dict[tuple[str, ...], list[int]] = field(default_factory=dict)  # readings' answer tokens


def load_model(spec: ModelSpec, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `spec`; a LoRA is applied to its base and merged, so generation runs at base speed."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    weights_path = spec.base_path if spec.kind == "lora" else spec.path
    if spec.kind == "lora" and weights_path is None:
        weights_path = adapter_base(spec.path)
    if weights_path is None:
        raise ValueError(f"LoRA version {spec.name!r} has no base model")
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        weights_path, dtype=torch_dtype, output_loading_info=True, **MODEL_LOAD_KWARGS
    )
    # transformers fills missing weights randomly and only logs it: a partial checkpoint must fail.
    broken = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if broken:
        raise ValueError(f"checkpoint {weights_path} is incomplete: {broken}")
    if spec.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.path).merge_and_unload()
    model.to(dev).eval()
    processor = load_processor(weights_path)
    processor.tokenizer.padding_side = "left"
    max_new = getattr(model.generation_config, "max_new_tokens", None)
    return LoadedModel(spec, model, processor, dev, max_new)
