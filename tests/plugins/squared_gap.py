"""A teacher context and an objective outside opsd, as a user would write them: each is this file
and a name in the config (``teacher.context=tests.plugins.squared_gap:CONTEXT``,
``algo=tests.plugins.squared_gap:OBJECTIVE``), with no change to the driver, the scorer or the
learner.

The context gives the teacher the first sentence of the reference solution. The objective is the
squared gap between the student's and the teacher's log-probability of each sampled token, times
its one option, ``objectives.squared_gap.scale`` (declared below, as an opsd objective declares
its own), so that a composite (``algo=mix``) can be shown to read a plug-in's options too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd.contexts.base import PRIMARY, TeacherContext
from opsd.objectives.base import Objective


def first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + dot.strip()


class FirstSentence(TeacherContext):
    name = "first_sentence"

    def needs(self, cfg):
        return frozenset({"solution"})

    def build(self, cfg, item, templates):
        return {PRIMARY: templates.teacher(item.problem.problem, first_sentence(item.problem.solution))}


@dataclass
class SquaredGapOptions:
    scale: float = 1.0


class SquaredGap(Objective):
    name = "squared_gap"
    Options = SquaredGapOptions

    def teacher(self, cfg):
        return "context"

    def fields(self, spec):
        return ("teacher_logprobs",)

    def inputs(self, spec, batch):
        return {"teacher_logprobs": batch.column("teacher_token_logprobs", torch.float32)}

    def stat_names(self, spec, present):
        return ["gap_sum"]

    def loss(self, spec, logits, logp, lp_sampled, t):
        gap = (lp_sampled - t["teacher_logprobs"].to(lp_sampled.dtype)) ** 2
        return spec.options.scale * gap, {"gap_sum": gap.detach()}

    def row(self, stats, tokens):
        return {"gap_mean": stats["gap_sum"] / tokens}


CONTEXT = FirstSentence()
OBJECTIVE = SquaredGap()
