"""Accuracy summaries over n sampled answers per problem: avg@n, pass@n, maj@n, format rate, each
with its standard error over problems (the spread a different draw of problems would give)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from opsd.verify import extract_answer, extract_boxed, is_equivalent, score_response


@dataclass
class Graded:
    """One problem's n responses, graded."""

    uid: str
    answers: list[str | None]  # extracted \boxed{} content per response (None: no answer found)
    correct: list[bool]
    gold: str
    verifier: str | None = None  # a procedural task's own grader, when it is not math-verify


def reward(text: str, gold: str, mode: str = "strict", verifier: str | None = None) -> float:
    """A response's reward: with a procedural task's ``verifier`` (opsd/assets/procedural.py) that
    task's own grade of the extracted answer, which may be partial; otherwise
    :func:`opsd.verify.score_response` (1.0 or 0.0)."""
    if verifier is not None:
        from opsd.assets.procedural import score  # deferred: only procedural rows carry a verifier

        return score(verifier, extract_answer(text, mode))
    return score_response(text, gold, mode)


def grade(uid: str, responses: Sequence[str], gold: str, extract: str = "strict", verifier: str | None = None) -> Graded:
    """Each response's answer under ``extract`` (opsd.verify.EXTRACTORS), checked against ``gold``
    (or by a procedural task's ``verifier``)."""
    answers = [extract_answer(r, extract) for r in responses]
    if verifier is not None:
        return Graded(uid, answers, [reward(r, gold, extract, verifier) == 1.0 for r in responses], gold,
                      verifier)
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


def mean_accuracy(graded: Sequence[Graded]) -> float:
    """avg@n: the fraction of correct answers, averaged over problems."""
    return sum(sum(g.correct) / len(g.correct) for g in graded) / len(graded)


def standard_error(per_problem: Sequence[float]) -> float:
    """The standard error of the mean of per-problem scores (sample standard deviation / sqrt m;
    for 0/1 scores sqrt(p (1 - p) / m) up to the m / (m - 1) correction); 0 for one problem."""
    m = len(per_problem)
    if m < 2:
        return 0.0
    mean = sum(per_problem) / m
    return math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (m - 1) / m)


def summarize(graded: Sequence[Graded], responses: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """avg@n, pass@n, maj@n of ``graded``, and their standard errors (``avg@n_se``, ...): over
    problems, each problem's score (its fraction of correct answers, whether any is correct,
    whether the majority is) counts once. The format rate counts responses with a closed
    ``\\boxed{}``, whatever extraction graded them; it needs ``responses`` unless the answers were
    extracted strictly (then an answer is a box)."""
    if not graded:
        raise ValueError("nothing to summarize: no graded problems")
    n = len(graded[0].correct)
    m = len(graded)
    if responses is None:
        boxed = [[a is not None for a in g.answers] for g in graded]
    else:
        boxed = [[extract_boxed(r) is not None for r in rs] for rs in responses]
    scores = {
        f"avg@{n}": [sum(g.correct) / len(g.correct) for g in graded],
        f"pass@{n}": [float(any(g.correct)) for g in graded],
        f"maj@{n}": [float(majority_correct(g)) for g in graded],
    }
    out: dict[str, float] = {"problems": m, "n": n}
    for key, per_problem in scores.items():
        out[key] = sum(per_problem) / m
        out[f"{key}_se"] = standard_error(per_problem)
    out["format_rate"] = sum(sum(b) / len(b) for b in boxed) / m
    return out
