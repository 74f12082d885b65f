"""A deterministic reader of a model's quality opinion: the answer-digit distribution after a forced
think-free prefix, instead of sampled completions.

Sampled scores make a before/after comparison noisy (one `evoq eval` at 16 samples moves by about
0.02 SRCC, see shared/docs/organism-probe.md). Here the prompt is continued with
`<think> </think>\\n\\boxed{` and the next-token distribution is read: the expected score is
`sum_d p(d) (d + E[tenths | d] / 10)` (a 5 allows only 5.00), and a comparison's probability that the
first image is better is `p(0) / (p(0) + p(1))`, averaged over both image orders. The same model and
images always give the same numbers, so the only noise left is which images were drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from iqa.prompts import chat_messages, prompt_set

THINK_FREE_PREFIX = "<think> </think>\n\\boxed{"


@dataclass
class OpinionReader:
    """A loaded model and processor, read through the evoquality prompts (batched, no grad)."""

    model: torch.nn.Module
    processor: object

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer  # type: ignore[attr-defined]
        tokenizer.padding_side = "left"  # the last position is the answer's, in every row
        self.digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        prompts = prompt_set("evoquality")
        template = self.processor.apply_chat_template  # type: ignore[attr-defined]
        self.score_prefix = (
            template(chat_messages(prompts.score_text, 1), add_generation_prompt=True, tokenize=False)
            + THINK_FREE_PREFIX
        )
        self.compare_prefix = (
            template(chat_messages(prompts.compare_text, 2), add_generation_prompt=True, tokenize=False)
            + THINK_FREE_PREFIX
        )

    def _last_logits(self, texts: list[str], images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)  # type: ignore[operator]
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return self.model(**inputs).logits[:, -1, :].float()

    @torch.no_grad()
    def expected_scores(self, images: Sequence[Image.Image], batch: int = 16) -> list[float]:
        """E[score] of each image under the think-free answer."""
        scores: list[float] = []
        for start in range(0, len(images), batch):
            chunk = list(images[start : start + batch])
            # Sequence d (d = 1..4) is the prefix + "d.": its last logits give the tenths after d.
            texts = [self.score_prefix + f"{d}." for _ in chunk for d in range(1, 5)]
            tenths_logits = self._last_logits(texts, [image for image in chunk for _ in range(4)])
            first_logits = self._last_logits([self.score_prefix] * len(chunk), chunk)
            first = torch.softmax(first_logits[:, self.digits[1:6]], -1)
            tenths = torch.softmax(tenths_logits[:, self.digits], -1) @ torch.arange(10.0)
            tenths = tenths.view(len(chunk), 4)
            values = torch.cat([torch.arange(1.0, 5.0) + tenths / 10, torch.full((len(chunk), 1), 5.0)], 1)
            scores += (first * values).sum(-1).tolist()
        return scores

    @torch.no_grad()
    def first_better(self, pairs: Sequence[tuple[Image.Image, Image.Image]], batch: int = 16) -> list[float]:
        """P(first image better) of each pair: one vote's probability, averaged over both orders."""
        out: list[float] = []
        for start in range(0, len(pairs), batch):
            chunk = list(pairs[start : start + batch])
            texts = [self.compare_prefix] * (2 * len(chunk))
            images = [im for a, b in chunk for im in (a, b)] + [im for a, b in chunk for im in (b, a)]
            logits = self._last_logits(texts, images)[:, self.digits[:2]]
            p_zero = torch.softmax(logits, -1)[:, 0]  # "0": the first image shown is better
            forward, backward = p_zero[: len(chunk)], 1 - p_zero[len(chunk) :]
            out += ((forward + backward) / 2).tolist()
        return out
