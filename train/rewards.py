"""Rewards: the final answer in `\\boxed{}` after the end-of-thinking marker, checked for value.

Only the solution (the text after the marker) is searched, so an answer buried in the thinking
earns nothing: that is the point of training under a thinking budget. Extraction and
equivalence live in `elastic_decode.utils.answers` (shared with majority voting and evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass

from elastic_decode.utils.answers import answers_match, extract_boxed, is_number, normalize_answer, to_sympy  # noqa: F401


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    formatted: bool  # a \boxed{} answer was found after the marker
    answer: str | None  # what was extracted


def score_math(solution_text: str, gold: str, format_weight: float) -> Score:
    """Accuracy (1 if the boxed answer equals `gold`) plus `format_weight` if an answer was boxed.

    A numeric gold answer needs a number: `\\boxed{65 + 73}` has the value of 138 but only
    restates the question (a budget GRPO run learned exactly that), so it earns no accuracy.
    """
    answer = extract_boxed(solution_text)
    correct = answers_match(answer, gold) and (not is_number(gold) or is_number(answer))
    formatted = answer is not None
    return Score(reward=float(correct) + format_weight * float(formatted), correct=correct, formatted=formatted, answer=answer)
