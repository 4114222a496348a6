"""NumericsWatch (launch/recovery.py): which skipped updates are faults, which are fp16's loss
scaler calibrating, and when enough faults in a row stop the run."""

from __future__ import annotations

import pytest

from opsd.config import REPO_ROOT, load_config
from opsd.launch.checkpoints import RunDir
from opsd.launch.recovery import NumericsWatch
from opsd.launch.stopping import BadSteps


def row(step, skipped, ids=()):
    return {"step": step, "update_skipped": skipped, "nonfinite_sample_ids": list(ids), "loss": 0.5 if not ids else
            float("nan"), "grad_norm": 1.0}


def watch(dtype, bad=2):
    return NumericsWatch(load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"model.dtype={dtype}",
                                                                           f"train.max_bad_steps={bad}"]))


def test_fp16_overflow_skips_are_counted_and_said_but_never_stop_the_run(tmp_path):
    w, lines = watch("float16"), []
    for step in range(1, 6):  # five overflow skips in a row: more than max_bad_steps, not faults
        w.see(row(step, True), lines.append, RunDir(tmp_path))
    w.see(row(6, False), lines.append, RunDir(tmp_path))
    assert w.overflow_skips == 5 and w.bad_steps == []
    assert len(lines) == 5 and "step 5: the fp16 loss scale overflowed" in lines[-1] and "(5 such step(s)" in lines[-1]


def test_non_finite_losses_in_a_row_stop_the_run_and_a_good_step_resets_the_count(tmp_path):
    w, lines = watch("float32"), []
    w.see(row(1, True, ["a#0"]), lines.append, RunDir(tmp_path))
    w.see(row(2, False), lines.append, RunDir(tmp_path))
    w.see(row(3, True, ["b#1"]), lines.append, RunDir(tmp_path))
    with pytest.raises(BadSteps, match="steps 3-4: 2 steps in a row"):
        w.see(row(4, True), lines.append, RunDir(tmp_path))  # a non-finite gradient, no sample named
    assert "the loss of samples a#0 is not finite" in lines[0] and "the gradient is not finite" in lines[-1]
    # In fp16 a skip with a non-finite loss is a fault as in any dtype.
    w16 = watch("float16", bad=1)
    with pytest.raises(BadSteps):
        w16.see(row(1, True, ["c#0"]), lines.append, RunDir(tmp_path))
    assert w16.overflow_skips == 0
