"""``contrastive``: RLCSD (arXiv 2606.11709). GRPO's group advantage, modulated token by token by
how much more the teacher expects the sampled token under the correct hint than under wrong
ones (``teacher.context=contrastive``, opsd/contexts/contrastive.py):

    e_t  = log p_T(y_t | correct) - log( (1/K) sum_k p_T(y_t | wrong_k) )   (K: this sample's wrong contexts)
    r_t  = lambda * tanh(e_t / tau),  used where |r_t| > delta
    A~_t = A + r_t, then clamped to A's sign (A > 0: >= 0; A < 0: <= 0; A = 0: 0)
    loss = GRPO's clipped surrogate with A~_t in place of A

so the verifier still decides the direction of every update and the teachers' contrast only
redistributes credit among a sample's tokens. tau, lambda, delta: ``objectives.contrastive.tau``
(0.02), ``.scale`` (0.5), ``.threshold`` (0.02), RLCSD's shipped values; the ratio's options are
GRPO's (``clip_low``, ``clip_high``, ``kl_coef``, ``old_logprobs``), in this objective's section.

Deviations from RLCSD, stated in docs/RESULTS.md: one global token mean over all tokens instead
of two separately normalised means (modulated and not); a sample with no wrong context keeps
A (RLCSD drops such groups, whose A is 0 anyway when all are wrong); the teacher is opsd's
teacher.mode (RLCSD refreshes a snapshot every 10 steps); the correct hint is the reference
solution (RLCSD's gt_cot source) by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opsd.errors import ConfigError
from opsd.objectives.base import Objective
from opsd.objectives.grpo import GrpoOptions, check_ratio, ratio_loss


@dataclass
class ContrastiveOptions(GrpoOptions):
    tau: float = 0.02
    scale: float = 0.5
    threshold: float = 0.02

WRONG = "wrong_"


def contrast(correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """e_t from the correct context's logprob [N] and the wrong contexts' [N, K] (NaN where a
    context is absent for the sample); 0 where none is present."""
    valid = ~torch.isnan(wrong)
    count = valid.sum(-1)
    logmean = torch.logsumexp(torch.where(valid, wrong, torch.full_like(wrong, -math.inf)), dim=-1) - torch.log(
        count.clamp_min(1).to(wrong.dtype))
    return torch.where(count > 0, correct - logmean, torch.zeros_like(correct))


def modulated_advantages(advantages: torch.Tensor, credit: torch.Tensor, *, tau: float, scale: float,
                         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A~ and the mask of the tokens the credit moved: |r| > threshold where A != 0 (where A = 0 the
    clamp keeps A~ at 0, so nothing can move; before issue 36 those tokens were counted too)."""
    r = scale * torch.tanh(credit / tau)
    moved = (r.abs() > threshold) & (advantages != 0)
    a = advantages + torch.where(moved, r, torch.zeros_like(r))
    a = torch.where(advantages > 0, a.clamp_min(0.0), torch.where(advantages < 0, a.clamp_max(0.0), torch.zeros_like(a)))
    return a, moved


class Contrastive(Objective):
    name = "contrastive"
    groups = True
    Options = ContrastiveOptions

    def teacher(self, cfg):
        return "context"

    def contexts(self, cfg):
        return (WRONG + "*",)

    def needs(self, cfg):
        return frozenset({"answer"})

    def check(self, cfg):
        check_ratio(cfg, self)
        from opsd.contexts import context

        if not any(n.startswith(WRONG) for n in context(cfg.teacher.context).names(cfg)):
            raise ConfigError(f"algo=contrastive reads wrong teacher contexts ({WRONG}0, ...), which "
                              f"teacher.context={cfg.teacher.context!r} does not make; use teacher.context=contrastive")
        o = self.options(cfg)
        for key in ("tau", "scale"):
            if not getattr(o, key) > 0:
                raise ConfigError(f"config key '{self.key(key)}' = {getattr(o, key)}; expected > 0")

    def fields(self, spec):
        return ("advantages", "contrast")

    def inputs(self, spec, batch):
        correct = batch.column("teacher_token_logprobs", torch.float32)
        names = [n for n in batch.contexts if n.startswith(WRONG)]
        wrong = torch.stack([batch.column(f"teacher_token_logprobs:{n}", torch.float32) for n in names], dim=-1) \
            if names else torch.full((correct.shape[0], 1), math.nan)
        return {"teacher_logprobs": correct, "rollout_logprobs": batch.column("rollout_logprobs", torch.float32),
                "contrast": contrast(correct, wrong)}

    def stat_names(self, spec, present):
        return ["clipped_tokens", "moved_tokens", "movable_tokens", "contrast_sum"]

    def loss(self, spec, logits, logp, lp_sampled, t):
        advantages, moved = self._advantages(spec, t)
        loss, parts = ratio_loss(spec, logits, lp_sampled, t, advantages)
        return loss, {"clipped_tokens": parts["clipped_tokens"], "moved_tokens": moved,
                      "movable_tokens": t["advantages"] != 0, "contrast_sum": t["contrast"]}

    def _advantages(self, spec, t):
        o = spec.options
        return modulated_advantages(t["advantages"], t["contrast"], tau=o.tau, scale=o.scale, threshold=o.threshold)

    def advantage(self, spec, lp_sampled, t):
        return self._advantages(spec, t)[0].to(lp_sampled.dtype)

    def row(self, stats, tokens):
        # moved_frac: of the tokens whose advantage is not 0 (the only ones the credit can move), the
        # share it moved; None on a step where every advantage is 0. movable_frac: their share.
        movable = stats["movable_tokens"]
        return {"clip_frac": stats["clipped_tokens"] / tokens,
                "moved_frac": stats["moved_tokens"] / movable if movable else None,
                "movable_frac": movable / tokens, "contrast_mean": stats["contrast_sum"] / tokens}


OBJECTIVE = Contrastive()
