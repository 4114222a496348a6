"""GRPO, SFT and KD (off-policy distillation) run through the same runtime as OPSD (short CPU
runs); KD's first loss and gradient are checked against one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from opsd.launch.driver import train
from opsd.batch import batch_meta, read_ipc
from opsd.config import REPO_ROOT
from opsd.losses import token_divergence
from opsd.objectives import objective

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration


def test_grpo_with_reference_kl(tmp_path, ray_session):
    run = train(str(REPO_ROOT / "configs" / "grpo-local.yaml"), local_overrides(
        tmp_path, "train.steps=2", "train.checkpoint_every=0", "eval.every=0", "loss.kl_coef=0.05",
        "logging.save_batches=true", "learner.num_cpus_per_rank=0.25", "scorer.num_cpus_per_worker=0.5",
    ))
    rows = read_metrics(run)
    assert [r["samples"] for r in rows] == [16, 16]  # 4 prompts x 4 samples
    # Each prompt's samples form one group of n.
    groups = {}
    for sid in rows[0]["sample_ids"]:
        groups.setdefault(sid.rsplit("#", 1)[0], []).append(sid)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4, 4]
    # The reference scorer sees the student's prompt: before any update the policy equals the
    # reference, so the sampled-token KL is zero up to float error.
    assert abs(rows[0]["kl_sampled"]) < 1e-4
    # The learner's own old log-probs: the ratio is 1, nothing is clipped. vLLM and the learner
    # (both fp32 here) agree to float error, so a ratio on vLLM's logprobs would clip nothing either.
    assert [r["clip_frac"] for r in rows] == [0.0, 0.0]
    assert all(0 <= r["engine_mismatch"] < 1e-3 for r in rows)
    assert [r["clip_frac_rollout"] for r in rows] == [0.0, 0.0]
    table = read_ipc(run / "batches" / "step_000001.arrow")
    assert batch_meta(table)["opsd.teacher_mode"] == "fixed"
    assert table.column("teacher_prompt_ids").to_pylist() == table.column("prompt_ids").to_pylist()
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_sft_trains_on_reference_solutions(tmp_path, ray_session, tiny_model):
    from transformers import AutoModelForCausalLM

    run = train(str(REPO_ROOT / "configs" / "sft-local.yaml"), local_overrides(
        tmp_path, "train.steps=2", "train.checkpoint_every=2", "eval.every=0", "logging.save_batches=true",
        "learner.lr=1e-3",
    ))
    rows = read_metrics(run)
    assert [r["tokens_generated"] for r in rows] == [0, 0]  # SFT generates nothing
    table = read_ipc(run / "batches" / "step_000001.arrow")
    assert batch_meta(table)["opsd.teacher_mode"] == "none"
    # Cross-entropy of a random 512-token model starts near log(512).
    assert abs(rows[0]["loss"] - math.log(512)) < 0.5
    responses = table.column("response_ids").to_pylist()
    assert all(r[-1] == 2 for r in responses)  # every reference ends with EOS (<|im_end|>)
    exported = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_2" / "hf")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert max((a - b).abs().max().item() for a, b in zip(exported.parameters(), initial.parameters())) > 1e-4


def _initial_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def _response_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) from one unpadded forward, full vocabulary."""
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _reference_loss_and_grad_norm(model, table, cfg) -> tuple[float, float]:
    """Step 1 of a distillation run in one process: the loss on the student prompt against the
    saved teacher targets, summed over tokens / all tokens, and the gradient norm before clipping."""
    rows = table.to_pylist()
    total = sum(sum(r["loss_mask"]) for r in rows)
    model.zero_grad()
    loss_sum = 0.0
    for r in rows:
        p, resp = r["prompt_ids"], r["response_ids"]
        logits = model(torch.tensor([p + resp])).logits[0, len(p) - 1 : len(p) - 1 + len(resp)]
        mask = torch.tensor(r["loss_mask"])
        per_tok = token_divergence(
            logits[mask], torch.tensor(r["teacher_topk_ids"]).long()[mask], torch.tensor(r["teacher_topk_logprobs"])[mask],
            beta=objective(cfg.algo).options(cfg).beta, support=objective(cfg.algo).options(cfg).support, temperature=cfg.loss.temperature,
        )
        (per_tok.sum() / total).backward()
        loss_sum += per_tok.sum().item()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    return loss_sum / total, norm


def test_kd_from_references_distils_the_teacher_along_the_reference(tmp_path, ray_session, tiny_model):
    from transformers import AutoTokenizer

    from opsd.launch.driver import prepare_config

    overrides = local_overrides(tmp_path, "algo=kd", "kd.source=reference", "train.steps=2", "train.checkpoint_every=0",
                                "eval.every=0", "logging.save_batches=true", "learner.lr=1e-3")
    cfg, _ = prepare_config(str(REPO_ROOT / "configs" / "tiny.yaml"), overrides)
    run = train(str(REPO_ROOT / "configs" / "tiny.yaml"), overrides)
    rows = read_metrics(run)
    assert [r["tokens_generated"] for r in rows] == [0, 0]  # the student samples nothing
    assert [r["samples"] for r in rows] == [8, 8] and rows[0]["reward_mean"] is None
    table = read_ipc(run / "batches" / "step_000001.arrow")
    assert batch_meta(table)["opsd.teacher_mode"] == "fixed"

    tok = AutoTokenizer.from_pretrained(tiny_model)
    solutions = {json.loads(line)["id"]: json.loads(line)["solution"]
                 for line in (REPO_ROOT / "data" / "toy" / "train.jsonl").read_text().splitlines() if line}
    model = _initial_model(tiny_model)
    for r in table.to_pylist():
        # The response is the reference solution, tokenised, closed by EOS ...
        want = tok(solutions[r["sample_id"].rsplit("#", 1)[0]], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r["response_ids"] == want
        # ... the targets are the teacher's, which reads the solution in its prompt ...
        assert r["teacher_prompt_ids"] != r["prompt_ids"] and len(r["teacher_prompt_ids"]) > len(r["prompt_ids"])
        with torch.no_grad():
            teacher = _response_logprobs(model, r["teacher_prompt_ids"], r["response_ids"])
        np.testing.assert_allclose(r["teacher_token_logprobs"], teacher.numpy(), atol=1e-4)
    # ... and the student trains on its own prompt: loss and gradient as computed in one process.
    loss, grad_norm = _reference_loss_and_grad_norm(model, table, cfg)
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores; kd's loss against one
# process is checked there along the reference (above), and its options in tests/unit/test_config.py.
@pytest.mark.slow
def test_kd_from_teacher_samples_trains_on_what_the_teacher_prompt_sampled(tmp_path, ray_session, tiny_model):
    from opsd.launch.driver import prepare_config

    overrides = local_overrides(tmp_path, "algo=kd", "kd.source=teacher_samples", "rollout.n=2", "train.steps=2",
                                "train.prompts_per_step=4", "train.checkpoint_every=0", "eval.every=0",
                                "logging.save_batches=true", "learner.lr=1e-3")
    cfg, _ = prepare_config(str(REPO_ROOT / "configs" / "tiny.yaml"), overrides)
    run = train(str(REPO_ROOT / "configs" / "tiny.yaml"), overrides)
    rows = read_metrics(run)
    assert [r["samples"] for r in rows] == [8, 8]  # 4 prompts x 2 samples
    table = read_ipc(run / "batches" / "step_000001.arrow")
    assert sum(len(x) for x in table.column("response_ids").to_pylist()) == rows[0]["tokens_generated"] > 0
    model = _initial_model(tiny_model)
    gap_teacher, gap_student = [], []
    for r in table.to_pylist():
        assert r["policy_version"] == 0  # sampled by the initial weights ...
        with torch.no_grad():
            as_teacher = _response_logprobs(model, r["teacher_prompt_ids"], r["response_ids"]).numpy()
            as_student = _response_logprobs(model, r["prompt_ids"], r["response_ids"]).numpy()
        # ... from the teacher prompt: vLLM's sampling logprobs are those of that context ...
        gap_teacher.append(np.abs(np.array(r["rollout_logprobs"]) - as_teacher).max())
        gap_student.append(np.abs(np.array(r["rollout_logprobs"]) - as_student).max())
        # ... and the teacher, fixed, scores them in the same context.
        np.testing.assert_allclose(r["teacher_token_logprobs"], as_teacher, atol=1e-4)
    assert max(gap_teacher) < 1e-3 < min(gap_student), (gap_teacher, gap_student)
    loss, grad_norm = _reference_loss_and_grad_norm(model, table, cfg)
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
