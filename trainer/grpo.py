"""Stage 2 of EvoQuality: GRPO with the fidelity reward on TRL 1.16's `GRPOTrainer`.

One dataset row per training image: the `c_score` chat (image, then text), the image and its id. Two
hooks adapt TRL to EvoQuality, each by overriding one method of `GRPOTrainer`:

- `_get_train_sampler` returns a `trainer.batching.PairAwareSampler` instead of TRL's `RepeatSampler`.
  It emits the same index layout (each image repeated G times, each generation batch repeated
  `num_iterations * steps_per_generation` times), but fills every generation batch with whole pairs,
  so the reward sees both images of each pair it trains on (mu and var of the partner come from the
  same step, as the spec demands).
- `_generate_single_turn` adds `AnswerConstraint` as a logits processor to the rollouts when
  `constrain_answers` is on (TRL's `generate` call takes no processors, so the model's `generate` is
  wrapped for the duration of the call). The random demo model never writes `\\boxed{x}` by itself;
  without the constraint every reward would be 0.

Loss: TRL's `loss_type="grpo"` is the GRPO clipped surrogate (epsilon 0.2) averaged per sequence, as in
GRPO and VisualQuality-R1; TRL's default "dapo" is the same surrogate with tokens averaged over the whole
batch. Advantages are standardised per group ((r - mean) / (std + 1e-4), `scale_rewards="group"`).

Reference model (KL, beta 0.05): always the lineage's root, the model the evolution started from,
except for a LoRA trained on a full fine-tune, whose reference is that full fine-tune (the base of the
adapter); `reference_model` in the result says which was used.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import LogitsProcessorList, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from iqa.engines.constraint import AnswerConstraint, AnswerGrammar
from iqa.engines.hf_loading import MODEL_LOAD_KWARGS, load_processor, resolve_device, resolve_dtype
from iqa.prompts import parse_score, prompt_set
from iqa.settings import PromptProfile
from trainer.batching import PairAwareSampler
from trainer.config import TrainJob
from trainer.pool import load_image
from trainer.reward import completion_text, make_fidelity_reward

# LoRA on the language model only: the vision tower has modules of the same names, and vLLM rejects
# adapters on it. PEFT full-matches this against module names such as
# `model.language_model.layers.0.self_attn.q_proj`.
LORA_TARGET_MODULES = (
    r"^(?!.*\b(?:visual|vision_tower|vision_model)\b).*\."
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)


class EvoQualityGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with pair-aware generation batches and, optionally, constrained rollouts."""

    def __init__(
        self,
        *args: Any,
        pairs: Sequence[tuple[int, int]],
        images_per_step: int,
        constrain_profile: PromptProfile | None = None,
        **kwargs: Any,
    ) -> None:
        self.pairs = list(pairs)
        self.images_per_step = images_per_step
        super().__init__(*args, **kwargs)
        self._grammar: AnswerGrammar | None = None
        self._token_texts: list[str] = []
        if constrain_profile is not None:
            tokenizer = self._tokenizer
            grammar = AnswerGrammar.build(tokenizer, constrain_profile, "score", list(self.eos_token_ids))
            if self.max_completion_length < grammar.min_tokens:  # the answer would be cut off: reward 0
                raise ValueError(
                    f"max_completion_length {self.max_completion_length} is too short for a constrained "
                    f"answer ({grammar.min_tokens} tokens)"
                )
            self._grammar = grammar
            self._token_texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]

    def _get_train_sampler(self, dataset: Any = None) -> Sampler:
        processes = self.accelerator.num_processes
        per_process = self.args.generation_batch_size // self.num_generations // processes
        if per_process != self.images_per_step:
            raise ValueError(
                f"TRL's generation batch holds {per_process} images per process; the plan has "
                f"{self.images_per_step}. Set per_device_train_batch_size * steps_per_generation = "
                "images_per_step * num_generations."
            )
        generate_every = self.args.steps_per_generation * self.num_iterations
        batches = math.ceil(self.args.max_steps * self.args.gradient_accumulation_steps / generate_every)
        return PairAwareSampler(
            self.pairs,
            self.images_per_step,
            self.num_generations,
            num_batches=batches,
            repeat_count=generate_every,
            num_processes=processes,
            seed=self.args.seed,
        )

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        call = super()._generate_single_turn
        if self._grammar is None or self.use_vllm:
            return call(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        constraint = AnswerConstraint(self._grammar, self._token_texts, self.max_completion_length)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        with _extra_logits_processor(model, constraint):
            return call(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)


@contextmanager
def _extra_logits_processor(model: torch.nn.Module, processor: Any) -> Iterator[None]:
    """Make `model.generate` apply `processor` too, until the block ends (one generate call per block)."""
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(processor)
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


class FidelityRewardTracker:
    """The fidelity reward, counting what it saw: image ids per call, parse failures, lone images.

    An image without any partner in its step is rewarded 0 throughout (no training signal); with
    pair-aware batching there are none, and `lone_images` proves it during real training.
    """

    __name__ = "fidelity"

    def __init__(self, preferences: dict[tuple[str, str], float], profile: PromptProfile) -> None:
        self.reward = make_fidelity_reward(preferences, profile)
        self.profile = profile
        self.partners: dict[str, set[str]] = {}
        for i, j in preferences:
            self.partners.setdefault(i, set()).add(j)
            self.partners.setdefault(j, set()).add(i)
        self.calls: list[list[str]] = []
        self.rollouts = 0
        self.unparsable = 0
        self.lone_images = 0

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any):
        image_ids = list(kwargs.get("image_id") or [])
        self.calls.append(image_ids)
        present = set(image_ids)
        self.lone_images += sum(1 for image in present if not self.partners.get(image, set()) & present)
        failed = sum(parse_score(completion_text(c), self.profile) is None for c in completions)
        self.rollouts += len(completions)
        self.unparsable += failed
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("parse_failure_rate", failed / max(1, len(completions)))
        return self.reward(prompts, completions, completion_ids, **kwargs)


def build_dataset(image_ids: Sequence[str], images: Sequence[Any], profile: PromptProfile):
    """Rows of (c_score prompt, image, image_id); TRL puts the image before the text, as the paper does."""
    from datasets import Dataset

    prompt = [{"role": "user", "content": prompt_set(profile).score_text}]
    return Dataset.from_dict(
        {"prompt": [prompt] * len(image_ids), "image": list(images), "image_id": list(image_ids)}
    )


def _load_policy(job: TrainJob, dtype: torch.dtype) -> tuple[torch.nn.Module, str, bool]:
    """(model to train, reference model path, whether it already is a PEFT model with a trainable adapter)."""
    import transformers
    from peft import PeftModel

    parent, lora = job.parent, job.settings.lora
    auto = transformers.AutoModelForImageTextToText
    if parent.kind == "lora":
        base = auto.from_pretrained(parent.adapter_base, dtype=dtype, **MODEL_LOAD_KWARGS)
        if lora:  # keep training the lineage's adapter; the reference is the adapter's base
            return (
                PeftModel.from_pretrained(base, parent.path, is_trainable=True),
                str(parent.adapter_base),
                True,
            )
        model = PeftModel.from_pretrained(base, parent.path).merge_and_unload()
    else:
        model = auto.from_pretrained(parent.path, dtype=dtype, **MODEL_LOAD_KWARGS)
    if lora:  # a fresh adapter on a base or a full fine-tune: the reference is that model
        return model, parent.path, False
    # Full fine-tuning: TRL builds the reference from `config._name_or_path`; point it at the root.
    model.config._name_or_path = parent.root
    return model, parent.root, False


class _StepReporter(TrainerCallback):
    def __init__(self, on_step: Callable[[int, int], None]) -> None:
        self.on_step = on_step

    def on_step_end(self, args, state, control, **kwargs):
        self.on_step(state.global_step, state.max_steps)


def build_trainer(
    job: TrainJob, scratch_dir: str, on_step: Callable[[int, int], None] | None = None
) -> tuple[EvoQualityGRPOTrainer, FidelityRewardTracker, str]:
    """A ready-to-train trainer for `job`, the reward tracker it calls, and the reference model path."""
    from peft import LoraConfig

    s = job.settings
    if s.steps < 1 or s.generations < 2:
        raise ValueError("GRPO needs at least 1 step and 2 generations per image")
    if s.images_per_step * s.generations % s.micro_batches:
        raise ValueError("images_per_step * generations must be divisible by micro_batches")
    device = resolve_device(s.device)
    on_gpu = device.type == "cuda"
    # Full fine-tuning keeps fp32 master weights (bf16 autocast on GPU): small updates vanish in bf16.
    dtype = resolve_dtype("auto", device) if s.lora else torch.float32
    model, reference, continued = _load_policy(job, dtype)
    processor = load_processor(job.parent.adapter_base or job.parent.root)
    processor.tokenizer.padding_side = "left"

    by_id = dict(zip(job.image_ids, job.image_paths, strict=True))
    used = sorted({image for i, j, _ in job.preferences for image in (i, j)})
    row = {image: k for k, image in enumerate(used)}
    images = [load_image(Path(by_id[image]), job.max_pixels) for image in used]
    dataset = build_dataset(used, images, job.profile)
    pairs = [(row[i], row[j]) for i, j, _ in job.preferences]
    tracker = FidelityRewardTracker({(i, j): p for i, j, p in job.preferences}, job.profile)

    max_new = s.max_completion_length or getattr(model.generation_config, "max_new_tokens", None) or 1024
    checkpointing = on_gpu if s.gradient_checkpointing is None else s.gradient_checkpointing
    rows_per_step = s.images_per_step * s.generations
    config = GRPOConfig(
        output_dir=scratch_dir,
        max_steps=s.steps,
        per_device_train_batch_size=rows_per_step // s.micro_batches,
        gradient_accumulation_steps=s.micro_batches,
        steps_per_generation=s.micro_batches,
        num_generations=s.generations,
        max_completion_length=max_new,
        temperature=s.temperature,
        beta=s.beta,
        epsilon=s.epsilon,
        loss_type=s.loss_type,
        scale_rewards="group",
        learning_rate=s.resolved_learning_rate(),
        lr_scheduler_type="linear",
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=checkpointing,
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        report_to=s.report_to,
        deepspeed=s.deepspeed,  # e.g. ZeRO-3 for full fine-tuning over several GPUs (trainer.launch)
        disable_tqdm=True,
        seed=s.seed,
        dataloader_num_workers=0,
        # TRL loads a full fine-tune's reference model with these (and logs that they are "ignored":
        # they are, for the policy, which is passed in already loaded). A LoRA has no separate reference.
        model_init_kwargs=None if s.lora else dict(MODEL_LOAD_KWARGS),
    )
    constrain = job.parent.untrained if s.constrain_answers is None else s.constrain_answers
    trainer = EvoQualityGRPOTrainer(
        model=model,
        reward_funcs=[tracker],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=None
        if continued or not s.lora
        else LoraConfig(
            r=s.lora_rank,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=LORA_TARGET_MODULES,
            task_type="CAUSAL_LM",
        ),
        callbacks=[_StepReporter(on_step)] if on_step else None,
        pairs=pairs,
        images_per_step=s.images_per_step,
        constrain_profile=job.profile if constrain else None,
    )
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict; stats are returned
    if continued and "ref" in trainer.model.peft_config:
        # TRL copies a loaded adapter as the reference; EvoQuality's reference is the adapter's base.
        trainer.model.delete_adapter("ref")
    return trainer, tracker, reference


def _history_stats(history: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [h for h in history if "reward" in h]
    summary = next((h for h in history if "train_runtime" in h), {})

    def series(key: str) -> list[float]:
        return [float(h[key]) for h in steps if key in h]

    rewards = series("reward")
    return {
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "kl_last": (series("kl") or [None])[-1],
        "loss_mean": summary.get("train_loss"),
        "runtime_s": summary.get("train_runtime"),
        "per_step": [
            {
                k: h[k]
                for k in ("step", "reward", "reward_std", "kl", "loss", "completions/mean_length")
                if k in h
            }
            for h in steps
        ],
    }


def train_grpo(job: TrainJob, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run GRPO for `job` and save the result (adapter or full weights) to `job.output_dir`; returns stats."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evoq-grpo-") as scratch:
        trainer, tracker, reference = build_trainer(job, scratch, on_step)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        _save_weights(trainer, job)
    stats = _history_stats(trainer.state.log_history)
    device = resolve_device(job.settings.device)
    stats.update(
        process_index=trainer.accelerator.process_index,
        num_processes=trainer.accelerator.num_processes,
        images_seen=sorted({image for call in tracker.calls for image in call}),
        steps=trainer.state.global_step,
        rollouts=tracker.rollouts,
        parse_failure_rate=tracker.unparsable / tracker.rollouts if tracker.rollouts else None,
        lone_images=tracker.lone_images,
        train_images=len(trainer.train_dataset),
        train_pairs=len(job.preferences),
        trainable_parameters=trainable,
        reference_model=reference,
        learning_rate=job.settings.resolved_learning_rate(),
        max_completion_length=trainer.max_completion_length,
        constrained=trainer._grammar is not None,
        wall_s=time.perf_counter() - started,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    )
    return stats


def _save_weights(trainer: EvoQualityGRPOTrainer, job: TrainJob) -> None:
    """The adapter or the full weights, written once (by the main process when there are several)."""
    out = Path(job.output_dir)
    model, accelerator = trainer.model, trainer.accelerator
    if job.settings.lora:
        adapter_base = job.parent.adapter_base or job.parent.path
        model.peft_config["default"].base_model_name_or_path = adapter_base
    if trainer.is_deepspeed_enabled:  # ZeRO-3 shards the weights: every rank takes part in gathering them
        trainer.save_model(str(out))
    elif accelerator.is_main_process:
        if job.settings.lora:
            model.save_pretrained(str(out), selected_adapters=["default"])
        else:
            import transformers

            saved_dtype = transformers.AutoConfig.from_pretrained(job.parent.root).dtype or torch.float32
            model.to(saved_dtype).save_pretrained(str(out))
    accelerator.wait_for_everyone()
