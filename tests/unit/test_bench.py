"""`opsd bench`: the structure of what it prints and returns (never a time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.config import REPO_ROOT


def test_bench_loss_cli_prints_and_writes_figures(tmp_path, capsys):
    from opsd.launch.cli import main

    out = tmp_path / "loss.json"
    argv = ["bench", "loss", "--vocab", "600", "--tokens", "48", "--chunk", "16", "--hidden", "16",
            "--topk", "8", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bench loss: V=600 T=48 H=16 k=8 float32 on cpu" in printed
    assert "chunked   chunk_size=    16" in printed and "unchunked chunk_size=    48" in printed
    assert "peak memory unchunked / chunked" in printed

    report = json.loads(out.read_text())
    assert (report["vocab"], report["tokens"], report["chunk"], report["device"]) == (600, 48, 16, "cpu")
    for name, size in (("chunked", 16), ("unchunked", 48)):
        assert report[name]["chunk_size"] == size
        assert report[name]["seconds"] > 0 and report[name]["peak_mb"] >= 0
    assert report["memory_ratio"] >= 0 and report["time_ratio"] > 0
    # Chunking changes the order of a sum, nothing else.
    assert report["loss_abs_diff"] < 1e-5
    assert report["machine"]["cpus"] >= 1


def test_bench_loss_bf16_returns_same_keys():
    from opsd.benchmarks.bench import bench_loss

    lines: list[str] = []
    report = bench_loss(vocab=300, tokens=20, chunk=8, hidden=8, k=4, device="cpu", dtype="bfloat16", out=lines.append)
    assert report["dtype"] == "bfloat16" and len(lines) == 4
    assert set(report) >= {"chunked", "unchunked", "memory_ratio", "time_ratio", "loss_chunked", "loss_unchunked"}


def test_summarize_metrics_skips_the_first_step():
    from opsd.benchmarks.bench import summarize_metrics

    def row(step, s):
        return {"step": step, "rollout_seconds": s, "score_seconds": 1.0, "train_seconds": 2.0, "sync_seconds": 0.5,
                "step_seconds": s + 3.5, "tokens_generated": 100}

    summary = summarize_metrics([row(1, 50.0), row(2, 1.0), row(3, 3.0), row(4, 2.0)])
    assert summary["steps"] == 4 and summary["steady_steps"] == 3
    assert summary["phases"]["rollout"] == {"mean": 2.0, "median": 2.0}
    assert summary["phases"]["step"]["mean"] == pytest.approx(5.5)
    assert summary["tokens_per_rollout_second"] == pytest.approx(300 / 6.0)
    assert summary["first_step_seconds"] == pytest.approx(53.5)


@pytest.mark.parametrize("params_m", [10, 100, 600])
def test_qwen3_shaped_config_hits_the_size(params_m):
    from opsd.benchmarks.sync import qwen3_shaped_config, qwen3_shapes

    shapes = qwen3_shapes(qwen3_shaped_config(params_m))
    n = sum(int(__import__("math").prod(s)) for _, s in shapes)
    assert 0.75 * params_m * 1e6 < n < 1.25 * params_m * 1e6
    assert not any(name == "lm_head.weight" for name, _ in shapes)  # tied, as the learner pushes


def test_bench_module_imports_no_heavy_stack():
    """scripts/gpu_check.sh runs `bench loss` on a machine without ray, vllm or deepspeed."""
    code = ("import sys, opsd.benchmarks.bench, opsd.launch.cli; opsd.launch.cli.build_parser(); "
            "print(sorted(m for m in ('ray', 'vllm', 'deepspeed', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_stopwatch_times_and_restores():
    import types

    from opsd.benchmarks.bench import _Stopwatch

    class Thing:
        def work(self, x):
            return x + 1

    mod = types.SimpleNamespace(helper=lambda: 7)
    orig_work, orig_helper = Thing.work, mod.helper
    watch = _Stopwatch()
    watch.wrap(Thing, "work", "work")
    watch.wrap(mod, "helper", "helper")
    assert Thing().work(1) == 2 and Thing().work(2) == 3 and mod.helper() == 7
    assert set(watch.seconds) == {"work", "helper"} and all(v >= 0 for v in watch.seconds.values())
    watch.restore()
    assert Thing.work is orig_work and mod.helper is orig_helper


@pytest.mark.parametrize("lora", [(), ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")],
                         ids=["full", "lora"])
def test_bench_step_reference_trains_the_step_it_times(lora):
    """The single-process loop of `opsd bench step`: every stage runs and the loss is OPSD's (a
    JSD of the student against the teacher, > 0 on sampled answers); other algorithms are refused.
    With LoRA the fixed teacher is the student with its adapters off."""
    import math

    from opsd.benchmarks.step import reference_steps
    from opsd.config import load_config
    from opsd.assets.models import resolve_model_path

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["train.prompts_per_step=4", "rollout.max_tokens=16",
                                                           "learner.micro_batch_size=3", *lora])
    rows = reference_steps(cfg, resolve_model_path("tiny"), 2, threads=1, out=lambda m: None)
    assert len(rows) == 2
    for r in rows:
        assert 4 <= r["tokens_generated"] <= 4 * 16
        assert all(r[f"{k}_seconds"] > 0 for k in ("rollout", "score", "train"))
        assert abs(r["step_seconds"] - r["rollout_seconds"] - r["score_seconds"] - r["train_seconds"]) < 1e-6
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < math.log(2)  # a JSD (beta 0.5) is below log 2
    with pytest.raises(ValueError, match="algo=grpo"):
        reference_steps(load_config(REPO_ROOT / "configs" / "grpo-local.yaml"), resolve_model_path("tiny"), 1,
                        threads=1)


def test_bench_head_compares_targets_on_the_ids_both_top_k_lists_hold():
    import numpy as np

    from opsd.benchmarks.head import _compare

    # One row, two positions, top-2. Position 0: same ids, log-probs off by 0.1 and 0.3; position 1:
    # the lists share id 7 only (off by 0.5), and the top-1 ids differ.
    ref = [(np.array([[1, 2], [5, 7]]), np.array([[-0.1, -2.0], [-0.2, -1.0]]), np.array([-0.1, -1.0]))]
    other = [(np.array([[1, 2], [7, 9]]), np.array([[-0.2, -2.3], [-0.5, -3.0]]), np.array([-0.3, -0.5]))]
    c = _compare(ref, other)
    assert c["sampled_token_abs_mean"] == pytest.approx((0.2 + 0.5) / 2) and c["sampled_token_abs_max"] == pytest.approx(0.5)
    assert c["topk_abs_mean"] == pytest.approx((0.1 + 0.3 + 0.5) / 3) and c["topk_abs_max"] == pytest.approx(0.5)
    assert c["top1_agreement"] == pytest.approx(0.5)


def test_bench_step_scaling_settings_parse_and_bad_ones_are_named():
    from opsd.benchmarks.bench import _settings
    from opsd.benchmarks.step import SCALING

    assert _settings([]) == SCALING == ((8, 64), (16, 64), (32, 64), (8, 128), (8, 256))
    assert _settings(["16x64", "8X256"]) == ((16, 64), (8, 256))
    with pytest.raises(SystemExit, match="'16-64' is not PROMPTSxTOKENS"):
        _settings(["16-64"])


def git_ignores(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT).returncode == 0


def test_learning_reports_go_to_an_untracked_folder_by_default():
    """A user's `opsd bench learning` must not overwrite the project's records in docs/results/;
    the documented commands that update those records name --out."""
    import re

    from opsd.benchmarks.bench import LEARNING_OUT

    assert sorted(LEARNING_OUT) == ["mbpp", "smollm2", "sparse", "toy"]
    for out in LEARNING_OUT.values():
        assert git_ignores(f"{out}/report.json"), f"{out} is not git-ignored"
    results = (REPO_ROOT / "docs" / "RESULTS.md").read_text()
    commands = re.findall(r"^opsd bench learning[^\n#]*", results, flags=re.MULTILINE)
    assert len(commands) >= 3 and all("--out docs/results" in c for c in commands), commands


def test_no_bench_writes_into_a_tracked_folder_by_default():
    """Every `opsd bench` subcommand's default --out is git-ignored (docs/bench/soak, the project's
    soak record, was once the soak's default: a user's soak overwrote it)."""
    import argparse

    from opsd.benchmarks.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    defaults = {name: a.default for name, p in sub.choices.items() for a in p._actions if "--out" in a.option_strings}
    assert "soak" in defaults and "learning" in defaults
    for name, out in defaults.items():
        if out is None:  # chosen per task at run time (test above)
            continue
        assert git_ignores(f"{out}/report.json"), f"opsd bench {name}: --out defaults to {out}, which git tracks"


def test_bench_step_head_paths_runs_each_path_in_one_invocation(monkeypatch):
    """`opsd bench step --head-paths module auto` (issue 40): one opsd run per path, in order, each
    with model.lm_head_path set, and each run's step time against the first's."""
    import argparse

    from opsd.benchmarks import step
    from opsd.benchmarks.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["step", "--head-paths", "module", "auto", "module"])
    assert args.head_paths == ["module", "auto", "module"]
    with pytest.raises(SystemExit):
        p.parse_args(["step", "--head-paths", "cast"])
    runs = []

    def fake_run(config, overrides, extra, steps):
        runs.append(extra)
        seconds = {"module": 2.0, "auto": 1.0}[extra[0].split("=")[1]]
        return {"step_seconds": seconds, "train_seconds": seconds / 2, "tokens_per_second": 10 / seconds}

    monkeypatch.setattr(step, "_opsd_run", fake_run)
    report = step.bench_head_paths(str(REPO_ROOT / "configs" / "tiny.yaml"), [], 2, ("module", "auto"), out=lambda s: None)
    assert runs == [["model.lm_head_path=module"], ["model.lm_head_path=auto"]]
    assert [r["step_ratio"] for r in report["head_paths"]] == [1.0, 0.5]
