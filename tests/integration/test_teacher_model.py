"""teacher.model: a tiny run whose teacher is another tiny checkpoint (the same tokenizer, other
weights, a chat template of its own; tests/conftest.py ``teacher_model``), through `opsd train`.

The saved batches' teacher targets must be that checkpoint's, by an independent Hugging Face
forward of it on each row's teacher prompt + response (float32, 1e-4; tolerances as in
test_engine_scoring.py), and not the student's; the teacher prompts must be rendered with the
teacher's chat template; the batches name the teacher; the teacher never moves (version 0).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, read_ipc
from opsd.config import REPO_ROOT

from tests.conftest import TEACHER_SYSTEM
from .test_engine_scoring import assert_same_targets, forward_targets

pytestmark = pytest.mark.integration

STEPS = 2


def train(run_dir: Path, teacher: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "opsd.launch.cli", "train", "configs/tiny.yaml", f"run_dir={run_dir}",
           f"train.steps={STEPS}", "train.checkpoint_every=0", "eval.every=0", "logging.save_batches=true",
           "logging.progress=false", "logging.tensorboard=false", f"teacher.model={teacher}", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"opsd train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert f"the teacher is another model: {teacher} (fixed; no weight pushes)" in proc.stdout
    return run_dir


def check_batches(run_dir: Path, student_dir: str, teacher_dir: str) -> int:
    """Every saved row against independent forwards of the teacher and of the student; returns
    the rows checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    paths = sorted((run_dir / "batches").glob("step_*.arrow"))
    assert len(paths) == STEPS
    checked, apart = 0, 0.0
    for path in paths:
        table = read_ipc(path)
        meta = batch_meta(table)
        assert (meta["opsd.teacher_mode"], meta["opsd.teacher_model"]) == ("fixed", teacher_dir)
        assert set(table.column("teacher_version").to_pylist()) == {0}
        for row in table.to_pylist():
            ctx, resp = row["teacher_prompt_ids"], row["response_ids"]
            # Rendered by the teacher's builder: its chat template's system turn opens the prompt;
            # the student's prompt, from the student's template, has none.
            assert tok.decode(ctx).startswith(f"<|im_start|>system\n{TEACHER_SYSTEM}<|im_end|>\n")
            assert TEACHER_SYSTEM not in tok.decode(row["prompt_ids"])
            k = len(row["teacher_topk_ids"][0])
            assert_same_targets(row, *forward_targets(teacher, ctx, resp, k))
            apart = max(apart, float(np.abs(forward_targets(student, ctx, resp, k)[2]
                                            - np.array(row["teacher_token_logprobs"])).max()))
            checked += 1
    # The student's weights (seed 0) would have given other targets: the check can tell them apart.
    assert apart > 1e-2, apart
    return checked


def test_a_run_distils_from_another_checkpoint_with_its_own_targets_and_template(tiny_model, teacher_model,
                                                                                 tmp_path_factory):
    run_dir = train(tmp_path_factory.mktemp("teacher-model") / "run", teacher_model)
    assert check_batches(run_dir, tiny_model, teacher_model) == STEPS * 8  # train.prompts_per_step x rollout.n 1
    assert f"model: {teacher_model}" in (run_dir / "config.yaml").read_text()


# `make test-slow`: a vLLM engine of its own, as test_engine_scoring.py's.
@pytest.mark.slow
def test_the_vllm_scorer_serves_another_checkpoint_with_context_none(tiny_model, teacher_model, tmp_path_factory):
    """scorer.backend=vllm loads teacher.model on its engine; teacher.context=none is plain on-policy
    distillation from it: the teacher reads the student's prompt in the teacher's template."""
    from transformers import AutoTokenizer

    run_dir = train(tmp_path_factory.mktemp("teacher-model-vllm") / "run", teacher_model, "scorer.backend=vllm",
                    "teacher.context=none")
    check_batches(run_dir, tiny_model, teacher_model)
    tok = AutoTokenizer.from_pretrained(teacher_model)
    row = read_ipc(sorted((run_dir / "batches").glob("step_*.arrow"))[0]).to_pylist()[0]
    student_prompt = tok.decode(row["prompt_ids"])
    assert tok.decode(row["teacher_prompt_ids"]) == f"<|im_start|>system\n{TEACHER_SYSTEM}<|im_end|>\n" + student_prompt
