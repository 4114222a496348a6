"""``kd``: off-policy distillation. OPSD's teacher and divergence along sequences the student did
not sample: the reference solution itself (``kd.source=reference``, nothing is generated) or
responses sampled from the teacher's context (``kd.source=teacher_samples``; the sampler is the
current weights, so they are the teacher's own only with teacher.mode=live)."""

from __future__ import annotations

from opsd.errors import ConfigError
from opsd.objectives.opsd import OPSD


class KD(OPSD):
    name = "kd"

    def responses(self, cfg):
        return "reference" if cfg.kd.source == "reference" else "teacher"

    def targets(self, cfg):
        return "topk"

    def needs(self, cfg):
        return frozenset({"solution"}) if cfg.kd.source == "reference" else frozenset()

    def check(self, cfg):
        if cfg.loss.objective != "divergence":
            raise ConfigError(
                f"config key 'loss.objective' = {cfg.loss.objective!r} with algo=kd: the sampled-token objective is a "
                "policy-gradient estimate that needs the student's own samples; off-policy distillation uses "
                "loss.objective=divergence (any loss.beta and loss.support)"
            )


OBJECTIVE = KD()
