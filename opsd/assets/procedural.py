"""Procedural reasoning tasks: ``data.train_path: reasoning_gym:<task>`` (the optional extra
``pip install -e '.[tasks]'``, the PyPI package reasoning-gym, Apache-2.0).

A task's problems and answers are generated from a seed; each problem is graded by the task's own
verifier (``score_answer``), not by math-verify. Parts, never sharing a seed: ``reasoning_gym:<task>``
(2,000 problems, seed 0, for training), ``reasoning_gym:<task>:val`` (200, seed 1) and
``reasoning_gym:<task>:test`` (400, seed 2). Most tasks give an answer and no worked solution: the
teacher then reads the answer (``teacher.context=answer``). A task whose entries carry a worked
solution (gsm_symbolic's ``answer_cot``, written as GSM8K writes its solutions) gives it as the row's
``solution``, so that the teacher can read it (``teacher.context=solution``).

A row's ``verifier`` says where its problem came from (``reasoning_gym:<task>:<seed>:<size>:<index>``),
so that any process can regenerate the entry and grade against it.
"""

from __future__ import annotations

import functools
from typing import Any

from opsd.data import PROCEDURAL_PREFIX, DataError, gsm8k_solution, parse_verifier

PARTS = {"train": (0, 2000), "val": (1, 200), "test": (2, 400)}


class TaskError(ValueError):
    """A procedural task that cannot be made or graded; the message names it and says what to do."""


def _gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise TaskError("reasoning_gym tasks need the optional extra: pip install -e '.[tasks]' (the PyPI package "
                        "reasoning-gym)") from None
    return reasoning_gym


@functools.lru_cache(maxsize=16)
def _dataset(task: str, seed: int, size: int) -> Any:
    gym = _gym()
    try:
        return gym.create_dataset(task, seed=seed, size=size)
    except (KeyError, ValueError) as exc:
        raise TaskError(f"reasoning_gym has no task {task!r} ({exc}); one of: "
                        f"{', '.join(sorted(gym.factory.DATASETS)[:12])}, ...") from None


def parse(name: str) -> tuple[str, str] | None:
    """``reasoning_gym:<task>[:<part>]`` -> (task, part), or None for any other name."""
    prefix, sep, rest = name.partition(":")
    if prefix != PROCEDURAL_PREFIX or not sep:
        return None
    task, _, part = rest.partition(":")
    part = part or "train"
    if not task or part not in PARTS:
        raise TaskError(f"data set {name!r}: expected reasoning_gym:<task>[:{'|'.join(PARTS)}]")
    return task, part


def rows(task: str, part: str) -> list[dict]:
    """A part of a task as rows of opsd's data format; a ``solution`` only where the task writes one."""
    seed, size = PARTS[part]
    data = _dataset(task, seed, size)
    out = []
    for i in range(size):
        entry = data[i]
        row = {"id": f"{PROCEDURAL_PREFIX}/{task}/{part}/{i}", "problem": entry["question"],
               "answer": str(entry["answer"]), "verifier": f"{PROCEDURAL_PREFIX}:{task}:{seed}:{size}:{i}"}
        solution = worked_solution(entry)
        if solution is not None:
            row["solution"] = solution
        out.append(row)
    return out


def worked_solution(entry: dict) -> str | None:
    """The entry's worked solution as a teacher reads it (GSM8K's form: the working, then "The
    answer is \\boxed{N}."), or None when the task writes none or its answer is not the entry's."""
    cot = (entry.get("metadata") or {}).get("answer_cot")
    parsed = gsm8k_solution(cot) if isinstance(cot, str) else None
    answer = str(entry["answer"]).strip()
    if parsed is None or not _same_number(parsed[1], answer):
        return None
    working, _, _ = parsed[0].rpartition("\n")
    # The entry's own answer on the last line ("#### 36.0" grades as the answer "36").
    return f"{working}\nThe answer is \\boxed{{{answer}}}." if working else f"The answer is \\boxed{{{answer}}}."


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False


def score(verifier: str, answer: str | None) -> float:
    """The task's own verifier on ``answer`` (a response's extracted answer)."""
    try:
        task, seed, size, index = parse_verifier(verifier)
    except DataError as exc:
        raise TaskError(str(exc)) from None
    data = _dataset(task, seed, size)
    entry = data[index]
    if answer is None:
        return 0.0
    return float(data.score_answer(answer=answer.strip(), entry=entry))
