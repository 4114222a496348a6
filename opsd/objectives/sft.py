"""``sft``: cross-entropy on the reference solutions (nothing is sampled, no teacher)."""

from __future__ import annotations

from opsd.objectives.base import Objective


class SFT(Objective):
    name = "sft"

    def responses(self, cfg):
        return "reference"

    def needs(self, cfg):
        return frozenset({"solution"})

    def loss(self, spec, logits, logp, lp_sampled, t):
        return -lp_sampled, {}


OBJECTIVE = SFT()
