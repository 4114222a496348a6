"""A checkpoint that cannot be written: the disk fills up under the learner ranks mid-write.

Simulated with RLIMIT_FSIZE in the rank processes (a write past the limit fails with EFBIG, as one
on a full volume fails with ENOSPC), after one checkpoint was written normally.
"""

from __future__ import annotations

import pytest

from opsd.launch.checkpoints import CheckpointError, checkpoint_problem, latest_checkpoint

from .conftest import make_trainer

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024  # bytes a rank may write to one file; the tiny model's states are megabytes


def _limit_file_size(rank, limit: int) -> int:
    """Runs inside a learner rank (Ray's __ray_call__): writes past ``limit`` now fail."""
    import os
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return os.getpid()


def test_a_checkpoint_that_does_not_fit_fails_clearly_and_keeps_the_previous_one(tmp_path, ray_session):
    ray = ray_session
    trainer, run = make_trainer(tmp_path, "train.steps=2", "train.checkpoint_every=1", "eval.every=0")
    try:
        trainer.run = run
        trainer.train_one_step(1)
        trainer.step = 1
        first = trainer.save_checkpoint()
        assert checkpoint_problem(first) is None

        trainer.train_one_step(2)
        trainer.step = 2
        ray.get([r.__ray_call__.remote(_limit_file_size, LIMIT) for r in trainer.actors.learner.ranks])
        with pytest.raises(CheckpointError) as failed:
            trainer.save_checkpoint()
    finally:
        trainer.shutdown()
    message = str(failed.value)
    # torch.save reports the failed write as its own RuntimeError; the free space is named beside it.
    assert "writing checkpoint step_2" in message and "GiB free there" in message, message
    assert f"{first} is intact" in message and f"opsd train --resume {run.path}" in message
    assert "\n" not in message  # one line, not the remote traceback
    # Nothing half-written is left, and the previous checkpoint still verifies.
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_1"]
    assert latest_checkpoint(run.path) == first and checkpoint_problem(first) is None
