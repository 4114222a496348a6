"""LoRA: the learner trains adapters, pushes merged weights, and vLLM serves exactly those."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opsd.batch import read_ipc

from .conftest import local_config
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
