"""Prompt texts against the spec, character for character, and answer parsing (last container wins)."""

from __future__ import annotations

import pytest

from iqa.prompts import (
    COMPARE_QUESTION,
    EVOQUALITY_SUFFIX,
    SCORE_QUESTION,
    chat_messages,
    extract_answer,
    parse_score,
    parse_vote,
    prompt_set,
    reasoning_of,
)

# Copied verbatim from shared/docs/evoquality.md ("Prompts (exact text matters ...)").
SPEC_SUFFIX = (
    r"You FIRST think about the reasoning process as an internal monologue and then provide the final "
    r"answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    r"The final answer MUST BE put in \boxed{}."
)
SPEC_COMPARE = (
    "You are performing an image quality assessment task. Compare the two images and decide which one has "
    "better perceptual quality. Answer strictly with the index of the better image: 0 if the first image is "
    "better, or 1 if the second image is better."
)
SPEC_SCORE = (
    "You are doing the image quality assessment task. Here is the question: What is your overall rating on "
    "the quality of this picture? The rating should be a float between 1 and 5, rounded to two decimal "
    "places, with 1 representing very poor quality and 5 representing excellent quality."
)


def boxed(content: str) -> str:
    return f"<think>looked closely</think> \\boxed{{{content}}}"


# ---- prompt texts ---------------------------------------------------------------------------------


def test_question_and_suffix_constants_match_the_spec_exactly() -> None:
    assert SCORE_QUESTION == SPEC_SCORE
    assert COMPARE_QUESTION == SPEC_COMPARE
    assert EVOQUALITY_SUFFIX == SPEC_SUFFIX
    assert "\\boxed{}" in EVOQUALITY_SUFFIX  # one backslash, as the model was trained on


def test_evoquality_prompts_are_the_question_then_the_suffix() -> None:
    prompts = prompt_set("evoquality")
    assert prompts.profile == "evoquality"
    assert prompts.score_text == f"{SPEC_SCORE} {SPEC_SUFFIX}"
    assert prompts.compare_text == f"{SPEC_COMPARE} {SPEC_SUFFIX}"


def test_visualquality_r1_prompts_keep_the_questions_and_ask_for_answer_tags() -> None:
    prompts = prompt_set("visualquality-r1")
    assert prompts.score_text.startswith(f"{SPEC_SCORE} ")
    assert prompts.compare_text.startswith(f"{SPEC_COMPARE} ")
    for text in (prompts.score_text, prompts.compare_text):
        assert "<answer> </answer>" in text
        assert "<think> </think>" in text
        assert "boxed" not in text


def test_chat_turn_has_the_images_first_then_the_text() -> None:
    assert chat_messages("rate it", 2) == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "rate it"}],
        }
    ]
    assert chat_messages("rate it", 1)[0]["content"][0] == {"type": "image"}


# ---- score parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (boxed("4.5"), 4.5),
        (boxed("3.25"), 3.25),
        (boxed(" 2.75 "), 2.75),
        (boxed("4"), 4.0),
        (boxed("1"), 1.0),
        (boxed("5"), 5.0),
        (boxed("7"), 5.0),  # clamped to the top
        (boxed("0.2"), 1.0),  # clamped to the bottom
        (boxed("-3"), 1.0),
        (boxed("100.00"), 5.0),
    ],
)
def test_score_is_a_float_clamped_to_one_to_five(completion: str, expected: float) -> None:
    assert parse_score(completion) == expected


def test_the_last_box_wins() -> None:
    assert parse_score("\\boxed{2} then I changed my mind: \\boxed{3.5} and finally \\boxed{4.25}") == 4.25
    assert parse_score("first \\boxed{4.00}\n<think>hmm</think>\\boxed{1.50}") == 1.5


def test_an_unparsable_last_box_is_not_replaced_by_an_earlier_one() -> None:
    assert parse_score("\\boxed{3.5} ... \\boxed{abc}") is None
    assert parse_score("\\boxed{3.5} ... \\boxed{}") is None


@pytest.mark.parametrize(
    "completion",
    [
        "no answer at all",
        "",
        "<think>thinking</think> 3.5",  # a number, but not in a box
        "\\boxed{}",  # empty
        "\\boxed{   }",
        "\\boxed{\\text{4}}",  # nested braces
        "\\boxed{{4}}",
        "\\boxed{4.5",  # never closed
        "\\boxed 4.5",
        "<answer>4.5</answer>",  # the other profile's container
        boxed("abc"),
        boxed("nan"),
        boxed("NaN"),
        boxed("inf"),
        boxed("-inf"),
        boxed("infinity"),
        boxed("4.5 stars"),
        boxed("3/5"),
        boxed("4,5"),
    ],
)
def test_unparsable_scores_are_none(completion: str) -> None:
    assert parse_score(completion) is None


# ---- vote parsing ---------------------------------------------------------------------------------


def test_votes_are_exactly_zero_or_one() -> None:
    assert parse_vote(boxed("0")) == 0
    assert parse_vote(boxed("1")) == 1
    assert parse_vote("\\boxed{1} no wait \\boxed{0}") == 0


@pytest.mark.parametrize(
    "answer", ["2", "-1", "0.0", "1.0", "01", "10", "0.5", "first", "a", "", "true", "0 or 1", "nan"]
)
def test_anything_else_is_not_a_vote(answer: str) -> None:
    assert parse_vote(boxed(answer)) is None


def test_missing_or_superseded_votes_are_none() -> None:
    assert parse_vote("the first one is better") is None
    assert parse_vote("\\boxed{0} ... \\boxed{2}") is None  # the last box decides, and it is no vote


# ---- the visualquality-r1 profile -----------------------------------------------------------------


def test_visualquality_r1_parses_the_last_answer_tag() -> None:
    profile = "visualquality-r1"
    assert parse_score("<think>sharp</think><answer>3.75</answer>", profile) == 3.75
    assert parse_score("<answer>2</answer> then <answer> 4.5 </answer>", profile) == 4.5
    assert parse_score("<answer>9</answer>", profile) == 5.0
    assert parse_score("<answer>0.1</answer>", profile) == 1.0
    assert parse_score("<answer>\n4.25\n</answer>", profile) == 4.25
    assert parse_vote("<think>a</think><answer>1</answer>", profile) == 1
    assert parse_vote("<answer>0</answer>", profile) == 0


@pytest.mark.parametrize(
    "completion",
    ["\\boxed{3.5}", "<answer>nan</answer>", "<answer>inf</answer>", "<answer></answer>", "<answer>3.5"],
)
def test_visualquality_r1_rejects_other_containers_and_non_numbers(completion: str) -> None:
    assert parse_score(completion, "visualquality-r1") is None
    assert parse_vote(completion, "visualquality-r1") is None


def test_extract_answer_and_reasoning() -> None:
    assert extract_answer("\\boxed{ 3 }", "evoquality") == "3"
    assert extract_answer("<answer> 3 </answer>", "visualquality-r1") == "3"
    assert extract_answer("nothing", "evoquality") is None
    assert reasoning_of("<think> blurry edges </think> \\boxed{2}") == "blurry edges"
    assert reasoning_of("  no tags  ") == "no tags"
