"""AnswerConstraint / AnswerGrammar on the demo tokenizer, driven step by step like `generate` drives them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from iqa.engines.constraint import AnswerConstraint, AnswerGrammar
from iqa.prompts import parse_score, parse_vote

PROMPT_LEN = 7
PROFILES = ["evoquality", "visualquality-r1"]


@pytest.fixture(scope="module")
def eos_ids(demo_model_dir: Path) -> list[int]:
    return list(GenerationConfig.from_pretrained(demo_model_dir).eos_token_id)


@pytest.fixture(scope="module")
def token_texts(demo_tokenizer) -> list[str]:
    return [demo_tokenizer.decode([i]) for i in range(len(demo_tokenizer))]


def one(tokenizer, text: str) -> int:
    [token] = tokenizer.encode(text, add_special_tokens=False)
    return token


class Driver:
    """Feeds a constraint as `generate` would: per step, logits in, masked logits out, one token chosen.

    Each row "wants" to write its script (when the constraint allows the next token of it), else the
    filler token `a` while thinking, else the best allowed token under random logits.
    """

    def __init__(self, constraint: AnswerConstraint, tokenizer, scripts: list[list[int]], seed: int = 0):
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.scripts = [list(s) for s in scripts]
        self.filler = one(tokenizer, "a")
        self.generator = torch.Generator().manual_seed(seed)
        self.ids = torch.full((len(scripts), PROMPT_LEN), tokenizer.pad_token_id, dtype=torch.long)
        self.allowed: list[list[set[int]]] = [[] for _ in scripts]  # per row, per step

    def step(self) -> None:
        scores = torch.randn(self.ids.shape[0], self.vocab, generator=self.generator)
        out = self.constraint(self.ids, scores.clone())
        chosen = []
        for i, row in enumerate(out):
            finite = torch.isfinite(row)
            allowed = set(finite.nonzero().flatten().tolist())
            assert allowed, "every row must keep at least one token"
            assert torch.equal(row[finite], scores[i][finite]), "allowed logits must pass unchanged"
            self.allowed[i].append(allowed)
            script = self.scripts[i]
            if script and script[0] in allowed:
                chosen.append(script.pop(0))
            elif self.filler in allowed and not script:
                chosen.append(self.filler)
            else:
                chosen.append(int(row.argmax()))
        self.ids = torch.cat([self.ids, torch.tensor(chosen)[:, None]], dim=1)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def generated(self, row: int = 0) -> list[int]:
        return self.ids[row, PROMPT_LEN:].tolist()

    def text(self, row: int = 0, eos_ids: list[int] = ()) -> str:
        return self.tokenizer.decode([t for t in self.generated(row) if t not in eos_ids])


def grammar_for(tokenizer, profile: str, kind: str, eos_ids: list[int]) -> AnswerGrammar:
    return AnswerGrammar.build(tokenizer, profile, kind, eos_ids)


def reserve(grammar: AnswerGrammar) -> int:
    return len(grammar.open_ids) + len(grammar.answer_steps) + len(grammar.close_ids) + 1


# ---- the grammar ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "open_text", "close_text"),
    [("evoquality", "</think>\n\\boxed{", "}"), ("visualquality-r1", "</think>\n<answer>", "</answer>")],
)
def test_grammar_tokens(demo_tokenizer, eos_ids, profile: str, open_text: str, close_text: str) -> None:
    digit = [one(demo_tokenizer, str(d)) for d in range(10)]
    score = grammar_for(demo_tokenizer, profile, "score", eos_ids)
    assert demo_tokenizer.decode(score.open_ids) == open_text
    assert demo_tokenizer.decode(score.close_ids) == close_text
    assert score.answer_steps == [digit[1:6], [one(demo_tokenizer, ".")], digit, digit]
    assert score.eos_ids == eos_ids

    vote = grammar_for(demo_tokenizer, profile, "vote", eos_ids)
    assert vote.answer_steps == [digit[0:2]]
    assert vote.top_id is None
    assert vote.allowed(0, digit[0]) == digit[0:2]


# ---- thinking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["score", "vote"])
def test_eos_is_masked_while_thinking_and_nothing_else_is(demo_tokenizer, token_texts, eos_ids, kind) -> None:
    grammar = grammar_for(demo_tokenizer, "evoquality", kind, eos_ids)
    driver = Driver(AnswerConstraint(grammar, token_texts, 48), demo_tokenizer, [[], []], seed=3)
    driver.run(20)
    everything_but_eos = set(range(len(demo_tokenizer))) - set(eos_ids)
    for row in range(2):
        assert all(allowed == everything_but_eos for allowed in driver.allowed[row])
        assert not set(driver.generated(row)) & set(eos_ids)


# ---- the forced tail ------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kind", ["score", "vote"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_after_the_budget_the_answer_is_forced_and_the_sequence_ends(
    demo_tokenizer, token_texts, eos_ids, profile: str, kind: str, seed: int
) -> None:
    max_new = 30
    grammar = grammar_for(demo_tokenizer, profile, kind, eos_ids)
    driver = Driver(AnswerConstraint(grammar, token_texts, max_new), demo_tokenizer, [[]], seed=seed)
    driver.run(max_new)

    budget = max_new - reserve(grammar)
    out = driver.generated()
    n_open, n_answer, n_close = len(grammar.open_ids), len(grammar.answer_steps), len(grammar.close_ids)
    assert out[:budget] == [driver.filler] * budget  # free thinking up to the budget
    assert out[budget : budget + n_open] == grammar.open_ids  # then the container is opened for it
    answer = out[budget + n_open : budget + n_open + n_answer]
    close_at = budget + n_open + n_answer
    assert out[close_at : close_at + n_close] == grammar.close_ids
    assert out[close_at + n_close] in eos_ids  # ends right after the answer, within max_new tokens
    assert len(out) == max_new

    # every forced step allowed exactly one token; every answer step only the grammar's tokens
    steps = driver.allowed[0]
    for k in [*range(budget, budget + n_open), *range(close_at, close_at + n_close)]:
        assert len(steps[k]) == 1
    for position, token in enumerate(answer):
        assert token in grammar.answer_steps[position]
    assert steps[close_at + n_close] == set(eos_ids)

    text = driver.text(eos_ids=eos_ids)
    if kind == "score":
        assert 1.0 <= parse_score(text, profile) <= 5.0
    else:
        assert parse_vote(text, profile) in (0, 1)


def test_the_smallest_budget_that_holds_the_answer_still_completes_it(
    demo_tokenizer, token_texts, eos_ids
) -> None:
    grammar = grammar_for(demo_tokenizer, "evoquality", "score", eos_ids)
    max_new = reserve(grammar) - 1  # room for the forced tail, not for end-of-text
    driver = Driver(AnswerConstraint(grammar, token_texts, max_new), demo_tokenizer, [[]])
    driver.run(max_new)
    assert driver.generated()[: len(grammar.open_ids)] == grammar.open_ids  # no thinking at all
    assert parse_score(driver.text(eos_ids=eos_ids)) is not None


# ---- the model opens the container itself ---------------------------------------------------------


@pytest.mark.parametrize("by_characters", [False, True])
def test_the_model_opening_boxed_itself_starts_the_answer(
    demo_tokenizer, token_texts, eos_ids, by_characters: bool
) -> None:
    grammar = grammar_for(demo_tokenizer, "evoquality", "score", eos_ids)
    opening = (
        demo_tokenizer.convert_tokens_to_ids(list("\\boxed{"))
        if by_characters
        else demo_tokenizer.encode("\\boxed{", add_special_tokens=False)
    )
    script = demo_tokenizer.encode(" sharp ", add_special_tokens=False) + opening
    script += [one(demo_tokenizer, c) for c in "4.25"]
    driver = Driver(AnswerConstraint(grammar, token_texts, 48), demo_tokenizer, [script])
    driver.run(len(script) + 2)

    digits_1_to_5 = {one(demo_tokenizer, str(d)) for d in range(1, 6)}
    opened = len(script) - 4  # the step right after `{`
    assert driver.allowed[0][opened] == digits_1_to_5  # long before the budget
    assert driver.allowed[0][len(script)] == set(grammar.close_ids[:1])
    assert driver.allowed[0][len(script) + 1] == set(eos_ids)
    text = driver.text(eos_ids=eos_ids)
    assert text == " sharp \\boxed{4.25}"  # no forced `</think>`: the model's own box is the answer
    assert parse_score(text) == 4.25


def test_the_model_opening_answer_tag_itself_in_the_r1_profile(demo_tokenizer, token_texts, eos_ids) -> None:
    grammar = grammar_for(demo_tokenizer, "visualquality-r1", "vote", eos_ids)
    script = demo_tokenizer.encode("<think>b</think><answer>", add_special_tokens=False)
    driver = Driver(
        AnswerConstraint(grammar, token_texts, 48), demo_tokenizer, [[*script, one(demo_tokenizer, "1")]]
    )
    driver.run(len(script) + 1 + len(grammar.close_ids) + 1)
    assert driver.allowed[0][len(script)] == {one(demo_tokenizer, "0"), one(demo_tokenizer, "1")}
    assert driver.text(eos_ids=eos_ids) == "<think>b</think><answer>1</answer>"
    assert driver.generated()[-1] in eos_ids


def test_a_box_mentioned_in_the_other_profile_does_not_open_the_answer(
    demo_tokenizer, token_texts, eos_ids
) -> None:
    grammar = grammar_for(demo_tokenizer, "visualquality-r1", "score", eos_ids)
    script = demo_tokenizer.encode("\\boxed{", add_special_tokens=False)
    driver = Driver(AnswerConstraint(grammar, token_texts, 48), demo_tokenizer, [script])
    driver.run(len(script) + 1)
    assert driver.allowed[0][len(script)] == set(range(len(demo_tokenizer))) - set(eos_ids)


# ---- the score grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wants", "written"), [("599", "5.00"), ("500", "5.00"), ("499", "4.99"), ("107", "1.07")]
)
def test_scores_stay_within_one_to_five(
    demo_tokenizer, token_texts, eos_ids, wants: str, written: str
) -> None:
    grammar = grammar_for(demo_tokenizer, "evoquality", "score", eos_ids)
    opening = demo_tokenizer.encode("\\boxed{", add_special_tokens=False)
    script = [
        *opening,
        one(demo_tokenizer, wants[0]),
        one(demo_tokenizer, "."),
        *(one(demo_tokenizer, c) for c in wants[1:]),
    ]
    driver = Driver(AnswerConstraint(grammar, token_texts, 48), demo_tokenizer, [script])
    driver.run(len(script) + 2)

    steps = driver.allowed[0][len(opening) : len(opening) + 4]
    digits = {one(demo_tokenizer, str(d)) for d in range(10)}
    assert steps[0] == {one(demo_tokenizer, str(d)) for d in range(1, 6)}
    assert steps[1] == {one(demo_tokenizer, ".")}
    if wants[0] == "5":
        assert steps[2] == steps[3] == {one(demo_tokenizer, "0")}  # 5 may only continue with zeros
    else:
        assert steps[2] == steps[3] == digits
    assert driver.text(eos_ids=eos_ids) == f"\\boxed{{{written}}}"


# ---- several rows ---------------------------------------------------------------------------------


def test_rows_are_independent(demo_tokenizer, token_texts, eos_ids) -> None:
    max_new = 40
    grammar = grammar_for(demo_tokenizer, "evoquality", "vote", eos_ids)
    early = demo_tokenizer.encode("\\boxed{0", add_special_tokens=False)
    driver = Driver(AnswerConstraint(grammar, token_texts, max_new), demo_tokenizer, [early, []])
    driver.run(max_new)

    finished = len(early) + len(grammar.close_ids)  # row 0 is done here and may only end
    everything_but_eos = set(range(len(demo_tokenizer))) - set(eos_ids)
    assert all(a == set(eos_ids) for a in driver.allowed[0][finished:])
    assert all(a == everything_but_eos for a in driver.allowed[1][:finished])  # row 1 still thinks
    assert driver.text(0, eos_ids) == "\\boxed{0}"
    budget = max_new - reserve(grammar)
    assert driver.generated(1)[budget : budget + len(grammar.open_ids)] == grammar.open_ids
    assert parse_vote(driver.text(1, eos_ids)) in (0, 1)
