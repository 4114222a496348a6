"""A non-finite loss never reaches the weights: the step's update is skipped and logged with the
samples that caused it, and train.max_bad_steps skipped steps in a row stop the run.

The fault is injected into the real Arrow batch: one sample's teacher targets become NaN after
the scorer wrote them, so its micro-batch's loss is NaN on whichever rank holds it.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from opsd.launch.driver import Trainer
from opsd.launch.stopping import BadSteps

from .conftest import make_trainer, read_metrics

pytestmark = pytest.mark.integration

POISONED_STEPS = (2, 4, 5)


class PoisoningTrainer(Trainer):
    """Writes NaN into row 0's teacher log-probs at POISONED_STEPS; keeps the weights after each step."""

    def score(self, ready):
        table = super().score(ready)
        if ready.step not in POISONED_STEPS:
            return table
        i = table.schema.get_field_index("teacher_topk_logprobs")
        col = table.column(i).to_pylist()
        col[0] = [[math.nan] * len(pos) for pos in col[0]]
        self.poisoned = getattr(self, "poisoned", []) + [table.column("sample_id")[0].as_py()]
        return table.set_column(i, table.schema.field(i), pa.array(col, table.schema.field(i).type))

    def train_one_step(self, step):
        row = super().train_one_step(step)
        self.weights_after = getattr(self, "weights_after", {})
        self.weights_after[step] = self.actors.learner.full_state()
        return row


# ZeRO-2 over 2 ranks: DeepSpeed's own overflow check skips the step. fp32 without ZeRO (1 rank:
# stage 0 needs one) would apply it; the learner checks the gradients itself there.
@pytest.mark.parametrize("zero_stage, ranks", [(2, 2), pytest.param(0, 1, marks=pytest.mark.slow)],
                         ids=["zero2-deepspeed-skips", "zero0-opsd-skips"])
def test_non_finite_steps_are_skipped_and_enough_in_a_row_stop_the_run(zero_stage, ranks, tmp_path, ray_session):
    trainer, run = make_trainer(
        tmp_path, "train.steps=6", "train.checkpoint_every=0", "eval.every=0", "train.max_bad_steps=2",
        "train.prompts_per_step=4", f"learner.zero_stage={zero_stage}",
        f"learner.num_ranks={ranks}", cls=PoisoningTrainer,
    )
    try:
        with pytest.raises(BadSteps) as stopped:
            trainer.run_steps(run)
    finally:
        trainer.shutdown()
    message = str(stopped.value)
    assert "steps 4-5: 2 steps in a row" in message and "train.max_bad_steps=2" in message, message
    assert "the weights are those of step 3" in message and "no checkpoint was written" in message

    rows = read_metrics(run.path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # the run stopped after step 5, loudly
    assert [r["update_skipped"] for r in rows] == [False, True, False, True, True]
    for r, poisoned in zip([rows[1], rows[3], rows[4]], trainer.poisoned):
        assert not math.isfinite(r["loss"])
        assert poisoned in r["nonfinite_sample_ids"]  # named with the rest of its micro-batch
        assert set(r["nonfinite_sample_ids"]) <= set(r["sample_ids"])
    assert "nonfinite_sample_ids" not in rows[0] and math.isfinite(rows[2]["loss"])
    w = trainer.weights_after
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(w[2], w[1]), "the NaN step changed the weights"
    assert not same(w[3], w[2]), "the good step after it did not train"
    assert same(w[5], w[3]) and same(w[4], w[3])
    assert all(bool(torch.isfinite(t).all()) for t in w[5].values())


WARMUP = 20  # steps of linear learning-rate warmup: the whole run is inside it


# Both paths: DeepSpeed's overflow check under ZeRO-2, opsd's own check without ZeRO.
# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores; skipped steps
# themselves are checked by the test above.
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ranks", [(0, 1), (2, 2)], ids=["zero0-opsd-skips", "zero2-deepspeed-skips"])
def test_the_learning_rate_schedule_counts_applied_updates_only(zero_stage, ranks, tmp_path, ray_session):
    """A run with skipped steps follows the schedule of a run without them (docs/DESIGN.md, "Faults")."""
    trainer, run = make_trainer(
        tmp_path, "train.steps=6", "train.checkpoint_every=0", "eval.every=0", "train.max_bad_steps=3",
        "train.prompts_per_step=4", f"learner.zero_stage={zero_stage}", f"learner.num_ranks={ranks}",
        f"learner.warmup_steps={WARMUP}", cls=PoisoningTrainer,
    )
    try:
        trainer.run_steps(run)
    finally:
        trainer.shutdown()
    rows = read_metrics(run.path)
    assert [r["update_skipped"] for r in rows] == [False, True, False, True, True, False]
    # The logged rate is the next step's. DeepSpeed's WarmupLR sits at position -1 before the first
    # update and gives lr * position / WARMUP: after the k-th applied update, lr * (k - 1) / WARMUP.
    lr, applied = trainer.cfg.learner.lr, 0
    for r in rows:
        applied += not r["update_skipped"]
        assert r["lr"] == pytest.approx(lr * max(applied - 1, 0) / WARMUP, rel=1e-6, abs=1e-12), [
            (x["step"], x["lr"]) for x in rows]
    assert rows[-1]["lr"] > 0  # the schedule moved
