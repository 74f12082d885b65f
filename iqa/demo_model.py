"""Build a tiny, randomly initialised Qwen2.5-VL offline.

The demo model lets the service and the tests run on a machine without a model hub. It has the real
Qwen2.5-VL architecture, chat template and processor, so every code path (prompts, image tokens,
generation, LoRA, GRPO, vLLM) is exercised; its answers are random, so it is always reported as
untrained. Sizes follow the rules in `shared/docs/environment.md`: text head_dim 32 (vLLM's CPU
attention rejects smaller), mrope sections summing to head_dim / 2, vision out size = text hidden.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

DEMO_MARKER = "evoq_demo.json"

# Qwen2.5-VL special tokens, in Qwen's own order so the ids below stay stable.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer pattern: every digit is its own token (\p{N} one at a time).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text the tokenizer is trained on: the prompts and answer formats the service uses, so that
# `\boxed{`, `<think>` and digits are compact tokens.
_TRAINING_TEXT = [
    "You are performing an image quality assessment task. Compare the two images and decide which "
    "one has better perceptual quality. Answer strictly with the index of the better image: 0 if the "
    "first image is better, or 1 if the second image is better.",
    "You are doing the image quality assessment task. Here is the question: What is your overall "
    "rating on the quality of this picture? The rating should be a float between 1 and 5, rounded to "
    "two decimal places, with 1 representing very poor quality and 5 representing excellent quality.",
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
    "MUST BE put in \\boxed{}.",
    "<think> The image is sharp, well exposed, with little noise. </think> \\boxed{3.75}",
    "<answer> 4.25 </answer> \\boxed{0} \\boxed{1} system user assistant",
    string.ascii_letters + string.digits + string.punctuation + " \n",
]


def build_tokenizer(out_dir: Path):
    """Train a ~400-token byte-level BPE and wrap it as a Qwen2 tokenizer with Qwen's specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.add_tokens(["<|endoftext|>"], special_tokens=True)
    fast.model_max_length = 32768
    return fast


def _chat_template() -> str:
    """The official Qwen2.5-VL chat template (TRL ships a verbatim copy)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text()


def build_demo_model(
    out_dir: str | Path, seed: int = 0, *, vision_window: int = 112, name: str = "demo (untrained)"
) -> Path:
    """Write a tiny random Qwen2.5-VL (weights, tokenizer, processor, template) to `out_dir`.

    Deterministic for a given seed. Returns the folder. The folder also holds `evoq_demo.json`,
    which is how the service knows to report the model as untrained (not a real IQA model) and under
    which `name`. `vision_window=224` makes a whole 224 x 224 image one attention window (faster).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
        "window_size": vision_window,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=1.0,
        max_new_tokens=48,
    )
    model.save_pretrained(out, safe_serialization=True)

    # A small pixel budget keeps the demo fast: images are resized to at most 64 patches of 28x28.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
    template = _chat_template()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    processor_config = {"processor_class": "Qwen2_5_VLProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (out / "chat_template.jinja").write_text(template)
    (out / DEMO_MARKER).write_text(json.dumps({"name": name, "untrained": True, "seed": seed}, indent=2))
    return out


def is_demo_model(model_dir: str | Path) -> bool:
    """True when the folder was written by `build_demo_model`."""
    return (Path(model_dir) / DEMO_MARKER).is_file()


def demo_name(model_dir: str | Path) -> str | None:
    """The name a demo folder is reported under (None when it is not a demo folder)."""
    marker = Path(model_dir) / DEMO_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["name"])
    except (ValueError, KeyError, TypeError):
        return "demo (untrained)"


def is_untrained(model_dir: str | Path) -> bool:
    """The demo model, or a checkpoint evolved from it (its manifest says its base was untrained)."""
    folder = Path(model_dir)
    if is_demo_model(folder):
        return True
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text())["base_model"]["untrained"])
    except (ValueError, KeyError, TypeError):
        return False
