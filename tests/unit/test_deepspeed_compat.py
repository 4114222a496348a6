"""workers/deepspeed_compat.py: the hooks into DeepSpeed's internals, and the refusal to run
them on a DeepSpeed they were not checked against (the Muon import: tests/unit/test_learner.py)."""

from __future__ import annotations

import importlib
import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from opsd.workers import deepspeed_compat


class NotATensor:
    """What a tampered checkpoint could carry: an object whose unpickling runs code of its own."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_the_installed_deepspeed_is_a_checked_one_and_another_is_refused_naming_the_file(monkeypatch):
    import deepspeed

    deepspeed_compat.check_version()  # pyproject.toml pins a checked version
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.99\.0.*workers/deepspeed_compat\.py.*0\.19\.8"):
        deepspeed_compat.check_version()


def test_checkpoints_are_read_as_tensors_and_nothing_else(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(6.0).view(2, 3), "step": 4}, good)
    torch.save({"w": torch.zeros(1), "payload": NotATensor()}, bad)
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=lambda path, map_location=None: torch.load(
        path, map_location=map_location, weights_only=False)))
    # DeepSpeed's own reader would run the payload; the restricted one refuses the file.
    deepspeed_compat.load_checkpoints_as_tensors(engine)
    loaded = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert torch.equal(loaded["w"], torch.arange(6.0).view(2, 3)) and loaded["step"] == 4
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine.checkpoint_engine.load(str(bad), map_location="cpu")
    with pytest.raises(RuntimeError, match="no checkpoint_engine.load"):
        deepspeed_compat.load_checkpoints_as_tensors(SimpleNamespace())


def test_a_skipped_optimizer_step_changes_nothing_and_the_next_one_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)  # a warmup
    engine = SimpleNamespace(optimizer=optimizer, lr_scheduler=schedule, skipped_steps=0)
    own_step = vars(optimizer)["step"]  # the schedule wraps the optimizer's step in one of its own
    w.grad = torch.ones(4)
    before = w.detach().clone()
    with deepspeed_compat.optimizer_step_skipped(engine):
        engine.optimizer.step()
        engine.lr_scheduler.step()
    # no update, no moment estimates, the schedule where it was, the skip counted as DeepSpeed counts its own
    assert torch.equal(w.detach(), before) and optimizer.state == {}
    assert schedule.last_epoch == 0 and math.isclose(optimizer.param_groups[0]["lr"], 0.01)
    assert engine.skipped_steps == 1
    engine.optimizer.step()  # the optimizer's and the schedule's own steps are back
    engine.lr_scheduler.step()
    assert schedule.last_epoch == 1 and math.isclose(optimizer.param_groups[0]["lr"], 0.02)
    assert not torch.equal(w.detach(), before)
    assert vars(optimizer)["step"] is own_step and "step" not in vars(schedule)


def test_the_backend_is_started_without_the_shm_op_and_a_deepspeed_without_the_hook_is_refused(monkeypatch):
    backend = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: that is the torch package
    monkeypatch.setattr(backend, "build_shm_op", backend.build_shm_op)  # DeepSpeed's own, put back after the test
    deepspeed_compat.without_shm_comm_op()
    assert backend.build_shm_op() is None
    monkeypatch.delattr(backend, "build_shm_op")
    with pytest.raises(RuntimeError, match=r"no deepspeed\.comm\.torch\.build_shm_op.*deepspeed_compat\.py"):
        deepspeed_compat.without_shm_comm_op()
