"""`opsd bench head`: what the LM head's precision does to the teacher's targets, and what it costs.

The scorer's own code (``ScorerWorker.teacher_targets``) runs in this process on the config's model,
on the first ``rows`` test problems with their reference solutions as the responses (teacher
prompt, teacher-forced: the same tokens for every variant), three times:

    float32                        the reference
    bfloat16                       bf16 weights, the head's matmul in bf16 (logits rounded to bf16)
    bfloat16 + fp32 head           bf16 weights, the head's matmul in fp32 (model.fp32_lm_head)

and then with ``scorer.backend=vllm`` (a vLLM engine's prompt log-probs) in float32 and bfloat16.

Reported for each bf16 variant against float32: the sampled-token log-prob difference (mean and
max over positions, nats), the top-k log-prob difference on the ids both top-k lists hold, the
share of positions whose top-1 id agrees, and the seconds of the forward (after one warm-up).
Also the learner's loss (``PolicyLoss`` with the config's ``loss.*``, forward only) of the same
model as the student, on the student prompt followed by the same responses, against that
variant's own targets: the difference that precision makes to what is trained on, end to end.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import numpy as np


def _compare(ref: list, other: list) -> dict:
    tok = np.concatenate([np.abs(o[2] - r[2]) for r, o in zip(ref, other)])
    top_diffs, top1 = [], []
    for (r_ids, r_lp, *_), (o_ids, o_lp, *_) in zip(ref, other):
        top1.append(r_ids[:, 0] == o_ids[:, 0])
        for t in range(r_ids.shape[0]):
            where = {int(i): float(v) for i, v in zip(o_ids[t], o_lp[t])}
            top_diffs.extend(abs(float(v) - where[int(i)]) for i, v in zip(r_ids[t], r_lp[t]) if int(i) in where)
    top = np.asarray(top_diffs)
    return {"sampled_token_abs_mean": float(tok.mean()), "sampled_token_abs_max": float(tok.max()),
            "topk_abs_mean": float(top.mean()), "topk_abs_max": float(top.max()),
            "top1_agreement": float(np.concatenate(top1).mean())}


def bench_head(config: str, overrides: list[str], rows: int = 2, out: Callable[[str], None] = print) -> dict:
    from transformers import AutoTokenizer

    from opsd.config import load_config
    from opsd.launch.problems import read_problems
    from opsd.assets.models import resolve_model_path
    from opsd.prompts import PromptBuilder
    from opsd.workers.scorer import ScorerWorker

    cfg = load_config(config, overrides)
    model_path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(model_path)
    builder = PromptBuilder(tok, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=cfg.rollout.max_tokens)
    d = cfg.data
    problems = read_problems(cfg, d.test_path or d.train_path)[:rows]
    pairs, _ = builder.build(problems, source=d.test_path or d.train_path)
    contexts = [p.teacher_ids for p in pairs]
    solutions = {pr.uid: pr.solution for pr in problems}
    responses = [list(tok(solutions[p.uid], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id] for p in pairs]
    threads = int(cfg.cluster.num_cpus or 1)
    out(f"bench head: {cfg.model.path}, {len(pairs)} rows, {sum(map(len, responses))} response positions, "
        f"top-{cfg.scorer.topk}, {threads} threads")

    students = [p.student_ids for p in pairs]

    def run(dtype: str, fp32_head: bool) -> tuple[list, float, float]:
        c: Any = copy.deepcopy(cfg)
        c.model.dtype, c.model.fp32_lm_head, c.scorer.num_threads = dtype, fp32_head, threads
        scorer = ScorerWorker(c, model_path)
        targets, secs = _timed_targets(scorer, contexts, responses)
        return targets, secs, _student_loss(c, scorer.model, scorer.pad_id, students, responses, targets)

    ref, ref_s, ref_loss = run("float32", False)
    report: dict[str, Any] = {"model": cfg.model.path, "rows": len(pairs), "positions": sum(map(len, responses)),
                              "topk": cfg.scorer.topk, "threads": threads, "float32_seconds": ref_s,
                              "float32_loss": ref_loss, "variants": {}}
    out(f"  float32: {ref_s:.2f}s; loss {ref_loss:.6f}")
    for name, fp32_head in (("bfloat16", False), ("bfloat16+fp32_head", True)):
        targets, secs, loss = run("bfloat16", fp32_head)
        row = {"seconds": secs, "vs_float32_time": secs / ref_s, **_compare(ref, targets), "loss": loss,
               "loss_abs_diff": abs(loss - ref_loss), "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss)}
        report["variants"][name] = row
        out(f"  {name}: {secs:.2f}s ({row['vs_float32_time']:.2f}x float32); sampled-token |dlogp| mean "
            f"{row['sampled_token_abs_mean']:.4f} max {row['sampled_token_abs_max']:.4f}; top-k |dlogp| mean "
            f"{row['topk_abs_mean']:.4f} max {row['topk_abs_max']:.4f}; top-1 agrees {row['top1_agreement']:.3f}; "
            f"loss {loss:.6f} (|d| {row['loss_abs_diff']:.2e}, {100 * row['loss_rel_diff']:.2f}% of float32's)")
    for dtype in ("float32", "bfloat16"):
        targets, secs = _engine_targets(cfg, model_path, dtype, threads, contexts, responses)
        row = {"seconds": secs, "vs_float32_time": secs / ref_s, **_compare(ref, targets)}
        report["variants"][f"vllm {dtype}"] = row
        out(f"  vllm {dtype} (scorer.backend=vllm): {secs:.2f}s ({row['vs_float32_time']:.2f}x float32); "
            f"sampled-token |dlogp| mean {row['sampled_token_abs_mean']:.4f} max {row['sampled_token_abs_max']:.4f}; "
            f"top-k |dlogp| mean {row['topk_abs_mean']:.4f} max {row['topk_abs_max']:.4f}; "
            f"top-1 agrees {row['top1_agreement']:.3f}")
    return report


def _timed_targets(scorer: Any, contexts: list, responses: list) -> tuple[list, float]:
    """A scorer's targets of every row and their seconds, after a one-row warm-up."""
    scorer.teacher_targets(contexts[:1], [responses[0][:4]])
    t0 = time.perf_counter()
    targets = scorer.teacher_targets(contexts, responses)
    return targets, time.perf_counter() - t0


def _engine_targets(cfg: Any, model_path: str, dtype: str, threads: int, contexts: list,
                    responses: list) -> tuple[list, float]:
    """The vLLM scorer's targets (prompt log-probs of a vLLM engine in this process) and seconds."""
    import gc

    from opsd.workers.rollout import EngineScorerWorker

    c: Any = copy.deepcopy(cfg)
    c.model.dtype, c.scorer.num_threads, c.scorer.backend = dtype, threads, "vllm"
    engine = EngineScorerWorker(c, model_path)
    try:
        return _timed_targets(engine, contexts, responses)
    finally:
        del engine
        gc.collect()


def _student_loss(cfg: Any, model: Any, pad_id: int, students: list, responses: list, targets: list) -> float:
    """The learner's loss (forward only) of ``model`` as the student on student prompt + response,
    against the teacher ``targets`` (per row: top-k ids, top-k logprobs, sampled-token logprob)."""
    import torch

    from opsd.benchmarks.step import policy_loss_inputs
    from opsd.workers.learner_training import PolicyLoss, loss_spec

    inputs = policy_loss_inputs(students, responses, targets, [[1] * len(r) for r in responses], pad_id)
    with torch.no_grad():
        loss, _ = PolicyLoss(model, loss_spec(cfg))(*inputs, float(sum(map(len, responses))))
    return float(loss)
