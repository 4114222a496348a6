"""A GRPO run on code rows: the rollout workers grade every response by running it in the sandbox,
the driver grades the evaluation the same way, and hostile responses (a fork bomb, an infinite
loop, a write to the run directory, a kill of its parent) are contained while the run carries on.

The model is scripted so that its responses are programs: the tiny model's tokenizer gets one added
token per program (its text a fenced block), the residual stream is made the same vector at every
position, and the LM head gives those tokens, and only those, a logit far above the rest: each
response is a random sequence of the programs, and its first block is what is graded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd.batch import read_ipc
from opsd.config import REPO_ROOT, ConfigError
from opsd.launch.driver import train

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")


def programs(run_dir: Path) -> dict[str, tuple[str, float]]:
    """name -> (the added token's text, the reward its response must get)."""
    block = lambda code: f"```python\n{code}```\n"  # noqa: E731
    return {
        "correct": (block("def add(a, b):\n    return a + b\n"), 1.0),
        "fork_bomb": (block("import os\nwhile True:\n    os.fork()\n"), 0.0),
        "infinite_loop": (block("while True:\n    pass\n"), 0.0),
        "write_run_dir": (block(f"open({str(run_dir / 'pwned')!r}, 'w').write('x')\ndef add(a, b):\n    return a + b\n"),
                          0.0),
        "kill_parent": (block("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                              "def add(a, b):\n    return a - b\n"), 0.0),
    }


def scripted_model(tiny_model: str, out: Path, texts: list[str]) -> Path:
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in texts])
    ids = tok.convert_tokens_to_ids(texts)
    cfg = Qwen3Config.from_pretrained(tiny_model)
    cfg.vocab_size = len(tok) + (-len(tok)) % 8
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        e = torch.randn(cfg.hidden_size)
        model.model.embed_tokens.weight[:] = e  # every token the same vector ...
        for layer in model.model.layers:  # ... and no layer adds to it: the same hidden state everywhere
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids] = e  # those tokens ~100 above every other: only they are sampled
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def code_rows(path: Path, n: int = 4) -> Path:
    rows = [{"id": f"add-{i}", "task": "code", "problem": f"Write add(a, b), which returns a + b ({i}).",
             "solution": "```python\ndef add(a, b):\n    return a + b\n```", "tests": [f"assert add({i}, 1) == {i + 1}"],
             "entry_point": "add"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sandbox_processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"-S\x00-s\x00-B\x00-" in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


def test_grpo_on_code_grades_in_the_sandbox_and_carries_on_past_hostile_programs(tmp_path, tiny_model, ray_session,
                                                                                capfd):
    from opsd.sandbox import probe
    from transformers import AutoTokenizer

    if probe().level != "bwrap":
        pytest.skip(f"no bubblewrap sandbox here: {probe().describe()}")
    run_dir = tmp_path / "run"
    progs = programs(run_dir)
    model = scripted_model(tiny_model, tmp_path / "model", [t for t, _ in progs.values()])
    data = code_rows(tmp_path / "code.jsonl")
    run = train(CONFIG, local_overrides(
        tmp_path, "algo=grpo", f"model.path={model}", f"data.train_path={data}", f"data.test_path={data}",
        "train.steps=2", "train.prompts_per_step=2", "rollout.n=4", "rollout.max_tokens=2", "eval.every=2",
        "eval.max_tokens=2", "eval.at_start=false", "train.checkpoint_every=0", "logging.save_batches=true",
        "sandbox.cpu_s=1", "sandbox.workers=2"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    out = capfd.readouterr()
    assert "model-written code runs in a sandbox, isolation bwrap" in out.out + out.err
    tok = AutoTokenizer.from_pretrained(model)
    reward_of = {t: r for t, r in progs.values()}
    seen = {}
    for path in sorted((run / "batches").glob("step_*.arrow")):
        for row in read_ipc(path).to_pylist():
            text = tok.decode(row["response_ids"], skip_special_tokens=True)
            first = next(t for t in reward_of if text.startswith(t))
            seen[first] = row["reward"]
            assert row["reward"] == reward_of[first], (text[:80], row["reward"])
    assert len(seen) >= 3, seen  # 16 responses drawn from 5 programs: several kinds were graded
    assert not (run_dir / "pwned").exists()
    assert sandbox_processes() == []
    evals = [r for r in read_metrics(run, baseline=True) if "eval/avg@1" in r]
    assert evals and 0.0 <= evals[-1]["eval/avg@1"] <= 1.0


def test_a_run_on_code_that_cannot_get_the_isolation_it_asks_for_stops_before_it_starts(tmp_path, tiny_model):
    data = code_rows(tmp_path / "code.jsonl")
    with pytest.raises(ConfigError, match="config key 'sandbox.isolation' = 'bwrap'.*bubblewrap not found"):
        train(CONFIG, local_overrides(tmp_path, "algo=grpo", f"data.train_path={data}", "train.prompts_per_step=2", "rollout.n=2",
                                      "sandbox.bwrap=/nonexistent/bwrap"))
    assert not (tmp_path / "run").exists()


def test_bench_task_grades_code_rows_by_their_tests_in_the_sandbox(tmp_path, tiny_model, ray_session):
    """`opsd bench task` on a code set: the scripted model answers every prompt with one program,
    so each row's result is known from its test alone, and the per-row report must match it."""
    import random

    from opsd.benchmarks.task_report import task_report
    from opsd.sandbox import probe

    from .conftest import local_config

    if probe().level != "bwrap":
        pytest.skip(f"no bubblewrap sandbox here: {probe().describe()}")
    program = "```python\ndef add(a, b):\n    return a + b\n```\n"
    model = scripted_model(tiny_model, tmp_path / "model", [program])
    rng = random.Random(7)
    rows, expected = [], {}
    for i in range(6):
        a, b = rng.randrange(10), rng.randrange(10)
        claimed = a + b if rng.random() < 0.5 else a + b + 1
        rows.append({"id": f"add-{i}", "task": "code", "problem": f"Write add(a, b) ({i}).",
                     "solution": "```python\ndef add(a, b):\n    return a + b\n```",
                     "tests": [f"assert add({a}, {b}) == {claimed}"], "entry_point": "add"})
        expected[f"add-{i}"] = claimed == a + b
    assert 0 < sum(expected.values()) < len(expected)  # both verdicts occur
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = local_config(f"model.path={model}", f"data.test_path={data}", "eval.max_tokens=2", "sandbox.cpu_s=1")
    lines: list[str] = []
    report = task_report(cfg, 6, log=lines.append)
    assert report["problems"] == 6 and report["graded_by"] == "tests in the sandbox"
    for role in ("student", "teacher"):
        got = report[role]["rows"]
        assert {r["id"]: r["correct"] for r in got} == expected
        assert all(r["formed"] and r["tokens"] == 2 and r["cut"] for r in got), got
        assert report[role]["accuracy_strict"] == report[role]["accuracy_lenient"] == sum(expected.values()) / 6
        assert report[role]["format_rate"] == 1.0
    assert any(line.startswith("task: student prompt: pass@1 ") for line in lines), lines
    assert any(line == "task: teacher prompt: 6/6 problems" for line in lines), lines
    assert sandbox_processes() == []
