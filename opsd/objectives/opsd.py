"""``opsd``: on-policy self-distillation (arXiv 2601.18734). The student samples; the teacher's
targets along those samples come from the teacher context (``teacher.context``, by default the
reference solution), and the loss is a divergence over the teacher's top-k (``loss.objective=
divergence``, with ``loss.beta``, ``loss.support``) or the sampled-token policy gradient with the
teacher's log-probability as the reward (``loss.objective=sampled_token``)."""

from __future__ import annotations

import torch

from opsd.errors import ConfigError
from opsd.losses import divergence_from_logprobs, sampled_token_loss
from opsd.objectives.base import Objective


class OPSD(Objective):
    name = "opsd"

    def teacher(self, cfg):
        return "context"

    def targets(self, cfg):
        return "topk" if cfg.loss.objective == "divergence" else "token"

    def check(self, cfg):
        if cfg.loss.objective == "sampled_token" and cfg.loss.is_clip is not None and cfg.loss.temperature != 1.0:
            raise ConfigError(
                f"config key 'loss.temperature' = {cfg.loss.temperature} with an importance ratio on the rollout "
                "logprobs (loss.is_clip): those are the policy's at temperature 1, so the ratio would not be 1 "
                "on-policy; use loss.temperature=1"
            )

    def _ratio(self, spec) -> bool:
        return spec.objective == "sampled_token" and spec.is_clip is not None

    def fields(self, spec):
        if spec.objective == "divergence":
            return ("topk_ids", "topk_logprobs")
        return ("teacher_logprobs",) + (("rollout_logprobs",) if self._ratio(spec) else ())

    def inputs(self, spec, batch):
        # The teacher's sampled-token logprobs also give kl_sampled.
        found = {"teacher_logprobs": batch.column("teacher_token_logprobs", torch.float32)}
        if spec.objective == "divergence":
            found["topk_ids"] = batch.column("teacher_topk_ids", torch.long)
            found["topk_logprobs"] = batch.column("teacher_topk_logprobs", torch.float32)
        elif self._ratio(spec):
            found["rollout_logprobs"] = batch.column("rollout_logprobs", torch.float32)
        return found

    def stat_names(self, spec, present):
        return ["clipped_tokens"] if spec.token_clip is not None else []

    def loss(self, spec, logits, logp, lp_sampled, t):
        if spec.objective == "divergence":
            loss = divergence_from_logprobs(logp, t["topk_ids"], t["topk_logprobs"], spec.beta, spec.support,
                                            clip=spec.divergence_clip, clip_mode=spec.divergence_clip_mode)
        else:
            loss = sampled_token_loss(lp_sampled, t["teacher_logprobs"], t["rollout_logprobs"], is_clip=spec.is_clip)
        parts = {}
        if spec.token_clip is not None:
            parts["clipped_tokens"] = loss.detach() > spec.token_clip
            loss = loss.clamp(max=spec.token_clip)
        return loss, parts

    def row(self, stats, tokens):
        return {"clip_frac": stats["clipped_tokens"] / tokens} if "clipped_tokens" in stats else {}


OBJECTIVE = OPSD()
