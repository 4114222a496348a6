"""Test 7: a fixed teacher never changes, a live one follows the policy, an EMA one moves by its decay."""

from __future__ import annotations

import pytest
import torch

from opsd.launch.driver import Trainer

from .conftest import make_trainer, read_metrics

pytestmark = pytest.mark.integration


class RecordingTrainer(Trainer):
    """Keeps the policy's weights after every push (a test-only view of the learner)."""

    def sync(self) -> None:
        super().sync()
        self.policy_history = getattr(self, "policy_history", [])
        self.policy_history.append(self.actors.learner.full_state())


class RepushingTrainer(RecordingTrainer):
    """Pushes every teacher sync twice under the same version, as a retried push reaches a
    receiver that already took it."""

    def sync(self) -> None:
        super().sync()
        if self.teacher_version == self.policy_version:
            self.actors.weights.push(self.policy_version, [self.actors.scorers])


def teacher_state(trainer) -> dict[str, torch.Tensor]:
    import ray

    return ray.get(trainer.actors.scorers.actors[0].state_dict_cpu.remote())


def initial_state(tiny_model) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).named_parameters())


# lr 1e-2 so that the policy moves far beyond the comparison tolerance.
COMMON = ("train.steps=2", "train.checkpoint_every=0", "learner.lr=1e-2", "eval.every=0")


def run(tmp_path, *overrides, cls=RecordingTrainer):
    import ray

    trainer, run_dir = make_trainer(tmp_path, *COMMON, *overrides, cls=cls)
    try:
        trainer.run_steps(run_dir)
        versions = ray.get([a.get_version.remote() for a in trainer.actors.scorers.actors])
        return trainer.policy_history, teacher_state(trainer), versions, read_metrics(run_dir.path)
    finally:
        trainer.shutdown()


def assert_close(a: dict, b: dict, names, atol=1e-6):
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_fixed_teacher_never_changes(tmp_path, tiny_model, ray_session):
    history, teacher, versions, metrics = run(tmp_path, "teacher.mode=fixed")
    theta0 = initial_state(tiny_model)
    names = list(history[-1])
    assert max((history[-1][n] - theta0[n]).abs().max().item() for n in names) > 1e-3  # the policy moved
    assert_close(teacher, {n: p.detach() for n, p in theta0.items()}, names, atol=0)
    assert versions == [0] and [m["teacher_version"] for m in metrics] == [0, 0]


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores; a live teacher
# scored on the rollout engines, which follow the policy by construction, is in test_engine_scoring.py.
@pytest.mark.slow
def test_live_teacher_follows_the_policy(tmp_path, tiny_model, ray_session):
    history, teacher, versions, metrics = run(tmp_path, "teacher.mode=live")
    assert_close(teacher, history[-1], list(history[-1]), atol=0)
    assert versions == [2] and [m["teacher_version"] for m in metrics] == [1, 2]


# gloo's path to the scorers is the one test_weight_sync exercises: `make test-slow` runs it here too.
@pytest.mark.parametrize("transport", ["object_store", pytest.param("gloo", marks=pytest.mark.slow)])
def test_ema_teacher_moves_by_its_decay(transport, tmp_path, tiny_model, ray_session):
    decay = 0.75
    history, teacher, versions, metrics = run(
        tmp_path, "teacher.mode=ema", f"teacher.ema_decay={decay}", "teacher.sync_every=2",
        f"sync.transport={transport}", cls=RepushingTrainer,
    )
    theta0 = {n: p.detach() for n, p in initial_state(tiny_model).items()}
    # Synced at step 2 only, once although pushed twice: teacher = decay * theta0 + (1 - decay) * theta2.
    expected = {n: decay * theta0[n] + (1 - decay) * history[1][n] for n in history[1]}
    assert_close(teacher, expected, list(expected))
    assert versions == [2] and [m["teacher_version"] for m in metrics] == [0, 2]
