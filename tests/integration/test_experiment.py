"""`opsd bench learning --quick`: the OPSD / GRPO / SFT comparison end to end, as a smoke run.

Marked slow (several Ray + vLLM + DeepSpeed runs in a row): `make test-slow` runs it, the default
`make test` does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.config import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


def test_bench_learning_quick(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "-m", "launch.cli", "bench", "learning", "--quick", "--out", str(out),
           "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"bench learning failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
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
