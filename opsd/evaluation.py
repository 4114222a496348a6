"""Accuracy summaries over n sampled answers per problem: avg@n, pass@n, maj@n, format rate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from opsd.verify import extract_boxed, is_equivalent


@dataclass
class Graded:
    """One problem's n responses, graded."""

    uid: str
    answers: list[str | None]  # extracted \boxed{} content per response (None: no answer found)
    correct: list[bool]
    gold: str


def grade(uid: str, responses: Sequence[str], gold: str) -> Graded:
    answers = [extract_boxed(r) for r in responses]
    return Graded(uid, answers, [is_equivalent(a, gold) if a is not None else False for a in answers], gold)


def _vote_key(answer: str) -> str:
    # All whitespace, not just spaces: "\\boxed{\n8\n}" is a vote for "8".
    return "".join(answer.split())


def majority_correct(g: Graded) -> bool:
    """The most frequent extracted answer (ties: the one seen first) checked against the gold.

    Answers are grouped by their whitespace-stripped text; equivalent spellings of one value
    ("0.5", "1/2") count as different votes, as in most published maj@n numbers.
    """
    found = [_vote_key(a) for a in g.answers if a is not None]
    if not found:
        return False
    top = Counter(found).most_common(1)[0][0]
    for a, ok in zip(g.answers, g.correct):
        if a is not None and _vote_key(a) == top:
            return ok
    return False


def summarize(graded: Sequence[Graded]) -> dict[str, float]:
    if not graded:
        raise ValueError("nothing to summarize: no graded problems")
    n = len(graded[0].correct)
    m = len(graded)
    return {
        "problems": m,
        "n": n,
        f"avg@{n}": sum(sum(g.correct) / len(g.correct) for g in graded) / m,
        f"pass@{n}": sum(any(g.correct) for g in graded) / m,
        f"maj@{n}": sum(majority_correct(g) for g in graded) / m,
        "format_rate": sum(sum(a is not None for a in g.answers) / len(g.answers) for g in graded) / m,
    }
