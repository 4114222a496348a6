"""``grpo``: group-normalised rewards (``rollout.n`` samples per prompt, graded by the verifier) in a
PPO-clipped ratio, with an optional k3 KL penalty to the initial policy, whose log-probabilities a
scorer computes on the student's own prompt (``objectives.grpo.kl_coef > 0``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd.errors import ConfigError
from opsd.losses import grpo_terms, student_logprobs
from opsd.objectives.base import Objective, choice


@dataclass
class GrpoOptions:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # k3 penalty toward the initial policy (scored on the student's prompt)
    # The old policy of the clipped ratio: "learner" recomputes it with the learner, at
    # loss.temperature (which must then be rollout.temperature, the sampler's), so that on-policy
    # the ratio is exactly 1 and clipping never fires on engine noise; "rollout" takes vLLM's
    # logprobs (temperature 1), which corrects stale rollouts (rollout.max_staleness > 0) but also
    # carries the engines' mismatch.
    old_logprobs: str = "learner"


def check_ratio(cfg, obj: Objective) -> None:
    """The clipped ratio's old policy: the learner's own log-probs need the sampler's temperature
    and fresh rollouts; vLLM's (old_logprobs=rollout) are at temperature 1."""
    o, algo, key = obj.options(cfg), obj.name, obj.key("old_logprobs")
    choice(key, o.old_logprobs, ("learner", "rollout"))
    for name in ("clip_low", "clip_high", "kl_coef"):
        if getattr(o, name) < 0:
            raise ConfigError(f"config key '{obj.key(name)}' = {getattr(o, name)}; expected >= 0")
    if o.old_logprobs == "rollout" and cfg.loss.temperature != 1.0:
        raise ConfigError(
            f"config key 'loss.temperature' = {cfg.loss.temperature} with an importance ratio on the rollout "
            f"logprobs (algo={algo} with {key}=rollout): those are the policy's at temperature 1, so "
            "the ratio would not be 1 on-policy; use loss.temperature=1"
        )
    if o.old_logprobs == "learner":
        if cfg.loss.temperature != cfg.rollout.temperature:
            raise ConfigError(
                f"config key 'loss.temperature' = {cfg.loss.temperature} with algo={algo} and {key}="
                f"learner: the policy gradient is that of the sampler, so it must be rollout.temperature="
                f"{cfg.rollout.temperature}"
            )
        if cfg.rollout.max_staleness > 0:
            raise ConfigError(
                f"config key 'rollout.max_staleness' = {cfg.rollout.max_staleness} with algo={algo} and "
                f"{key}=learner: stale rollouts would be treated as on-policy; set "
                f"{key}=rollout (the ratio then corrects for the older weights; loss.temperature=1) "
                "or rollout.max_staleness=0"
            )
    if cfg.rollout.n < 2:
        raise ConfigError(f"config key 'rollout.n' must be >= 2 for algo={algo} (advantages are normalised per group)")


def ratio_loss(spec, logits, lp_sampled, t, advantages):
    """The clipped surrogate for ``advantages`` (``spec.options``: a GrpoOptions) and the
    statistics GRPO reports."""
    o = spec.options
    use_rollout = o.old_logprobs == "rollout" and t["rollout_logprobs"] is not None
    # The learner's own log-probs as the old policy: one update per batch, so they are those of
    # this very forward and the ratio is exactly 1 (the plain policy gradient).
    old = t["rollout_logprobs"] if use_rollout else lp_sampled.detach()
    loss, clipped = grpo_terms(lp_sampled, old, advantages, o.clip_low, o.clip_high, t["ref_logprobs"], o.kl_coef)
    parts = {"clipped_tokens": clipped}
    if t["rollout_logprobs"] is not None:
        # The sampler against this learner, both at temperature 1: |logp_vllm - logp_learner|,
        # and the tokens a ratio taken against the sampler's logprobs would clip.
        with torch.no_grad():
            at_one = lp_sampled if spec.temperature == 1.0 else student_logprobs(logits, 1.0).gather(
                -1, t["sampled_ids"].long().unsqueeze(-1)).squeeze(-1)
            rollout = t["rollout_logprobs"].to(at_one.dtype)
            parts["mismatch_sum"] = (rollout - at_one).abs()
            ratio = torch.exp(at_one - rollout)
            parts["rollout_clipped_tokens"] = (ratio < 1.0 - o.clip_low) | (ratio > 1.0 + o.clip_high)
    return loss, parts


class GRPO(Objective):
    name = "grpo"
    groups = True
    Options = GrpoOptions

    def teacher(self, cfg):
        # The scorer is the frozen initial policy on the student's own prompt, for the KL term.
        return "reference" if self.options(cfg).kl_coef > 0 else None

    def needs(self, cfg):
        return frozenset({"answer"})

    def check(self, cfg):
        check_ratio(cfg, self)
        if self.options(cfg).kl_coef > 0 and cfg.teacher.mode != "fixed":
            raise ConfigError(
                f"config key 'teacher.mode' = {cfg.teacher.mode!r} with algo=grpo and {self.key('kl_coef')} > 0: "
                "GRPO's KL reference is the initial policy; use teacher.mode=fixed"
            )

    def fields(self, spec):
        return ("advantages",)

    def inputs(self, spec, batch):
        found = {"rollout_logprobs": batch.column("rollout_logprobs", torch.float32)}
        # Its own reference only: in a composite the batch's teacher may be another parent's.
        if spec.options.kl_coef > 0 and batch.has_teacher:
            # The reference policy's sampled-token logprobs: the KL term, and kl_sampled.
            found["teacher_logprobs"] = found["ref_logprobs"] = batch.column("teacher_token_logprobs", torch.float32)
        return found

    def stat_names(self, spec, present):
        return ["clipped_tokens"] + (["mismatch_sum", "rollout_clipped_tokens"] if "rollout_logprobs" in present else [])

    def loss(self, spec, logits, logp, lp_sampled, t):
        return ratio_loss(spec, logits, lp_sampled, t, t["advantages"])

    def advantage(self, spec, lp_sampled, t):
        return t["advantages"].to(lp_sampled.dtype)

    def row(self, stats, tokens):
        out = {"clip_frac": stats["clipped_tokens"] / tokens}
        if "mismatch_sum" in stats:
            out["engine_mismatch"] = stats["mismatch_sum"] / tokens
            out["clip_frac_rollout"] = stats["rollout_clipped_tokens"] / tokens
        return out


OBJECTIVE = GRPO()
