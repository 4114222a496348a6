"""Test 6: a rollout actor killed mid-run is restarted, and every prompt is trained on once; with
each kind of weight transport (a collective one must also form its group again)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest

from opsd.batch import read_ipc
from opsd.launch import actors
from opsd.launch.driver import Trainer
from opsd.workers.rollout import RolloutWorker

from .conftest import make_trainer, read_metrics

pytestmark = pytest.mark.integration


class KillingTrainer(Trainer):
    def train_one_step(self, step):
        import ray

        if step == 2:  # before its rollouts are submitted
            actor = self.actors.rollouts.actors[0]
            self.incarnation_before = ray.get(actor.ready.remote())["incarnation"]
            ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts); the driver retries
        return super().train_one_step(step)


# With gloo the restarted actor must also rejoin the collective. The whole test runs in
# `make test-slow`, to keep the default run under 20 minutes on 2 cores. The default run keeps
# the harder gloo case in test_staleness.py (a rollout worker lost while the learner trains, with
# the next batch scored ahead), which asserts the same restart, catch-up and once-per-prompt
# accounting.
# "on-engine": a live teacher scored by the rollout engines (scorer.on_rollout_engines), whose
# restarted actor must score with the current weights too.
# "lora-adapter": the engines serve the student as a LoRA adapter and score the fixed teacher on
# their base weights (model.lora.serve=adapter); the restarted actor must get the adapter back.
ON_ENGINE = {"on-engine": ("teacher.mode=live", "scorer.on_rollout_engines=true"),
             "lora-adapter": ("model.lora.enabled=true", "model.lora.serve=adapter", "model.lora.r=4",
                              "model.lora.alpha=8", "scorer.on_rollout_engines=true")}


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "gloo", "on-engine", "lora-adapter"])
def test_rollout_actor_death_loses_and_repeats_nothing(transport, tmp_path, ray_session):
    ray = ray_session
    extra = ON_ENGINE.get(transport, ())
    transport = "object_store" if transport in ON_ENGINE else transport
    # 16 problems, 8 per step, 2 steps: exactly one epoch.
    trainer, run_dir = make_trainer(
        tmp_path, "data.max_rows=16", "train.prompts_per_step=8", "train.steps=2",
        "train.checkpoint_every=0", "eval.every=0", f"sync.transport={transport}", *extra, cls=KillingTrainer,
    )
    try:
        trainer.run_steps(run_dir)
        incarnation_after = ray.get(trainer.actors.rollouts.actors[0].ready.remote())["incarnation"]
        version_after = ray.get(trainer.actors.rollouts.actors[0].get_version.remote())
    finally:
        trainer.shutdown()
    assert incarnation_after != trainer.incarnation_before, "the rollout actor was not restarted"
    assert version_after == 2  # the restarted actor was brought to the current weights
    metrics = read_metrics(run_dir.path)
    assert [m["dropped_stale"] for m in metrics] == [0, 0]
    uids = Counter(sid.rsplit("#", 1)[0] for m in metrics for sid in m["sample_ids"])
    assert len(uids) == 16 and set(uids.values()) == {1}
    assert {p.uid for p in trainer.data.pairs} == set(uids)


SAME_PID = 108


class SamePidRollout(RolloutWorker):
    """A real rollout worker whose every process says it is pid 108, as one restarted on a
    replacement host with a PID namespace of its own can be (issue 41)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._incarnation = dataclasses.replace(self._incarnation, pid=SAME_PID)


def _exit(_actor) -> None:
    os._exit(1)


class LosesItsRolloutTwice(Trainer):
    """Rollout 0's process exits twice: while idle just before the first push (which finds it),
    and as step 3 begins (its rollout call finds it). The test waits for each exit."""

    def _kill_rollout(self) -> None:
        import ray

        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(self.actors.rollouts.actors[0].__ray_call__.remote(_exit))

    def sync(self) -> None:
        if self.policy_version == 0:
            self._kill_rollout()
        super().sync()

    def train_one_step(self, step):
        if step == 3:
            self._kill_rollout()
        return super().train_one_step(step)


# Slow (`make test-slow`): two vLLM engine restarts took 4-5 minutes on 2 shared cores. The
# default run covers the pool's side with real actors in seconds (tests/integration/
# test_cluster.py) and a rollout worker lost mid-run in test_staleness.py.
@pytest.mark.slow
def test_a_rollout_restarted_with_its_old_pid_is_announced_and_samples_with_the_current_weights(
    tmp_path, ray_session, monkeypatch, capsys
):
    monkeypatch.setattr(actors, "RolloutWorker", SamePidRollout)
    trainer, run_dir = make_trainer(
        tmp_path, "data.max_rows=12", "train.prompts_per_step=4", "train.steps=3", "train.checkpoint_every=0",
        "eval.every=0", "logging.save_batches=true", "rollout.max_tokens=32", "learner.num_ranks=1",
        cls=LosesItsRolloutTwice,
    )
    try:
        trainer.run_steps(run_dir)
        version_after = ray_session.get(trainer.actors.rollouts.actors[0].get_version.remote())
        restarts = trainer.actors.rollouts.restarts
    finally:
        trainer.shutdown()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("opsd: warning: rollout")]
    # One line per death, whichever path saw it (the push's check, a failed call), each naming
    # the actor and showing that the new process had the old one's pid.
    assert len(lines) == 2 and restarts == 2, lines
    for n, line in enumerate(lines, 1):
        assert line.startswith("opsd: warning: rollout 0 died (") and f"(restart {n};" in line, line
        assert f"as pid {SAME_PID} on node" in line and f"it was pid {SAME_PID} on node" in line, line
    # Each restarted process was brought to the current weights before it sampled again: step 2's
    # samples come from the first push, step 3's from the second, none is stale or dropped.
    versions = [set(read_ipc(run_dir.path / "batches" / f"step_{s:06d}.arrow").column("policy_version").to_pylist())
                for s in (1, 2, 3)]
    assert versions == [{0}, {1}, {2}]
    assert version_after == 3
    metrics = read_metrics(run_dir.path)
    assert [m["dropped_stale"] for m in metrics] == [0, 0, 0]
    uids = Counter(sid.rsplit("#", 1)[0] for m in metrics for sid in m["sample_ids"])
    assert len(uids) == 12 and set(uids.values()) == {1}
