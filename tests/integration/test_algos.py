"""GRPO and SFT run through the same runtime as OPSD (short CPU runs)."""

from __future__ import annotations

import math

import pytest

from launch.driver import train
from opsd.batch import batch_meta, read_ipc
from opsd.config import REPO_ROOT

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
