import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from opsd.assets import tiny
from opsd.assets.tiny import (
    DEFAULT_TINY_DIR,
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tokenizer,
    ensure_tiny_model,
    tiny_dir,
    token_lengths,
)
from opsd.assets.toydata import DEFAULT_TOY_DIR, read_jsonl

MSGS = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "What is 12 + 34?"}]
GEN_PROMPT = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def toy_rows():
    return read_jsonl(DEFAULT_TOY_DIR / "train.jsonl") + read_jsonl(DEFAULT_TOY_DIR / "test.jsonl")


def _hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


def test_round_trip_on_toy_text(tok, toy_rows):
    for row in toy_rows[:300]:
        for text in (row["problem"], row["solution"]):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    for token in tok.get_vocab():
        if any(c.isdigit() for c in token):
            assert len(token) == 1, token
    assert tok.tokenize("12345") == list("12345")


def test_special_tokens(tok, model_dir):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3, 4]
    for t in SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.encode("1 + 2", add_special_tokens=False)[0] == tok.convert_tokens_to_ids("1")  # no BOS
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
    assert len(tok) == cfg["vocab_size"] == 512


def test_chat_template_think_switch(tok):
    off = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    assert off == ("<|im_start|>system\nSolve it.<|im_end|>\n"
                   "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n" + GEN_PROMPT + EMPTY_THINK)
    # Qwen3 behaviour: thinking on (or unspecified) adds nothing; the model opens <think> itself.
    for kw in ({}, {"enable_thinking": True}):
        on = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True, **kw)
        assert on == off[: -len(EMPTY_THINK)]
        assert "<think>" not in on
    no_gen = tok.apply_chat_template(MSGS, tokenize=False, enable_thinking=False)
    assert not no_gen.endswith(GEN_PROMPT) and "<think>" not in no_gen


def test_chat_template_tokenize_return_types(tok):
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    enc = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True,
                                  enable_thinking=False)
    # transformers 5: return_dict defaults to True, so tokenize=True gives a BatchEncoding.
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    ids = enc["input_ids"]
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == tok.encode(text, add_special_tokens=False)
    plain = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True,
                                    enable_thinking=False, return_dict=False)
    assert plain == ids
    assert ids[-6:] == tok.encode(EMPTY_THINK, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_toy_texts_fit_cpu_rollout_budget(tok, toy_rows):
    problems = token_lengths(tok, [r["problem"] for r in toy_rows])
    solutions = token_lengths(tok, [r["solution"] for r in toy_rows])
    assert max(problems) <= 32 and max(solutions) <= 64
    assert sum(solutions) / len(solutions) < 45


def test_build_is_deterministic(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    assert _hashes(again) == _hashes(model_dir)
    assert set(_hashes(again)) >= {"config.json", "model.safetensors", "tokenizer.json",
                                   "generation_config.json"}
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    h0, h1 = _hashes(model_dir), _hashes(other)
    assert h1["model.safetensors"] != h0["model.safetensors"]
    assert h1["tokenizer.json"] == h0["tokenizer.json"]


def test_tokenizer_training_is_deterministic():
    corpus = [f"{a} + {b} = {a + b}" for a in range(40) for b in range(40)]
    t1, t2 = build_tokenizer(corpus, 300), build_tokenizer(corpus, 300)
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()


def test_transformers_loads_and_runs(model_dir, tok):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads) == ("qwen3", 32, 2)
    assert model.dtype == torch.float32
    # tied: one matrix, stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # [1, T, V]
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_default_dir_and_env_override(monkeypatch, tmp_path):
    assert DEFAULT_TINY_DIR == Path(tiny.__file__).resolve().parents[2] / "artifacts" / "tiny-qwen3"
    monkeypatch.delenv("OPSD_TINY_DIR", raising=False)
    assert tiny_dir() == DEFAULT_TINY_DIR
    monkeypatch.setenv("OPSD_TINY_DIR", str(tmp_path / "env"))
    assert tiny_dir() == tmp_path / "env"


def test_ensure_builds_once(monkeypatch, tmp_path, model_dir):
    calls = []

    def fake_build(out, **kw):  # a copy of the fixture's files: the real build is tested above
        calls.append(kw)
        out.mkdir(exist_ok=True)
        for p in model_dir.iterdir():
            (out / p.name).write_bytes(p.read_bytes())
        return out

    monkeypatch.setattr(tiny, "build_tiny_model", fake_build)
    monkeypatch.setenv("OPSD_TINY_DIR", str(tmp_path / "m"))
    assert ensure_tiny_model(seed=3) == tmp_path / "m"
    assert ensure_tiny_model(seed=3) == tmp_path / "m"
    assert calls == [{"seed": 3}]
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["m"]  # no temp dir left behind
    (tmp_path / "empty").mkdir()
    assert (ensure_tiny_model(tmp_path / "empty") / "config.json").exists()


def test_ensure_leaves_nothing_after_a_failed_build(monkeypatch, tmp_path):
    def failing_build(out, **kw):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny, "build_tiny_model", failing_build)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_tiny_model(tmp_path / "m")
    assert os.listdir(tmp_path) == []


@pytest.mark.integration
def test_vllm_loads_and_matches_hf_greedy(model_dir, tok, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.1, max_model_len=512, distributed_executor_backend="uni",
              seed=0)
    try:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, enable_thinking=False,
                                           return_dict=False)
                   for p in ("What is 12 + 34?", "Compute (55 + 33) * 8.")]
        sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, prompt_logprobs=1)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    finally:
        del llm
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for p, out in zip(prompts, outs):
        got = list(out.outputs[0].token_ids)
        want = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):]
        assert got == want.tolist()
        # Greedy output of an untrained model is one repeated token, so also compare the
        # log-probabilities of every prompt and response token: the two forwards agree.
        seq = p + got
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0], -1)  # [T, V]
        ref = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]  # [T-1]
        vllm_lp = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])]
        vllm_lp += [d[t].logprob for d, t in zip(out.outputs[0].logprobs, got)]
        assert torch.allclose(torch.tensor(vllm_lp), ref, atol=1e-4)
