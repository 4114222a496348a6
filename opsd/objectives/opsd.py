"""``opsd``: on-policy self-distillation (arXiv 2601.18734). The student samples; the teacher's
targets along those samples come from the teacher context (``teacher.context``, by default the
reference solution), and the loss is a divergence over the teacher's top-k
(``objectives.opsd.objective=divergence``, with ``beta``, ``support``) or the sampled-token policy
gradient with the teacher's log-probability as the reward (``objective=sampled_token``).

With ``anchor = c > 0`` (StableOPD, arXiv 2604.08527) each token's loss also gets a KL anchor to
the initial policy, c * k3, with k3 = exp(d) - d - 1 and d = log p_ref(y_t) - log p_S(y_t): GRPO's
k3 estimator of KL(p_S || p_ref), where p_ref is the initial policy on the student's own prompt,
scored as the named context ``anchor`` by the scorer's frozen weights (teacher.mode=fixed), both at
loss.temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from opsd.errors import ConfigError
from opsd.losses import CLIP_MODES, OBJECTIVES, SUPPORTS, divergence_from_logprobs, k3, sampled_token_loss
from opsd.objectives.base import Objective, choice

ANCHOR = "anchor"  # the named context of the initial policy on the student's prompt


@dataclass
class OpsdOptions:
    objective: str = "divergence"  # divergence | sampled_token
    # 0 forward KL(p_T || p_S) (mode covering: the guard against length inflation that arXiv
    # 2605.16826 reports), 1 reverse KL, in between the generalized JSD.
    beta: float = 0.5
    support: str = "topk"  # topk | topk_tail
    token_clip: Optional[float] = None  # caps each token's loss (its gradient is then removed)
    # The per-token divergence clip of the OPSD authors' code (March 2026): pointwise caps each
    # vocabulary term of a token's divergence before the sum (their form); scale caps the token's
    # divergence by scaling it, keeping a smaller gradient (opsd/losses.py divergence_from_logprobs).
    divergence_clip: Optional[float] = None
    divergence_clip_mode: str = "pointwise"  # pointwise | scale
    is_clip: Optional[float] = None  # sampled_token: truncated importance ratio against the sampler
    anchor: float = 0.0  # weight of the KL anchor to the initial policy (0: none)


class OPSD(Objective):
    name = "opsd"
    Options = OpsdOptions
    # Its advantage is the sampled-token log-ratio alone: no divergence, clip or anchor.
    advantage_ignores = ("beta", "support", "token_clip", "divergence_clip", "divergence_clip_mode", "is_clip",
                         "anchor")

    def teacher(self, cfg):
        return "context"

    def targets(self, cfg):
        return "topk" if self.options(cfg).objective == "divergence" else "token"

    def reference_contexts(self, cfg):
        return (ANCHOR,) if self.options(cfg).anchor > 0 else ()

    def check(self, cfg):
        o = self.options(cfg)
        choice(self.key("objective"), o.objective, OBJECTIVES)
        choice(self.key("support"), o.support, SUPPORTS)
        choice(self.key("divergence_clip_mode"), o.divergence_clip_mode, CLIP_MODES)
        if not 0.0 <= o.beta <= 1.0:
            raise ConfigError(f"config key '{self.key('beta')}' = {o.beta}; expected 0 <= beta <= 1 (0 forward KL, "
                              "1 reverse KL)")
        for name in ("token_clip", "divergence_clip", "is_clip"):
            value = getattr(o, name)
            if value is not None and value <= 0:
                raise ConfigError(f"config key '{self.key(name)}' = {value}; expected a positive number or null")
        if o.anchor < 0:
            raise ConfigError(f"config key '{self.key('anchor')}' = {o.anchor}; expected >= 0")
        if o.anchor > 0 and cfg.teacher.mode != "fixed":
            # The anchor is scored by the scorer's weights; only a fixed teacher keeps the initial ones.
            raise ConfigError(
                f"config key 'teacher.mode' = {cfg.teacher.mode!r} with {self.key('anchor')} = {o.anchor}: the anchor "
                "is the initial policy, scored by the scorer's weights, which are the initial ones only with "
                f"teacher.mode=fixed; use teacher.mode=fixed or {self.key('anchor')}=0"
            )
        if o.objective == "sampled_token" and o.is_clip is not None and cfg.loss.temperature != 1.0:
            raise ConfigError(
                f"config key 'loss.temperature' = {cfg.loss.temperature} with an importance ratio on the rollout "
                f"logprobs ({self.key('is_clip')}): those are the policy's at temperature 1, so the ratio would not "
                "be 1 on-policy; use loss.temperature=1"
            )

    def _ratio(self, o) -> bool:
        return o.objective == "sampled_token" and o.is_clip is not None

    def fields(self, spec):
        o = spec.options
        anchor = ("anchor_logprobs",) if o.anchor > 0 else ()
        if o.objective == "divergence":
            return ("topk_ids", "topk_logprobs") + anchor
        return ("teacher_logprobs",) + (("rollout_logprobs",) if self._ratio(o) else ()) + anchor

    def inputs(self, spec, batch):
        o = spec.options
        # The teacher's sampled-token logprobs also give kl_sampled (and a composite's advantage).
        found = {"teacher_logprobs": batch.column("teacher_token_logprobs", torch.float32)}
        if o.objective == "divergence":
            found["topk_ids"] = batch.column("teacher_topk_ids", torch.long)
            found["topk_logprobs"] = batch.column("teacher_topk_logprobs", torch.float32)
        elif self._ratio(o):
            found["rollout_logprobs"] = batch.column("rollout_logprobs", torch.float32)
        if o.anchor > 0:
            found["anchor_logprobs"] = batch.column(f"teacher_token_logprobs:{ANCHOR}", torch.float32)
        return found

    def stat_names(self, spec, present):
        o = spec.options
        return (["clipped_tokens"] if o.token_clip is not None else []) + (["anchor_kl_sum"] if o.anchor > 0 else [])

    def loss(self, spec, logits, logp, lp_sampled, t):
        o = spec.options
        if o.objective == "divergence":
            loss = divergence_from_logprobs(logp, t["topk_ids"], t["topk_logprobs"], o.beta, o.support,
                                            clip=o.divergence_clip, clip_mode=o.divergence_clip_mode)
        else:
            loss = sampled_token_loss(lp_sampled, t["teacher_logprobs"], t["rollout_logprobs"], is_clip=o.is_clip)
        parts = {}
        if o.token_clip is not None:
            parts["clipped_tokens"] = loss.detach() > o.token_clip
            loss = loss.clamp(max=o.token_clip)
        if o.anchor > 0:
            kl = k3(t["anchor_logprobs"].to(lp_sampled.dtype), lp_sampled)
            parts["anchor_kl_sum"] = kl.detach()
            loss = loss + o.anchor * kl
        return loss, parts

    def advantage(self, spec, lp_sampled, t):
        # The sampled-token objective's: log p_T(y_t) - log p_S(y_t), both at loss.temperature.
        return (t["teacher_logprobs"].to(lp_sampled.dtype) - lp_sampled).detach()

    def row(self, stats, tokens):
        out = {"clip_frac": stats["clipped_tokens"] / tokens} if "clipped_tokens" in stats else {}
        if "anchor_kl_sum" in stats:
            out["anchor_kl"] = stats["anchor_kl_sum"] / tokens
        return out


OBJECTIVE = OPSD()
