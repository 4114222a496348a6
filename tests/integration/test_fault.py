"""Test 6: a rollout actor killed mid-run is restarted, and every prompt is trained on once; with
each kind of weight transport (a collective one must also form its group again)."""

from __future__ import annotations

from collections import Counter

import pytest

from opsd.launch.driver import Trainer

from .conftest import make_trainer, read_metrics

pytestmark = pytest.mark.integration


class KillingTrainer(Trainer):
    def train_one_step(self, step):
        import ray

        if step == 2:  # before its rollouts are submitted
            actor = self.actors.rollouts.actors[0]
            self.pid_before = ray.get(actor.ready.remote())["pid"]
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
        pid_after = ray.get(trainer.actors.rollouts.actors[0].ready.remote())["pid"]
        version_after = ray.get(trainer.actors.rollouts.actors[0].get_version.remote())
    finally:
        trainer.shutdown()
    assert pid_after != trainer.pid_before, "the rollout actor was not restarted"
    assert version_after == 2  # the restarted actor was brought to the current weights
    metrics = read_metrics(run_dir.path)
    assert [m["dropped_stale"] for m in metrics] == [0, 0]
    uids = Counter(sid.rsplit("#", 1)[0] for m in metrics for sid in m["sample_ids"])
    assert len(uids) == 16 and set(uids.values()) == {1}
    assert {p.uid for p in trainer.data.pairs} == set(uids)
