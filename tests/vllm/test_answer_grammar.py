"""The vLLM engine's answer grammar: the regex form of iqa.engines.constraint (no server needed)."""

from __future__ import annotations

import re

import pytest

from iqa.engines.vllm import answer_regex

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("profile", ["evoquality", "visualquality-r1"])
def test_answer_regex_accepts_exactly_the_answer_grammar(profile: str) -> None:
    score = re.compile(answer_regex(profile, "score", 48))  # type: ignore[arg-type]
    vote = re.compile(answer_regex(profile, "vote", 48))  # type: ignore[arg-type]
    box = "\\boxed{%s}" if profile == "evoquality" else "<answer>%s</answer>"
    for answer in ("1.00", "3.25", "4.99", "5.00"):
        assert score.fullmatch("some thinking</think>\n" + box % answer)
    for answer in ("5.01", "0.99", "3.5", "6.00", "3,25"):
        assert not score.fullmatch("x</think>\n" + box % answer)
    assert vote.fullmatch("</think>\n" + box % "0") and vote.fullmatch("why\n</think>\n" + box % "1")
    assert not vote.fullmatch("</think>\n" + box % "2")
    # The thinking is bounded so that the whole answer fits in max_tokens, for any tokenizer.
    assert not score.fullmatch("x" * 48 + "</think>\n" + box % "3.00")
