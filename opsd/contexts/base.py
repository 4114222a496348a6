"""What a teacher context is given and what it returns (docs/DESIGN.md, "Teacher contexts").

A teacher context decides what privileged information the teacher reads besides the problem: the
reference solution (OPSD), its final answer, nothing, another problem's solution (OP²SD), the
majority answer of the student's own samples (U-OPSD), or several contexts at once, a correct one
and wrong ones (RLCSD). It is one module of this package holding a subclass of
:class:`TeacherContext` and one line of the registry (``opsd.contexts.CONTEXTS``).

Given a :class:`ContextInput` (the problem with its solution and answer when the dataset has them,
the step's group of student samples of that prompt, and a deterministic view of the rest of the
dataset) it returns the teacher's chat messages for each named context it makes; ``"teacher"`` is
the primary one, whose targets every teacher-scoring objective reads. A context that does not use
the samples is built once per problem, before the run starts (and its prompt lengths are checked
then); one that does is built by the pipeline after the rollouts of each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from opsd.data import Problem

PRIMARY = "teacher"

Messages = list[dict]


@dataclass(frozen=True)
class GroupSample:
    """One of the step's samples of the prompt, as a context may read it."""

    text: str
    answer: str | None  # its final answer under grading.extract; None when it wrote none
    reward: float | None  # the verifier's grade against the dataset's answer; None without one
    tokens: int


@dataclass(frozen=True)
class ContextInput:
    problem: Problem
    # The step's samples of this prompt (empty for a context that does not use them), and which
    # of them the context is being built for (None: the same context for every sample).
    group: tuple[GroupSample, ...] = ()
    index: int | None = None
    # The rest of the dataset, deterministically: other(k) is the k-th other problem assigned to
    # this one (never itself, never one with the same text), fixed for the run's seed.
    other: Callable[[int], Problem] | None = None
    seed: int = 0  # the run's seed mixed with the step and the prompt, for deterministic choices


@dataclass(frozen=True)
class Templates:
    """The run's prompt templates, as a context renders a hint with them (opsd/prompts.py makes
    them from the prompt config)."""

    student: Callable[..., Messages]  # problem[, task] -> the student's messages
    # problem, hint[, task] -> the teacher's messages: the hint fills prompt.teacher_template's or
    # prompt.teacher_system's {solution}; the task (opsd.data.TASKS) picks the student's instruction
    teacher: Callable[..., Messages]


class TeacherContext:
    name = ""
    uses_samples = False  # built after the rollout, from the prompt's group of samples
    # Row tasks (opsd.data.TASKS) the context has no meaning for, each with why: a run whose
    # training rows include one is refused before it starts (opsd validate, opsd train), naming
    # teacher.context and the reason.
    refused_tasks: Mapping[str, str] = MappingProxyType({})

    def names(self, cfg: Any) -> tuple[str, ...]:
        """The named contexts it makes, the primary first."""
        return (PRIMARY,)

    def needs(self, cfg: Any) -> frozenset[str]:
        """What every dataset row must hold: "solution", "answer"."""
        return frozenset()

    def check(self, cfg: Any) -> None:
        """Raise opsd.errors.ConfigError, naming the key, for a combination that cannot run."""

    def note(self, cfg: Any) -> str | None:
        """A warning for a combination that runs but likely not as meant, else None."""
        return None

    def build(self, cfg: Any, item: ContextInput, templates: Templates) -> dict[str, Messages | None]:
        """The teacher's messages per named context. None for a context that does not apply to
        this sample (a wrong context with no wrong sibling to take it from); None for the primary
        one leaves the sample out of the loss (a prompt whose samples do not agree enough)."""
        raise NotImplementedError


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def deterministic_pick(options: Sequence[Any], seed: int, salt: str) -> Any:
    """One of ``options``, the same for the same (seed, salt) in every process and run."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


__all__ = ["PRIMARY", "ContextInput", "GroupSample", "Messages", "Problem", "Templates", "TeacherContext",
           "boxed", "deterministic_pick"]


class DatasetView:
    """The rest of the training set, as a context may read it: for each problem, its k-th other
    problem (``other(uid)(k)``), fixed for the run's seed. The others are taken in one seeded
    permutation of the set, after the problem itself, skipping any of the same text: never the
    problem, and the same donor on every run, process and resume with that seed (OP²SD fixes one
    donor per row, from its seed)."""

    def __init__(self, problems: Sequence[Problem], seed: int):
        import numpy as np

        self.problems = list(problems)
        self.order = [int(i) for i in np.random.default_rng([seed, 1729]).permutation(len(self.problems))]
        self.position = {self.problems[i].uid: at for at, i in enumerate(self.order)}

    def other(self, uid: str) -> Callable[[int], Problem]:
        def kth(k: int) -> Problem:
            me = self.problems[self.order[self.position[uid]]]
            found = 0
            for step in range(1, len(self.order)):
                candidate = self.problems[self.order[(self.position[uid] + step) % len(self.order)]]
                if candidate.problem.strip() == me.problem.strip():
                    continue
                if found == k:
                    return candidate
                found += 1
            raise ValueError(f"problem {uid}: the training set has fewer than {k + 1} other problems of another text")

        return kth
