"""``kd``: off-policy distillation. OPSD's teacher and divergence along sequences the student did
not sample: the reference solution itself (``objectives.kd.source=reference``, nothing is generated)
or responses sampled from the teacher's context (``source=teacher_samples``; the sampler is the
current weights, so they are the teacher's own only with teacher.mode=live). Its options are
OPSD's and ``source``; the anchor (``objectives.kd.anchor``) is then a per-token penalty along those
sequences, not an estimate of KL(p_S || p_ref), which needs the student's own samples."""

from __future__ import annotations

from dataclasses import dataclass

from opsd.errors import ConfigError
from opsd.objectives.base import choice
from opsd.objectives.opsd import OPSD, OpsdOptions

SOURCES = ("reference", "teacher_samples")


@dataclass
class KdOptions(OpsdOptions):
    # reference: the reference solution itself, teacher-forced (nothing is generated);
    # teacher_samples: responses the rollout workers sample from the teacher prompt, i.e. the
    # current weights reading the solution (with teacher.mode=live they are the teacher's own
    # samples; with fixed or ema the sampler is the live model)
    source: str = "reference"


class KD(OPSD):
    name = "kd"
    Options = KdOptions

    def responses(self, cfg):
        return "reference" if self.options(cfg).source == "reference" else "teacher"

    def targets(self, cfg):
        return "topk"

    def needs(self, cfg):
        return frozenset({"solution"}) if self.options(cfg).source == "reference" else frozenset()

    def check(self, cfg):
        super().check(cfg)
        o = self.options(cfg)
        choice(self.key("source"), o.source, SOURCES)
        if o.objective != "divergence":
            raise ConfigError(
                f"config key '{self.key('objective')}' = {o.objective!r} with algo=kd: the sampled-token objective is a "
                "policy-gradient estimate that needs the student's own samples; off-policy distillation uses "
                "objective=divergence (any beta and support)"
            )


OBJECTIVE = KD()
