"""LoRA: the learner trains adapters, pushes merged weights, and vLLM serves exactly those."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsd.batch import read_ipc

from .conftest import local_config, make_trainer, policy_recording_trainer, read_metrics
from .test_weight_sync import hf_logprobs

pytestmark = pytest.mark.integration


def test_lora_push_matches_merged_model(cli_run, tiny_model, ray_session):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opsd.workers.learner import LearnerGroup
    from opsd.workers.rollout import RolloutWorker

    ray = ray_session
    targets = ["q_proj", "v_proj", "gate_proj"]
    cfg = local_config("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                       f"model.lora.target_modules=[{','.join(targets)}]", "learner.lr=5e-2", "rollout.kv_cache_mb=64")
    worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg, tiny_model, 0)
    group = LearnerGroup(cfg, tiny_model)
    try:
        # Only the adapters train.
        base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
        assert 0 < group.info[0]["trainable_params"] < base_params / 10
        table = read_ipc(sorted((cli_run / "batches").glob("step_*.arrow"))[0])
        row = table.slice(0, 1).to_pylist()[0]
        seq = row["prompt_ids"] + row["response_ids"]
        for _ in range(2):  # B starts at zero: the first step moves B only, the second A too
            group.train_step(table)
        update = group.push(1, "object_store")
        # Merged weights under the base model's names (no peft prefixes, no lora_ tensors).
        sent = {name for h in update.handles for name in ray.get(h)[0]}  # (names, dtypes, arrays)
        assert sent == set(dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters()))
        assert ray.get(worker.load_weights.remote(update)) == 1

        state = group.full_state()  # merged, base architecture names
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        model.tie_weights()
        expected = hf_logprobs(model.eval(), seq)
        base = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), seq)
        assert np.abs(expected - base).max() > 1e-3, "the adapters did not move the model enough to test"

        # The export merges with peft's get_delta_weight: check it is W + (alpha / r) * B @ A.
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                    LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        merged = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + layer.get_delta_weight("default"), merged)

        got = np.array(ray.get(worker.prompt_logprobs.remote([seq]))[0])
        np.testing.assert_allclose(got, expected, atol=1e-4)
    finally:
        ray.kill(worker)
        group.shutdown()


def test_the_engines_serve_the_student_as_an_adapter_and_score_the_fixed_teacher_on_their_base_weights(
    tmp_path, tiny_model, ray_session, started_pools
):
    """model.lora.serve=adapter with scorer.on_rollout_engines and a fixed teacher: no scorer actor;
    pushes hold the adapter alone; the rollouts are sampled by the adapted policy (their log-probs
    are the merged model's) while the same engines' teacher targets stay those of the base model,
    at teacher version 0, also for batches scored while the learner trained (rollout.max_staleness=1,
    scorer.overlap)."""
    from transformers import AutoModelForCausalLM

    from opsd.lora import adapter_shapes

    from .test_engine_scoring import assert_same_targets, forward_targets

    trainer, run_dir = make_trainer(
        tmp_path, "model.lora.enabled=true", "model.lora.serve=adapter", "model.lora.r=4", "model.lora.alpha=8",
        "scorer.on_rollout_engines=true", "teacher.mode=fixed", "logging.save_batches=true", "train.steps=3",
        "train.checkpoint_every=0", "eval.every=0", "learner.lr=5e-2", "rollout.max_staleness=1", cls=policy_recording_trainer())
    try:
        assert started_pools == [("rollout", "RolloutWorker")]  # and no pool of scorer actors
        names = [n for bucket in trainer.actors.learner.weight_layout() for n in bucket.names]
        assert names and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)
        trainer.run_steps(run_dir)
        adapter_mb = sum(math.prod(shape) for shape in adapter_shapes(tiny_model, trainer.cfg.model.lora).values()) \
            * 4 / 2**20  # float32
        rows = read_ipc(run_dir.path / "batches" / "step_000003.arrow").to_pylist()
        seqs = [r["prompt_ids"] + r["response_ids"] for r in rows[:4]]  # prompt log-probs of a batch, adapted
        engine_now = ray_session.get(trainer.actors.rollouts.actors[0].prompt_logprobs.remote(seqs))
    finally:
        trainer.shutdown()

    metrics = read_metrics(run_dir.path)
    assert [(m["policy_version"], m["teacher_version"]) for m in metrics] == [(1, 0), (2, 0), (3, 0)]
    assert [m["sync_mb"] for m in metrics] == [pytest.approx(adapter_mb)] * 3  # the adapter alone
    assert all(m.get("score_overlapped") for m in metrics[1:])  # steps 2 and 3 were scored while the learner trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def adapted(state):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        model.tie_weights()
        return model.eval()

    # The engine now holds the last push's adapter: the merged model's log-probs, not the base's.
    last = adapted(trainer.policy_history[-1])
    for seq, got in zip(seqs, engine_now):
        want = hf_logprobs(last, seq)
        np.testing.assert_allclose(np.array(got), want, atol=1e-4)
    assert np.abs(want - hf_logprobs(base, seq)).max() > 1e-3, "the adapters did not move the model enough to test"
    # Step 3 was sampled after the first push (one step stale): by the adapter of version 1.
    assert {r["policy_version"] for r in rows} == {1}
    first = adapted(trainer.policy_history[0])
    for row in rows[:4]:
        lp = hf_logprobs(first, row["prompt_ids"] + row["response_ids"])[len(row["prompt_ids"]) - 1:]
        np.testing.assert_allclose(np.array(row["rollout_logprobs"]), lp, atol=1e-4)
    # Every batch's teacher is the base model, scored on the same engines.
    for step in (1, 2, 3):
        table = read_ipc(run_dir.path / "batches" / f"step_{step:06d}.arrow")
        assert set(table.column("teacher_version").to_pylist()) == {0}
        for row in table.to_pylist():
            assert_same_targets(row, *forward_targets(base, row["teacher_prompt_ids"], row["response_ids"], 64))
