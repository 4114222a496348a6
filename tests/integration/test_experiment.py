"""`opsd bench learning --quick`: the comparisons end to end, as smoke runs (the SmolLM2 one,
benchmarks/comparison.py, on the tiny model; and `--task toy`, benchmarks/experiment.py).

Marked slow (several Ray + vLLM + DeepSpeed runs in a row): `make test-slow` runs it, the default
`make test` does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opsd.benchmarks.comparison import ALL_METHODS, READS_TEACHER, weights_sha256
from opsd.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]


def bench_learning(tmp_path, *task: str) -> tuple[list[str], Path, Path]:
    """`opsd bench learning [--task T] --quick` into tmp_path: (its command, the results dir, the work dir),
    after a first run that must succeed."""
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "-m", "opsd.launch.cli", "bench", "learning", *task, "--quick", "--out", str(out),
           "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"bench learning failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return cmd, out, work


def test_bench_learning_quick_runs_every_method_and_a_rerun_skips_them(tmp_path):
    cmd, out, work = bench_learning(tmp_path)
    report = json.loads((out / "comparison.json").read_text())
    assert report["runs_done"] == report["runs_planned"] == len(ALL_METHODS) == 18
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {f"{m}-s0" for m in ALL_METHODS}
    for name, r in runs.items():
        assert [s["step"] for s in r["steps"]] == [1, 2]
        assert r["evals"][-1]["step"] == 2
        tokens = r["steps"][-1]["tokens_generated_total"]
        assert (tokens == 0) if r["method"] in ("sft", "kd_reference", "sft_teacher") else (tokens > 0), name
    # The step-0 evaluation ran once, in the first run, and is shared.
    assert sum(r["evals"][0]["step"] == 0 for r in runs.values()) == 1
    assert all(s["clip_frac"] == 0.0 and s["engine_mismatch"] is not None for s in runs["grpo-s0"]["steps"])
    assert runs["opsd_fixed-s0"]["positions"]["gap_by_position_first"][0] is not None
    assert (out / "comparison.png").stat().st_size > 10_000 and "| SFT |" in (out / "comparison.md").read_text()
    # Issue 37: the SFT teacher's weights are kept and read, unchanged, by both OPD rows.
    teacher = runs["sft_teacher-s0"]["teacher_model"]
    assert Path(teacher["path"]) == work / "teachers" / "sft-s0"
    assert weights_sha256(Path(teacher["path"])) == teacher["sha256"] == report["teacher_model"]["sha256"]
    for m in READS_TEACHER:
        saved = OmegaConf.load(Path(runs[f"{m}-s0"]["run_dir"]) / "config.yaml")
        assert saved.teacher.model == teacher["path"] and saved.algo == "opsd", m
    # The staged rows ran their two stages in one run directory, one step each.
    for m, second in (("sft_opsd", "opsd"), ("sft_grpo", "grpo")):
        assert [s["stage"] for s in runs[f"{m}-s0"]["steps"]] == ["sft", second], m
        assert (Path(runs[f"{m}-s0"]["run_dir"]) / "stages" / "sft").is_dir()
    assert runs["sft_opsd-s0"]["positions"]["gap_by_position_first"][0] is not None
    assert all(len(r["load_average_start"]) == 3 for r in runs.values())
    # A rerun has nothing left to do: it redraws the report without starting anything.
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "18 of 18 runs already done" in again.stdout, again.stdout[-2000:]
    assert "starting" not in again.stdout


def test_bench_learning_sparse_quick_sweeps_then_runs_each_method_at_its_chosen_rate(tmp_path):
    cmd, out, work = bench_learning(tmp_path, "--task", "sparse")
    report = json.loads((out / "sparse.json").read_text())
    # 4 methods x (2 rates + 1 seed), and the appended anchor row: 2 weights at OPSD's rate + 1 seed.
    assert report["runs_done"] == report["runs_planned"] == 4 * (2 + 1) + 2 + 1
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    for m in ("opsd_fixed", "grpo", "sft", "kd_reference"):
        sweep = [runs[f"sweep-{m}-lr{lr}"] for lr in ("1e-05", "0.0001")]
        # Each sweep run trained at its own rate and was evaluated on the validation part.
        for r, lr in zip(sweep, (1e-5, 1e-4)):
            cfg = OmegaConf.load(work / "runs" / f"sweep-{m}-lr{lr:g}" / "config.yaml")
            assert r["lr"] == lr == float(cfg.learner.lr) and cfg.eval.path == "data/toy/test.jsonl"
        test_run = runs[f"{m}-s0"]
        assert test_run["lr"] == report["chosen_lr"][m] and test_run["phase"] == "test"
        assert [e["step"] for e in test_run["evals"]][-1] == 2
    # The anchor's weight: each value swept at OPSD's chosen rate, the choice by the same rule, and
    # the test run at the chosen weight (as its own config.yaml says).
    tuned = report["tuned"]["opsd_anchor"]
    for value, name in ((0.1, "anchor0.1"), (1.0, "anchor1")):  # file names as the rates': lr1e-05, anchor1
        r = runs[f"sweep-opsd_anchor-{name}"]
        cfg = OmegaConf.load(work / "runs" / f"sweep-opsd_anchor-{name}" / "config.yaml")
        assert r["value"] == value == cfg.objectives.opsd.anchor and r["lr"] == report["chosen_lr"]["opsd_fixed"]
        assert float(cfg.learner.lr) == r["lr"] and cfg.eval.path == "data/toy/test.jsonl"
        assert tuned["accuracy"][repr(value)] == r["evals"][-1]["accuracy"]
    best = max(tuned["accuracy"].values())
    assert tuned["chosen"] == min(float(v) for v, a in tuned["accuracy"].items() if a == best)
    cfg = OmegaConf.load(work / "runs" / "opsd_anchor-s0" / "config.yaml")
    assert runs["opsd_anchor-s0"]["value"] == tuned["chosen"] == cfg.objectives.opsd.anchor
    assert "**chosen**" in (out / "sparse.md").read_text()
    # The step-0 point is measured once per evaluation set: once in the sweep, once in the test runs.
    assert sum(r["evals"][0]["step"] == 0 for r in runs.values()) == 2
    assert "| GRPO |" in (out / "sparse.md").read_text()
    # Every evaluation keeps how many problems it graded and how many answers ran out of tokens.
    for name, r in runs.items():
        for e in r["evals"]:
            assert e["problems"] == 8 and 0.0 <= e["truncated_frac"] <= 1.0, (name, e)
    assert report["val_problems_graded"] == report["test_problems_graded"] == 8
    # A record written before the counts were kept gets them back from its own run on a rerun.
    old = out / "runs" / "sft-s0.json"
    stripped = json.loads(old.read_text())
    for e in stripped["evals"]:
        del e["problems"], e["truncated_frac"]
    old.write_text(json.dumps(stripped))
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "15 of 15 runs done" in again.stdout, again.stdout[-2000:]
    assert json.loads(old.read_text())["evals"] == runs["sft-s0"]["evals"]


def test_bench_learning_toy_quick(tmp_path):
    cmd, out, work = bench_learning(tmp_path, "--task", "toy")
    results = json.loads((out / "learning.json").read_text())
    assert set(results["methods"]) == {"opsd_fixed", "opsd_live", "grpo", "sft"}
    for method, curves in results["methods"].items():
        assert len(curves) == 1  # --quick: one seed
        c = curves[0]
        assert [s["step"] for s in c["steps"]] == [1, 2]
        assert c["evals"][0]["step"] == 0 and c["evals"][-1]["step"] == 2
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in c["evals"])
        tokens = c["steps"][-1]["tokens_generated_total"]
        assert (tokens == 0) if method == "sft" else (tokens > 0)
        assert c["steps"][-1]["wall_seconds"] > 0
    # OPSD records the teacher-student gap on its samples; the base report holds both contexts.
    assert all(s["kl_sampled"] is not None for s in results["methods"]["opsd_fixed"][0]["steps"])
    for key in ("student_accuracy", "teacher_accuracy", "reference_logprob_student", "reference_logprob_teacher"):
        assert key in results["base"]
    assert (out / "learning.png").stat().st_size > 10_000
    table = (out / "learning.md").read_text()
    assert "| GRPO |" in table and "| SFT |" in table
