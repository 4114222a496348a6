"""Accuracy summaries over n sampled answers per problem: avg@n, pass@n, maj@n, format rate, each
with its standard error over problems (the spread a different draw of problems would give)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from opsd.verify import extract_answer, extract_boxed, extract_code, is_equivalent, score_response

# The verifier of a code row (opsd/assets/datasets.py, opsd.data): its gold is a test spec
# (opsd.sandbox.TestSpec as JSON), and a response's code is run with it in the sandbox.
CODE = "code"


@dataclass
class Graded:
    """One problem's n responses, graded."""

    uid: str
    answers: list[str | None]  # extracted \boxed{} content per response (None: no answer found)
    correct: list[bool]
    gold: str
    verifier: str | None = None  # a procedural task's own grader, when it is not math-verify


def reward(text: str, gold: str, mode: str = "strict", verifier: str | None = None, sandbox=None) -> float:
    """A response's reward: for a code row (``verifier`` "code") 1.0 when its code passes the
    tests in ``sandbox`` (opsd.sandbox.Sandbox); with a procedural task's ``verifier``
    (opsd/assets/procedural.py) that task's own grade of the extracted answer, which may be
    partial; otherwise :func:`opsd.verify.score_response` (1.0 or 0.0)."""
    if verifier == CODE:
        return rewards([text], [gold], mode, [verifier], sandbox)[0]
    if verifier is not None:
        from opsd.assets.procedural import score  # deferred: only procedural rows carry a verifier

        return score(verifier, extract_answer(text, mode))
    return score_response(text, gold, mode)


def run_code(responses: Sequence[str], golds: Sequence[str], sandbox) -> list:
    """Each response's code run with its row's tests (``golds``: TestSpec JSON) in ``sandbox``,
    its pool's size at a time: one opsd.sandbox.Verdict per response."""
    from opsd.sandbox import TestSpec  # deferred: only code rows run anything

    if sandbox is None:
        raise ValueError("a code row is graded by running its tests, which needs a sandbox (opsd.sandbox.Sandbox)")
    return sandbox.run_many([(extract_code(r), TestSpec.from_json(g)) for r, g in zip(responses, golds)])


def rewards(texts: Sequence[str], golds: Sequence[str | None], mode: str = "strict",
            verifiers: Sequence[str | None] | None = None, sandbox=None) -> list[float | None]:
    """:func:`reward` of each text (None where its gold is None); the code rows' programs run in
    ``sandbox`` together, in parallel."""
    verifiers = list(verifiers) if verifiers is not None else [None] * len(texts)
    out: list[float | None] = [None] * len(texts)
    code = [i for i, (g, v) in enumerate(zip(golds, verifiers)) if g is not None and v == CODE]
    if code:
        verdicts = run_code([texts[i] for i in code], [golds[i] for i in code], sandbox)
        for i, v in zip(code, verdicts):
            out[i] = 1.0 if v.passed else 0.0
    for i, (t, g, v) in enumerate(zip(texts, golds, verifiers)):
        if g is not None and v != CODE:
            out[i] = reward(t, g, mode, v)
    return out


def grade(uid: str, responses: Sequence[str], gold: str, extract: str = "strict", verifier: str | None = None,
          sandbox=None) -> Graded:
    """Each response's answer under ``extract`` (opsd.verify.EXTRACTORS), checked against ``gold``
    (or by a procedural task's ``verifier``); a code row's responses run with its tests in
    ``sandbox`` (the answer is the response's code)."""
    if verifier == CODE:
        verdicts = run_code(responses, [gold] * len(responses), sandbox)
        return Graded(uid, [extract_code(r) for r in responses], [v.passed for v in verdicts], gold, verifier)
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
    ``\\boxed{}`` (a code row's: a fenced code block), whatever extraction graded them; it needs
    ``responses`` unless the answers were extracted strictly (then an answer is a box)."""
    if not graded:
        raise ValueError("nothing to summarize: no graded problems")
    n = len(graded[0].correct)
    m = len(graded)
    if responses is None:
        boxed = [[a is not None for a in g.answers] for g in graded]
    else:
        boxed = [[a is not None for a in g.answers] if g.verifier == CODE else [extract_boxed(r) is not None for r in rs]
                 for g, rs in zip(graded, responses)]
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
