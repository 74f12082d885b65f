"""EvoQuality prompts and answer parsing (text exact: the released checkpoint was trained on it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from iqa.settings import PromptProfile

COMPARE_QUESTION = (
    "You are performing an image quality assessment task. Compare the two images and decide which one "
    "has better perceptual quality. Answer strictly with the index of the better image: 0 if the first "
    "image is better, or 1 if the second image is better."
)
SCORE_QUESTION = (
    "You are doing the image quality assessment task. Here is the question: What is your overall "
    "rating on the quality of this picture? The rating should be a float between 1 and 5, rounded to "
    "two decimal places, with 1 representing very poor quality and 5 representing excellent quality."
)
EVOQUALITY_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
    "BE put in \\boxed{}."
)
VISUALQUALITY_R1_SUFFIX = (
    "First output the thinking process in <think> </think> tags and then output the final answer with "
    "only one score in <answer> </answer> tags."
)

SCORE_MIN, SCORE_MAX = 1.0, 5.0

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*$")


@dataclass(frozen=True)
class PromptSet:
    """The question texts and answer format of one prompt profile."""

    profile: PromptProfile
    score_text: str
    compare_text: str


def prompt_set(profile: PromptProfile) -> PromptSet:
    """Score and compare texts for a profile (question followed by the reasoning suffix)."""
    suffix = EVOQUALITY_SUFFIX if profile == "evoquality" else VISUALQUALITY_R1_SUFFIX
    return PromptSet(profile, f"{SCORE_QUESTION} {suffix}", f"{COMPARE_QUESTION} {suffix}")


def chat_messages(text: str, n_images: int) -> list[dict]:
    """One user turn: the images first, then the text (as in the paper's prompts)."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def extract_answer(completion: str, profile: PromptProfile) -> str | None:
    """The content of the LAST answer container, or None when there is none."""
    pattern = _BOXED if profile == "evoquality" else _ANSWER
    found = pattern.findall(completion)
    return found[-1].strip() if found else None


def parse_score(completion: str, profile: PromptProfile = "evoquality") -> float | None:
    """A score clamped to [1, 5], or None when the completion has no parsable number."""
    answer = extract_answer(completion, profile)
    if answer is None:
        return None
    match = _NUMBER.match(answer)
    if not match:
        return None
    value = float(match.group(1))
    if not math.isfinite(value):
        return None
    return min(SCORE_MAX, max(SCORE_MIN, value))


def parse_vote(completion: str, profile: PromptProfile = "evoquality") -> int | None:
    """0 (first image better) or 1 (second better); anything else is None."""
    answer = extract_answer(completion, profile)
    if answer in ("0", "1"):
        return int(answer)
    return None


def reasoning_of(completion: str) -> str:
    """The text inside the last <think> ... </think>, else the whole completion."""
    found = re.findall(r"<think>(.*?)</think>", completion, re.DOTALL)
    return found[-1].strip() if found else completion.strip()
