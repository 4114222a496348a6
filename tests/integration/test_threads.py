"""Each actor runs the torch threads its config gives it: ``<role>.num_threads``, else the whole
CPUs Ray reserved for it (at least one)."""

from __future__ import annotations

import math

import pytest

from .conftest import make_trainer

pytestmark = pytest.mark.integration


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores; the threads each
# role is given are computed and checked in tests/unit/test_config.py (actor_threads).
@pytest.mark.slow
def test_every_role_runs_the_threads_its_config_names(tmp_path, ray_session):
    # configs/tiny.yaml reserves 1 CPU per rollout worker, 0.5 per scorer and 0.25 per learner rank.
    trainer, run = make_trainer(tmp_path, "rollout.num_threads=2", "scorer.num_threads=2", "train.steps=1",
                                "eval.every=0", "train.checkpoint_every=0")
    try:
        # Set explicitly for rollout and scorer; the learner's default is its (fractional) CPU: 1.
        assert trainer.actors.thread_counts() == {"rollout": [2], "scorer": [2], "learner": [1, 1]}
        trainer.run = run
        row = trainer.train_one_step(1)  # vLLM pins torch's thread count after start; it still runs
        assert row["samples"] > 0 and math.isfinite(row["loss"])
    finally:
        trainer.shutdown()
