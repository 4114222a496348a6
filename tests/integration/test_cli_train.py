"""Test 1: the default `opsd train` finishes and leaves the run directory DESIGN.md describes."""

from __future__ import annotations

import json
import math

import pytest

from opsd.launch.metrics import METRIC_FIELDS
from opsd.batch import read_ipc, validate
from opsd.config import load_config

from .conftest import CLI_STEPS, read_metrics

pytestmark = pytest.mark.integration


def test_run_dir_layout_and_metrics(cli_run, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = load_config(cli_run / "config.yaml")  # the resolved config is itself a valid config
    assert cfg.train.steps == CLI_STEPS and cfg.logging.save_batches

    baseline, *rows = read_metrics(cli_run, baseline=True)
    # eval.every > 0: the initial weights are evaluated first, as step 0, and so is the last step.
    assert baseline["step"] == 0 and baseline["policy_version"] == 0 and "eval/accuracy_strict" in baseline
    assert "eval/accuracy_lenient" in rows[-1]
    assert [r["step"] for r in rows] == list(range(1, CLI_STEPS + 1))
    total = 0
    for r in rows:
        missing = set(METRIC_FIELDS) - set(r)
        assert not missing, f"step {r['step']} lacks {missing}"
        assert r["policy_version"] == r["step"]
        assert r["teacher_version"] == 0  # fixed teacher
        # object_store on one node: the rollout worker copied the learner's weights in place.
        assert r["sync_in_place"] is (cfg.sync.transport == "object_store" and cfg.sync.shared_memory)
        total += r["tokens_generated"]
        assert r["tokens_generated_total"] == total
        assert all(math.isfinite(r[k]) for k in ("loss", "kl_sampled", "grad_norm", "lr"))
        assert r["loss"] >= 0
        assert len(r["sample_ids"]) == r["samples"] == cfg.train.prompts_per_step

    # Each push moved the whole model in the serving dtype (float32), every parameter once (a tied
    # head is the embedding's parameter).
    params = AutoModelForCausalLM.from_pretrained(tiny_model).parameters()
    assert [r["sync_mb"] for r in rows] == [pytest.approx(sum(p.numel() for p in params) * 4 / 2**20)] * len(rows)

    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    for step in range(1, CLI_STEPS + 1):
        table = read_ipc(cli_run / "batches" / f"step_{step:06d}.arrow")
        validate(table, vocab_size=vocab)
        assert table.column("sample_id").to_pylist() == rows[step - 1]["sample_ids"]
        assert set(table.column("policy_version").to_pylist()) == {step - 1}

    ckpt = cli_run / "checkpoints" / f"step_{CLI_STEPS}"
    state = json.loads((ckpt / "driver_state.json").read_text())
    assert state["step"] == CLI_STEPS and state["policy_version"] == CLI_STEPS
    assert state["sampler"]["position"] == CLI_STEPS * cfg.train.prompts_per_step
    assert (ckpt / "learner").is_dir()
    assert not list((cli_run / "checkpoints").glob(".*tmp"))
    exported = AutoModelForCausalLM.from_pretrained(ckpt / "hf")
    # The export keeps the model's own stop ids (the tiny model's are [2, 0], where its config alone
    # gives 2): an export read as teacher.model stops where the student does.
    assert GenerationConfig.from_pretrained(ckpt / "hf").eos_token_id == \
        GenerationConfig.from_pretrained(tiny_model).eos_token_id == [2, 0]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    moved = max((a - b).abs().max().item() for a, b in zip(exported.parameters(), initial.parameters()))
    assert moved > 0, "the exported weights equal the initial ones: training did not reach the export"
    assert list((cli_run / "tensorboard").glob("events.out.tfevents.*"))
