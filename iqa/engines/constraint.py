"""Constrained decoding that makes every completion end in a parsable answer.

An untrained model (the demo model) almost never writes `\\boxed{3.25}` by chance, so its scores would
all be unparsable. With the constraint on, the model thinks freely (end-of-text is masked) until it
opens the answer container itself or its token budget runs out; then the container is opened for it,
the answer is restricted to the answer grammar (`[1-5].dd` for a score, `0|1` for a vote), the
container is closed and the sequence ends. It is a transformers `LogitsProcessor`; vLLM gets the
same effect from `structured_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from iqa.engines.base import AnswerKind
from iqa.settings import PromptProfile

_CONTAINERS: dict[str, tuple[str, str]] = {
    "evoquality": ("\\boxed{", "}"),
    "visualquality-r1": ("<answer>", "</answer>"),
}


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"constrained answers need {text!r} to be one token; it is {ids}")
    return ids[0]


@dataclass
class AnswerGrammar:
    """Token ids of the answer format of one prompt profile and answer kind."""

    open_text: str
    open_ids: list[int]  # forced when the budget ends: close the thinking, open the container
    answer_steps: list[list[int]]  # allowed token ids at each answer position
    close_ids: list[int]
    eos_ids: list[int]
    top_id: int | None = None  # a score that starts with this digit ('5') may only continue with zeros
    zero_id: int | None = None

    @classmethod
    def build(cls, tokenizer, profile: PromptProfile, kind: AnswerKind, eos_ids: list[int]) -> AnswerGrammar:
        open_text, close_text = _CONTAINERS[profile]
        digits = [_single_token(tokenizer, str(d)) for d in range(10)]
        if kind == "score":
            steps = [digits[1:6], [_single_token(tokenizer, ".")], digits, digits]
        else:
            steps = [digits[0:2]]
        return cls(
            open_text=open_text,
            open_ids=tokenizer.encode(f"</think>\n{open_text}", add_special_tokens=False),
            answer_steps=steps,
            close_ids=tokenizer.encode(close_text, add_special_tokens=False),
            eos_ids=eos_ids,
            top_id=digits[5] if kind == "score" else None,
            zero_id=digits[0],
        )

    @property
    def min_tokens(self) -> int:
        """The shortest budget that still fits the forced answer (opening, answer, closing, end)."""
        return len(self.open_ids) + len(self.answer_steps) + len(self.close_ids) + 1

    def allowed(self, position: int, first: int | None) -> list[int]:
        """Token ids allowed at answer `position`, given the answer's first token (scores stay <= 5)."""
        if first is not None and first == self.top_id and position >= 2:
            return [self.zero_id]  # type: ignore[list-item]
        return self.answer_steps[position]


@dataclass
class _RowState:
    tail: str = ""
    forced: list[int] = field(default_factory=list)  # ids still to force, in order
    answer_pos: int | None = None  # position in the answer grammar once the container is open
    first: int | None = None  # the answer's first token
    done: bool = False


class AnswerConstraint(LogitsProcessor):
    """Per-row state machine over generated tokens; one instance per `generate` call."""

    def __init__(self, grammar: AnswerGrammar, token_texts: list[str], max_new_tokens: int) -> None:
        self.grammar = grammar
        self.token_texts = token_texts
        self.think_budget = max(0, max_new_tokens - grammar.min_tokens)
        self.prompt_len: int | None = None
        self.rows: list[_RowState] = []

    def _advance(self, row: _RowState, token: int) -> None:
        if row.done:
            return
        if row.forced:
            row.forced.pop(0)
            if not row.forced and row.answer_pos is None:
                row.answer_pos = 0
            elif not row.forced:
                row.done = True
            return
        if row.answer_pos is not None:
            if row.answer_pos == 0:
                row.first = token
            row.answer_pos += 1
            if row.answer_pos == len(self.grammar.answer_steps):
                row.forced = list(self.grammar.close_ids)
            return
        row.tail = (row.tail + self.token_texts[token])[-32:]
        if row.tail.endswith(self.grammar.open_text):
            row.answer_pos = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            self.rows = [_RowState() for _ in range(input_ids.shape[0])]
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                self._advance(row, token)
        generated = input_ids.shape[1] - self.prompt_len
        mask = torch.full_like(scores, float("-inf"))
        for i, row in enumerate(self.rows):
            if row.done:
                allowed = self.grammar.eos_ids
            elif row.forced:
                allowed = row.forced[:1]
            elif row.answer_pos is not None:
                allowed = self.grammar.allowed(row.answer_pos, row.first)
            elif generated >= self.think_budget:
                row.forced = list(self.grammar.open_ids)
                allowed = row.forced[:1]
            else:
                mask[i] = 0
                mask[i, self.grammar.eos_ids] = float("-inf")
                continue
            mask[i, allowed] = 0
        return scores + mask
