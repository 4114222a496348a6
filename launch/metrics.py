"""The metrics row of a step (one JSON object per step in ``metrics.jsonl``; launch/loggers.py writes
it) and the summary line a run ends with."""

from __future__ import annotations

from dataclasses import dataclass

from opsd.batch import Sample
from opsd.config import Config
from opsd.diagnostics import mean_repeated_ngram_rate, stop_metrics
from opsd.objectives import objective

METRIC_FIELDS = (
    "step", "policy_version", "teacher_version", "loss", "kl_sampled", "grad_norm", "lr", "reward_mean",
    "response_len_mean", "truncated_frac", "tokens_generated", "tokens_generated_total", "samples",
    "dropped_stale", "rollout_seconds", "score_seconds", "train_seconds", "sync_seconds", "step_seconds",
    "update_skipped", "no_loss_tokens", "score_overlapped", "sync_in_place", "sync_mb",
    # collapse diagnostics (opsd/diagnostics.py)
    "repeated_ngram_rate", "stop_prob_student_truncated", "stop_prob_teacher_truncated", "stop_gap_truncated",
    "stop_prob_student_finished", "stop_prob_teacher_finished", "stop_gap_finished",
)


@dataclass
class StepFacts:
    """What the step knows besides the learner's statistics."""

    step: int
    policy_version: int
    teacher_version: int
    tokens_total: int  # generated so far in the run, this step included
    dropped: int  # rollouts too stale for this step
    generated: bool  # False: the responses were reference solutions (nothing sampled)
    seconds: dict[str, float]  # rollout, score, train, sync
    score_overlapped: bool
    sync_in_place: bool
    skipped: int = 0  # samples left out of the loss: their teacher context did not apply
    sync_mb: float = 0.0  # what the step's push moved to each receiver


def step_row(cfg: Config, samples: list[Sample], stats: dict, facts: StepFacts) -> dict:
    """The metrics row: the learner's summed statistics divided by the loss tokens, the samples'
    rewards and lengths, and the stage times."""
    tokens = max(stats["tokens"], 1.0)
    n = max(len(samples), 1)
    resp_tokens = sum(len(s.response_ids) for s in samples)
    graded = all(s.reward is not None for s in samples)
    row = {
        "step": facts.step, "policy_version": facts.policy_version, "teacher_version": facts.teacher_version,
        "loss": stats["loss_sum"] / tokens,
        # Mean of log p_S - log p_T over sampled tokens: on-policy, an estimate of KL(p_S || p_T).
        # Missing (None), not 0, on a step with no loss token (every sample left out by its context).
        "kl_sampled": -stats["kl_sampled_sum"] / tokens if "kl_sampled_sum" in stats and stats["tokens"] else None,
        # The objective's own (GRPO: the tokens whose ratio the loss clipped, mean |logp_vllm -
        # logp_learner| at temperature 1, the tokens a ratio on vLLM's logprobs would clip).
        "clip_frac": None, "engine_mismatch": None, "clip_frac_rollout": None,
        **objective(cfg.algo).row(stats, tokens),
        "grad_norm": stats["grad_norm"], "lr": stats["lr"],
        # For objectives.kd.source=teacher_samples: the reward of the teacher-prompted samples. None also
        # when the data has no answers to grade against.
        "reward_mean": sum(s.reward for s in samples) / n if facts.generated and graded else None,
        "response_len_mean": resp_tokens / n,
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        # Collapse diagnostics: repetition inside the responses, and the teacher's and the student's
        # probability of stopping at the last position of truncated and of finished ones.
        "repeated_ngram_rate": mean_repeated_ngram_rate(s.response_ids for s in samples),
        **stop_metrics(stats),
        "tokens_generated": resp_tokens if facts.generated else 0,
        "tokens_generated_total": facts.tokens_total,
        "samples": len(samples), "dropped_stale": facts.dropped, "context_skipped": facts.skipped,
        **{f"{stage}_seconds": s for stage, s in facts.seconds.items()},
        "sample_ids": [s.sample_id for s in samples],
        "update_skipped": bool(stats.get("update_skipped", False)),
        # No token of the step counted in the loss (loss.mask_truncated, or contexts that did not
        # apply): the update was skipped as nothing to learn from, not as a fault.
        "no_loss_tokens": bool(stats.get("no_loss_tokens", False)),
        "score_overlapped": facts.score_overlapped,
        # object_store: whether the receivers copied the weights out of the learner's memory
        "sync_in_place": facts.sync_in_place,
        # the whole model, or the LoRA adapter alone (model.lora.serve=adapter)
        "sync_mb": facts.sync_mb,
    }
    if row["update_skipped"]:
        row["nonfinite_sample_ids"] = stats.get("nonfinite_sample_ids", [])
    return row


def eval_summary(rows: list[dict], extract: str) -> str | None:
    """"held-out accuracy 0.31 -> 0.38 ..." from the first and last evaluation of a run."""
    evals = [r for r in rows if f"eval/accuracy_{extract}" in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    other = next(m for m in ("strict", "lenient") if m != extract)
    return (f"held-out accuracy {first[f'eval/accuracy_{extract}']:.2f} -> {last[f'eval/accuracy_{extract}']:.2f} "
            f"at steps {first['step']} -> {last['step']} on {int(last['eval/problems'])} problems ({extract} "
            f"grading; {other}: {first[f'eval/accuracy_{other}']:.2f} -> {last[f'eval/accuracy_{other}']:.2f}; "
            f"format rate {first['eval/format_rate']:.2f} -> {last['eval/format_rate']:.2f})")
