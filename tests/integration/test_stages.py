"""A staged run (launch/stages.py) on the real runtime: SFT for one step, then OPSD for two, in one
run directory.

- Uninterrupted: stage 2's learner starts from the weights of stage 1's last checkpoint, its
  teacher is the run's initial model, and every metrics row and checkpoint carries its stage.
- SIGTERM in stage 2 (slow): the stopped run resumes in the middle of stage 2 and ends with the
  same weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import opsd.launch.driver as driver
from opsd.config import REPO_ROOT
from opsd.launch.checkpoints import RunState
from opsd.launch.stopping import Stopped

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

# Small steps: 4 prompts, 16 new tokens; no evaluation. Checkpoints only where a stage ends or a
# stop asks for one (every 10 steps never comes).
BASE = ("train.prompts_per_step=4", "rollout.max_tokens=16", "eval.every=0", "train.checkpoint_every=10")
STAGES = [
    {"name": "sft", "algo": "sft", "steps": 1, "overrides": {"learner.lr": 1.0e-3}},
    {"name": "opsd", "algo": "opsd", "steps": 2, "overrides": {"learner": {"lr": 5.0e-4}}},
]


def staged_config(tmp_path: Path) -> str:
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    cfg["stages"] = STAGES
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


class Recording(driver.Trainer):
    """Keeps, per stage, the learner's weights right after its actors started, and the teacher the
    scorers loaded."""

    started: dict = {}
    teachers: dict = {}

    def start(self, **kw) -> None:
        super().start(**kw)
        Recording.started[self.stage] = self.actors.learner.full_state()
        Recording.teachers[self.stage] = self.teacher_path


@pytest.fixture(scope="module")
def full(tmp_path_factory, ray_session):
    """The uninterrupted staged run, and what its Trainers recorded."""
    tmp = tmp_path_factory.mktemp("staged")
    Recording.started, Recording.teachers = {}, {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "Trainer", Recording)
        run = driver.train(staged_config(tmp), local_overrides(tmp, *BASE))
    return run, dict(Recording.started), dict(Recording.teachers)


def test_a_staged_run_hands_each_stage_the_weights_the_last_one_ended_with(full, tiny_model):
    run, started, teachers = full
    rows = read_metrics(run)
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "sft"), (2, "opsd"), (3, "opsd")]
    assert rows[0]["policy_version"] == 1 and rows[1]["policy_version"] == 1  # a fresh learner per stage
    # One global token count: SFT generates nothing, OPSD's rows add up.
    assert rows[0]["tokens_generated"] == 0 and rows[-1]["tokens_generated_total"] == sum(r["tokens_generated"] for r in rows) > 0

    # Checkpoints: stage 1's end (written because a stage ends) and stage 2's, tagged by stage.
    states = {p.name: RunState.read(p) for p in (run / "checkpoints").iterdir()}
    assert {n: (s.stage, s.stage_step) for n, s in states.items()} == {"step_1": ("sft", 1), "step_3": ("opsd", 2)}

    # Stage 1 started from the initial weights; stage 2 from those of stage 1's last checkpoint,
    # not the initial ones (SFT moved them).
    initial = load_weights(Path(tiny_model))
    after_sft = load_weights(run / "checkpoints" / "step_1" / "hf")
    for name, tensor in started["sft"].items():
        np.testing.assert_array_equal(tensor.numpy(), initial[name].numpy(), err_msg=name)
    moved = 0
    for name, tensor in started["opsd"].items():
        np.testing.assert_array_equal(tensor.numpy(), after_sft[name].numpy(), err_msg=name)
        moved += not np.array_equal(tensor.numpy(), initial[name].numpy())
    assert moved > 0
    # The stage's kept weights are that checkpoint's, and stage 2's teacher is the initial model.
    for name, tensor in load_weights(run / "stages" / "sft").items():
        np.testing.assert_array_equal(tensor.numpy(), after_sft[name].numpy(), err_msg=name)
    assert teachers == {"sft": None, "opsd": tiny_model}
    end = json.loads((run / "stages" / "opsd" / "stage_end.json").read_text())
    assert end["step"] == 3 and end["tokens_generated_total"] == rows[-1]["tokens_generated_total"]
    # Stage 2 went on through the data where stage 1 left it: no prompt drawn twice.
    prompts = [i.rsplit("#", 1)[0] for r in rows for i in r["sample_ids"]]
    assert len(prompts) == 12 and len(set(prompts)) == 12


SIGNAL_IN_STEP = 2  # the first step of stage 2


class SignalledTrainer(driver.Trainer):
    def train_one_step(self, step: int) -> dict:
        if step == SIGNAL_IN_STEP:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        return super().train_one_step(step)


# Slow (`make test-slow`): three staged runs; the default run checks the hand-over above.
@pytest.mark.slow
def test_a_staged_run_stopped_in_its_second_stage_resumes_to_the_same_weights(full, tmp_path, ray_session, capsys):
    run_full = full[0]
    part = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "Trainer", SignalledTrainer)
        with pytest.raises(Stopped) as stopped:
            driver.train(staged_config(tmp_path), local_overrides(tmp_path, *BASE))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"after step {SIGNAL_IN_STEP}" in str(stopped.value) and f"--resume {part}" in str(stopped.value)
    state = RunState.read(part / "checkpoints" / "step_2")
    assert (state.stage, state.stage_step) == ("opsd", 1)
    assert not (part / "stages" / "opsd").exists()
    capsys.readouterr()

    resumed = driver.train(None, [f"train.resume={part}"])
    assert f"resumed from {part / 'checkpoints' / 'step_2'} (stage 'opsd', step 2)" in capsys.readouterr().out
    a, b = read_metrics(run_full), read_metrics(resumed)
    assert [(r["step"], r["stage"]) for r in b] == [(1, "sft"), (2, "opsd"), (3, "opsd")]
    for x, y in zip(a, b):
        assert x["sample_ids"] == y["sample_ids"] and x["tokens_generated"] == y["tokens_generated"]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    want, got = load_weights(run_full / "stages" / "opsd"), load_weights(resumed / "stages" / "opsd")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
