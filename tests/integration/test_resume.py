"""Interrupted runs repeat an uninterrupted one exactly: the same prompts in the same order, the
same samples and the same losses.

- SIGTERM: the stopped run gets a real SIGTERM during step 3: it finishes that step, writes a
  checkpoint at step 3 and raises Stopped. That checkpoint is then damaged on disk, so the resumed
  run must find it out by its manifest and fall back to the scheduled one at step 2.
- Learner death: a learner rank is killed in step 3; the driver restarts the learner group from
  the checkpoint at step 2 within the same run and trains steps 3 and 4 again.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pytest

import opsd.launch.driver as driver
import opsd.workers.learner as learner_module
from opsd.launch.driver import train
from opsd.launch.stopping import LearnerLost, Stopped
from opsd.config import REPO_ROOT
from opsd.workers.learner import LearnerRank

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
COMMON = ("train.checkpoint_every=2", "eval.every=0")
SIGNAL_IN_STEP = 3


class SignalledTrainer(driver.Trainer):
    """Sends this process a SIGTERM as step SIGNAL_IN_STEP begins (what `ray job stop` or a
    Kubernetes preemption would send), then lets the step run."""

    def train_one_step(self, step: int) -> dict:
        if step == SIGNAL_IN_STEP:
            # To the main thread (this one), which handles it before pthread_kill returns.
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        return super().train_one_step(step)


@pytest.fixture(scope="module")
def full(tmp_path_factory, ray_session):
    """The uninterrupted run both tests are compared with."""
    return train(CONFIG, local_overrides(tmp_path_factory.mktemp("full"), "train.steps=4", *COMMON))


def assert_repeats(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["sample_ids"] == y["sample_ids"], f"step {x['step']}: different prompts"
        assert x["policy_version"] == y["policy_version"]
        assert x["tokens_generated"] == y["tokens_generated"], f"step {x['step']}: different samples"
    # Same weights, optimizer state and samples: the losses agree to float32 rounding.
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    assert b[-1]["tokens_generated_total"] == a[-1]["tokens_generated_total"]


def test_a_stopped_run_resumes_from_its_last_sound_checkpoint_and_repeats_the_uninterrupted_run(
    full, tmp_path, ray_session, monkeypatch, capsys
):

    part = tmp_path / "part" / "run"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(driver, "Trainer", SignalledTrainer)
        with pytest.raises(Stopped) as stopped:
            train(CONFIG, local_overrides(tmp_path / "part", "train.steps=4", *COMMON))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"after step {SIGNAL_IN_STEP} of 4" in str(stopped.value)
    assert f"resume with: opsd train --resume {part}" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handlers are gone with it
    assert [m["step"] for m in read_metrics(part)] == [1, 2, 3]
    ckpts = part / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_3"]  # step 3: written by the stop
    files = json.loads((ckpts / "step_3" / "manifest.json").read_text())["files"]
    assert "driver_state.json" in files and any(f.startswith("learner/") for f in files)

    # Damage the stop's checkpoint: one flipped byte in its largest file.
    victim = max((ckpts / "step_3").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else -1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()

    # The resumed run reads its saved config; nothing else changes.
    resumed = train(None, [f"train.resume={part}"])
    assert resumed == part
    out = capsys.readouterr().out
    assert "checkpoint step_3 is damaged" in out and "does not match its checksum" in out
    assert f"resumed from {ckpts / 'step_2'}" in out

    # Step 3 of the stopped run is forgotten, then redone.
    assert_repeats(read_metrics(full), read_metrics(resumed))


class LearnerKillingTrainer(driver.Trainer):
    """Kills learner rank ``victim`` once its step's batch is scored, in the steps of ``kill_in``
    (each once); the train call that follows finds the rank dead."""

    kill_in: tuple[int, ...] = (3,)
    victim = 1

    def score(self, ready):
        import ray

        batch = super().score(ready)
        self.killed = getattr(self, "killed", [])
        step = ready.step
        if step in self.kill_in and step not in self.killed:
            self.killed.append(step)
            ray.kill(self.actors.learner.ranks[self.victim])
        return batch


def test_a_dead_learner_rank_is_replaced_from_the_last_checkpoint_and_the_run_repeats_the_uninterrupted_one(
    full, tmp_path, ray_session, monkeypatch, capsys
):
    with monkeypatch.context() as m:
        m.setattr(driver, "Trainer", LearnerKillingTrainer)
        run = train(CONFIG, local_overrides(tmp_path, "train.steps=4", *COMMON))
    out = capsys.readouterr().out
    ckpt = run / "checkpoints" / "step_2"
    assert "a learner rank died in step 3" in out and f"restarting the learner group from {ckpt} (restart 1 of 2)" in out
    assert "learner group restarted at step 2" in out
    # Steps 3 and 4 trained once each in the surviving history (metrics rewound to step 2).
    assert_repeats(read_metrics(full), read_metrics(run))


FAULTS = REPO_ROOT / "artifacts" / "test-faults"  # markers a DyingRank process looks for


class DyingRank(LearnerRank):
    """A learner rank whose process dies (as an OOM kill would end it) in setup() or
    load_checkpoint() when the test left a marker for that call and rank; the marker is used up."""

    def setup(self, master_addr: str, master_port: int) -> dict:
        die_if_marked(f"setup-{self.rank}")
        return super().setup(master_addr, master_port)

    def load_checkpoint(self, ckpt_dir: str) -> int:
        die_if_marked(f"load_checkpoint-{self.rank}")
        return super().load_checkpoint(ckpt_dir)


def die_if_marked(name: str) -> None:
    try:
        (FAULTS / name).unlink()  # exactly one process gets to remove it
    except FileNotFoundError:
        return
    os._exit(1)


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("where", ["setup", "load_checkpoint"])
def test_a_new_learner_group_that_dies_while_starting_or_restoring_is_restarted_again(
    where, full, tmp_path, ray_session, monkeypatch, capsys
):
    class KillsThenMarks(LearnerKillingTrainer):
        def score(self, ready):
            if ready.step in self.kill_in and ready.step not in getattr(self, "killed", []):
                FAULTS.mkdir(parents=True, exist_ok=True)
                (FAULTS / f"{where}-1").touch()  # for the group that replaces the killed one
            return super().score(ready)

    with monkeypatch.context() as m:
        m.setattr(driver, "Trainer", KillsThenMarks)
        m.setattr(learner_module, "LearnerRank", DyingRank)
        run = train(CONFIG, local_overrides(tmp_path, "train.steps=4", *COMMON))
    out = capsys.readouterr().out
    ckpt = run / "checkpoints" / "step_2"
    assert not (FAULTS / f"{where}-1").exists(), "the new group never reached the faulty call"
    assert f"restarting the learner group from {ckpt} (restart 1 of 2)" in out
    # The replacement died in its first setup() or load_checkpoint(): one more restart, counted.
    assert f"restarting the learner group from {ckpt} (restart 2 of 2)" in out, out[-3000:]
    assert out.count("learner group restarted at step 2") == 1
    assert_repeats(read_metrics(full), read_metrics(run))


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_a_learner_that_keeps_dying_ends_the_run_with_one_line(tmp_path, ray_session, monkeypatch):
    class DiesTwice(LearnerKillingTrainer):
        kill_in = (1,)

        def score(self, rows):
            if getattr(self, "killed", None) == [1]:
                self.killed = []  # and again in the step redone after the restart
            return super().score(rows)

    with monkeypatch.context() as m:
        m.setattr(driver, "Trainer", DiesTwice)
        with pytest.raises(LearnerLost) as lost:
            train(CONFIG, local_overrides(tmp_path, "train.steps=1", "train.max_actor_restarts=1", "eval.every=0",
                                          "train.checkpoint_every=0", "data.max_rows=8", "train.prompts_per_step=4"))
    message = str(lost.value)
    assert "a learner rank died in step 1" in message and "train.max_actor_restarts=1" in message, message
    assert "restarted 1 time(s)" in message and "no checkpoint was written" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()  # a fresh run that never finished a step leaves nothing
