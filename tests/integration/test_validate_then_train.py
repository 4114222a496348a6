"""`opsd validate` says ok only where `opsd train` gets to its first step: real starts of the CLI.

The refusals are compared in tests/unit/test_problems.py (train refuses before Ray starts); here a
file and limits that validate passes, with over-long rows dropped by prompt.overlong=skip, go
through a real run's first step, and the rows it trained on are the ones validate counted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.config import REPO_ROOT

from .conftest import read_metrics

# A full CLI start (~70 s): make test-slow; tests/unit/test_problems.py compares the verdicts in the default run.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opsd.launch.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)


def test_what_validate_passes_trains_a_step(tmp_path, tiny_model):
    short = [{"id": f"s{i}", "problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}. \\boxed{{{i + 1}}}"}
             for i in range(9)]
    long = [{"id": f"l{i}", "problem": "What is 2 + 2?", "solution": "two " * 400 + "\\boxed{4}"} for i in range(3)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in short + long))
    args = ["configs/tiny.yaml", f"data.train_path={rows}", "prompt.overlong=skip", "prompt.max_prompt_len=250",
            "train.prompts_per_step=8", "eval.every=0"]

    validated = cli("validate", *args)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.splitlines()[-1] == "ok"
    assert f"data: data.train_path {rows}: 12 problems, 9 usable; 3 dropped by prompt.overlong=skip" in validated.stdout

    run_dir = tmp_path / "run"
    trained = cli("train", *args, f"run_dir={run_dir}", "train.steps=1", "train.checkpoint_every=0",
                  "logging.progress=false")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-6000:]
    assert "opsd: skipped 3 over-long prompts" in trained.stdout
    [row] = read_metrics(run_dir)
    assert row["step"] == 1 and len(row["sample_ids"]) == 8
    assert all(uid.split("#")[0].startswith("s") for uid in row["sample_ids"]), row["sample_ids"]

    # One more problem per step than is usable: validate and train refuse alike, before Ray.
    refused = [cli("validate", *args, "train.prompts_per_step=10"),
               cli("train", *args, "train.prompts_per_step=10", f"run_dir={tmp_path / 'run2'}")]
    assert [p.returncode for p in refused] == [2, 2]
    assert refused[0].stderr == refused[1].stderr and "more than the 9 usable problems" in refused[0].stderr
