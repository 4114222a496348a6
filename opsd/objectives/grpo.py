"""``grpo``: group-normalised rewards (``rollout.n`` samples per prompt, graded by the verifier) in a
PPO-clipped ratio, with an optional k3 KL penalty to the initial policy, whose log-probabilities a
scorer computes on the student's own prompt (``loss.kl_coef > 0``)."""

from __future__ import annotations

import torch

from opsd.errors import ConfigError
from opsd.losses import grpo_terms, student_logprobs
from opsd.objectives.base import Objective


def check_ratio(cfg, algo: str) -> None:
    """The clipped ratio's old policy: the learner's own log-probs need the sampler's temperature
    and fresh rollouts; vLLM's (loss.old_logprobs=rollout) are at temperature 1."""
    if cfg.loss.old_logprobs == "rollout" and cfg.loss.temperature != 1.0:
        raise ConfigError(
            f"config key 'loss.temperature' = {cfg.loss.temperature} with an importance ratio on the rollout "
            f"logprobs (algo={algo} with loss.old_logprobs=rollout): those are the policy's at temperature 1, so "
            "the ratio would not be 1 on-policy; use loss.temperature=1"
        )
    if cfg.loss.old_logprobs == "learner":
        if cfg.loss.temperature != cfg.rollout.temperature:
            raise ConfigError(
                f"config key 'loss.temperature' = {cfg.loss.temperature} with algo={algo} and loss.old_logprobs="
                f"learner: the policy gradient is that of the sampler, so it must be rollout.temperature="
                f"{cfg.rollout.temperature}"
            )
        if cfg.rollout.max_staleness > 0:
            raise ConfigError(
                f"config key 'rollout.max_staleness' = {cfg.rollout.max_staleness} with algo={algo} and "
                "loss.old_logprobs=learner: stale rollouts would be treated as on-policy; set "
                "loss.old_logprobs=rollout (the ratio then corrects for the older weights; loss.temperature=1) "
                "or rollout.max_staleness=0"
            )
    if cfg.rollout.n < 2:
        raise ConfigError(f"config key 'rollout.n' must be >= 2 for algo={algo} (advantages are normalised per group)")


def ratio_loss(spec, logits, lp_sampled, t, advantages):
    """The clipped surrogate for ``advantages`` and the statistics GRPO reports."""
    use_rollout = spec.old_logprobs == "rollout" and t["rollout_logprobs"] is not None
    # The learner's own log-probs as the old policy: one update per batch, so they are those of
    # this very forward and the ratio is exactly 1 (the plain policy gradient).
    old = t["rollout_logprobs"] if use_rollout else lp_sampled.detach()
    loss, clipped = grpo_terms(lp_sampled, old, advantages, spec.clip_low, spec.clip_high, t["ref_logprobs"],
                               spec.kl_coef)
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
            parts["rollout_clipped_tokens"] = (ratio < 1.0 - spec.clip_low) | (ratio > 1.0 + spec.clip_high)
    return loss, parts


class GRPO(Objective):
    name = "grpo"
    groups = True

    def teacher(self, cfg):
        # The scorer is the frozen initial policy on the student's own prompt, for the KL term.
        return "reference" if cfg.loss.kl_coef > 0 else None

    def needs(self, cfg):
        return frozenset({"answer"})

    def check(self, cfg):
        check_ratio(cfg, self.name)
        if cfg.loss.kl_coef > 0 and cfg.teacher.mode != "fixed":
            raise ConfigError(
                f"config key 'teacher.mode' = {cfg.teacher.mode!r} with algo=grpo and loss.kl_coef > 0: GRPO's KL "
                "reference is the initial policy; use teacher.mode=fixed"
            )

    def fields(self, spec):
        return ("advantages",)

    def inputs(self, spec, batch):
        found = {"rollout_logprobs": batch.column("rollout_logprobs", torch.float32)}
        if batch.has_teacher:
            # The reference policy's sampled-token logprobs: the KL term, and kl_sampled.
            found["teacher_logprobs"] = found["ref_logprobs"] = batch.column("teacher_token_logprobs", torch.float32)
        return found

    def stat_names(self, spec, present):
        return ["clipped_tokens"] + (["mismatch_sum", "rollout_clipped_tokens"] if "rollout_logprobs" in present else [])

    def loss(self, spec, logits, logp, lp_sampled, t):
        return ratio_loss(spec, logits, lp_sampled, t, t["advantages"])

    def row(self, stats, tokens):
        out = {"clip_frac": stats["clipped_tokens"] / tokens}
        if "mismatch_sum" in stats:
            out["engine_mismatch"] = stats["mismatch_sum"] / tokens
            out["clip_frac_rollout"] = stats["rollout_clipped_tokens"] / tokens
        return out


OBJECTIVE = GRPO()
