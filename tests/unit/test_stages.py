"""launch/stages.py: parsing a config's stages, each stage's effective config, where a resumed
staged run goes on, and the errors that name the stage and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from opsd.config import REPO_ROOT, ConfigError, load_config, to_yaml
from opsd.launch.checkpoints import latest_checkpoint
from opsd.launch.stages import STAGE_END, parse_stages, resume_point, stage_config, stage_configs

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def staged(tmp_path: Path, stages: list, **base) -> Path:
    """tiny.yaml with ``stages`` (and top-level ``base`` keys) as a config file."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(base)
    cfg["stages"] = stages
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SFT_OPSD = [
    {"name": "sft", "algo": "sft", "steps": 2, "overrides": {"learner.lr": 3.0e-4}},
    {"name": "opsd", "algo": "opsd", "steps": 3, "overrides": {"objectives.opsd.beta": 0.25, "rollout": {"n": 2}}},
    {"name": "grpo", "algo": "grpo", "steps": 4, "teacher": "stage:sft",
     "overrides": {"rollout.n": 4, "objectives": {"grpo": {"kl_coef": 0.1}}}},
]


def test_stages_count_steps_across_the_run_and_default_to_the_initial_teacher(tmp_path):
    cfg = load_config(staged(tmp_path, SFT_OPSD))
    stages = parse_stages(cfg)
    assert [(s.name, s.algo, s.first_step, s.last_step) for s in stages] == [
        ("sft", "sft", 0, 2), ("opsd", "opsd", 2, 5), ("grpo", "grpo", 5, 9)]
    assert [s.teacher for s in stages] == ["initial", "initial", "stage:sft"]
    assert [s.teacher_stage for s in stages] == [None, None, "sft"]
    # Dotted and nested keys become one nested layer.
    assert stages[1].overrides == {"objectives": {"opsd": {"beta": 0.25}}, "rollout": {"n": 2}}
    assert parse_stages(load_config(TINY)) == []


def test_a_stage_config_is_the_run_config_with_the_stage_keys_on_top(tmp_path):
    """The effective config of each stage equals the one-stage config that load_config makes from
    the same file with the stage's keys given on the command line."""
    path = staged(tmp_path, SFT_OPSD)
    cfg = load_config(path)
    expected = {
        "sft": ["algo=sft", "train.steps=2", "learner.lr=3.0e-4"],
        "opsd": ["algo=opsd", "train.steps=5", "objectives.opsd.beta=0.25", "rollout.n=2"],
        "grpo": ["algo=grpo", "train.steps=9", "rollout.n=4", "objectives.grpo.kl_coef=0.1"],
    }
    found = stage_configs(cfg)
    assert [s.name for s, _ in found] == list(expected)
    for stage, scfg in found:
        want = load_config(path, ["stages=[]", *expected[stage.name]])
        assert OmegaConf.to_container(scfg) == OmegaConf.to_container(want), stage.name
    # The weights a later stage starts from replace model.path, nothing else.
    stage = found[1][0]
    moved = stage_config(cfg, stage, model_path="/runs/x/stages/sft")
    assert moved.model.path == "/runs/x/stages/sft"
    assert {**OmegaConf.to_container(moved), "model": None} == {**OmegaConf.to_container(found[1][1]), "model": None}


def test_the_saved_config_of_a_staged_run_reads_back_with_its_stages(tmp_path):
    cfg = load_config(staged(tmp_path, SFT_OPSD))
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_config(saved)
    assert parse_stages(again) == parse_stages(cfg)


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "b", "algo": "opsd", "steps": 1,
                                                   "overrides": {"loss": {"betaa": 0.3}}}],
     "config key 'stages[1].overrides.loss.betaa': no such config key. Did you mean 'objectives.opsd.beta'?"),
    ([{"name": "a", "algo": "sft", "steps": 1, "overrides": {"rollout.nn": 2}}],
     "config key 'stages[0].overrides.rollout.nn': no such config key. Did you mean 'rollout.n'"),
    ([{"name": "a", "algo": "sft", "steps": 1, "overrides": {"model.path": "other"}}],
     "config key 'stages[0].overrides.model.path': a stage cannot change it"),
    ([{"name": "a", "algo": "sft", "steps": 1, "overrides": {"train": {"steps": 4}}}],
     "config key 'stages[0].overrides.train.steps': a stage cannot change it (a stage's length is its own 'steps')"),
    ([{"name": "a", "algo": "sft", "steps": 1, "overrides": {"cluster.num_cpus": 4}}],
     "config key 'stages[0].overrides.cluster.num_cpus': a stage cannot change it"),
    ([{"name": "a", "algo": "sft", "step": 1}],
     "config key 'stages[0].step': not a key of a stage (expected name, algo, steps, teacher, overrides). "
     "Did you mean 'stages[0].steps'?"),
    ([{"name": "a", "algo": "sft", "steps": 0}], "config key 'stages[0].steps' = 0"),
    ([{"name": "a/b", "algo": "sft", "steps": 1}], "config key 'stages[0].name' = 'a/b'"),
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "a", "algo": "opsd", "steps": 1}],
     "config key 'stages[1].name' = 'a': stages[0] has that name already"),
    ([{"name": "a", "algo": "opsd", "steps": 1, "teacher": "stage:b"}, {"name": "b", "algo": "sft", "steps": 1}],
     "config key 'stages[0].teacher' = 'stage:b': no earlier stage has that name (this is the first stage)"),
    ([{"name": "a", "algo": "opsd", "steps": 1, "teacher": "final"}], "config key 'stages[0].teacher' = 'final'"),
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "b", "algo": "opsd", "steps": 1, "teacher": "stage:a",
                                                   "overrides": {"teacher.mode": "ema"}}],
     "stage 'b' (stages[1]): config key 'stages[1].teacher' = 'stage:a' with teacher.mode=ema"),
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "b", "algo": "sft", "steps": 1, "teacher": "stage:a"}],
     "stage 'b' (stages[1]): config key 'stages[1].teacher' = 'stage:a': algo=sft scores nothing"),
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "b", "algo": "opsd", "steps": 1,
                                                   "overrides": {"scorer.on_rollout_engines": True, "model.lora": {"enabled": True, "serve": "adapter"}}}],
     "stage 'b' (stages[1]): config key 'scorer.on_rollout_engines' = true with a fixed teacher in stages[1]"),
    # A combination the one-stage checks refuse is refused in a stage, naming it.
    ([{"name": "a", "algo": "sft", "steps": 1}, {"name": "b", "algo": "opsd", "steps": 1,
                                                   "overrides": {"learner.zero_stage": 0}}],
     "stage 'b' (stages[1]): config key 'learner.zero_stage' = 0 with learner.num_ranks=2"),
    ([{"name": "a", "algo": "nope", "steps": 1}], "stage 'a' (stages[0]):"),
    (["sft"], "config key 'stages[0]': expected a mapping"),
])
def test_a_bad_stage_is_refused_naming_the_stage_and_the_key(tmp_path, stages, message):
    cfg = load_config(staged(tmp_path, stages))
    with pytest.raises(ConfigError) as err:
        stage_configs(cfg)
    assert message in str(err.value)


def test_a_key_given_twice_in_a_stage_is_refused(tmp_path):
    cfg = load_config(staged(tmp_path, [{"name": "a", "algo": "sft", "steps": 1,
                                         "overrides": {"rollout.n": 2, "rollout": {"n": 3}}}]))
    with pytest.raises(ConfigError, match=r"'stages\[0\].overrides.rollout.n' is given twice"):
        parse_stages(cfg)


def test_validate_checks_and_reports_every_stage(tmp_path):
    from opsd.launch.validate import validate_config

    lines = validate_config(str(staged(tmp_path, SFT_OPSD)), check_data=False)
    assert lines[0].endswith("3 stages, 9 steps (sft 2 -> opsd 3 -> grpo 4)")
    assert [ln for ln in lines if ln.startswith("stage ")] == [
        "stage 0: sft, algo=sft, steps 1-2, no teacher",
        "stage 1: opsd, algo=opsd, steps 3-5, teacher initial",
        "stage 2: grpo, algo=grpo, steps 6-9, teacher stage:sft",
    ]
    # Each stage's own resources: SFT starts no scorer, OPSD and GRPO's KL reference do.
    assert ["scorer" in ln for ln in lines if ln.startswith("[") and "resources:" in ln] == [False, True, True]
    assert lines[-1] == "ok"
    bad = [*SFT_OPSD[:2], {**SFT_OPSD[2], "overrides": {"learner.zero_stage": 7}}]
    with pytest.raises(ConfigError, match=r"stage 'grpo' \(stages\[2\]\).*learner.zero_stage"):
        validate_config(str(staged(tmp_path, bad)), check_data=False)


def _checkpoint(run: Path, step: int, stage: str, stage_step: int) -> None:
    d = run / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    state = {"step": step, "policy_version": stage_step, "teacher_version": 0, "tokens_generated_total": 0,
             "sampler": {}, "pending_indices": [], "stage": stage, "stage_step": stage_step}
    (d / "driver_state.json").write_text(json.dumps(state))


def _ended(run: Path, stage: str) -> None:
    d = run / "stages" / stage
    d.mkdir(parents=True)
    (d / STAGE_END).write_text(json.dumps({"stage": stage}))


def test_a_resumed_run_goes_on_in_the_stage_and_step_of_its_last_checkpoint(tmp_path):
    stages = parse_stages(load_config(staged(tmp_path, SFT_OPSD)))
    run = tmp_path / "run"
    _checkpoint(run, 2, "sft", 2)
    # The stage's last step is checkpointed but its weights were not kept: it is finished first.
    assert resume_point(stages, run) == (0, run / "checkpoints" / "step_2")
    _ended(run, "sft")
    assert resume_point(stages, run) == (1, None)  # the next stage, from its first step
    _checkpoint(run, 4, "opsd", 2)
    assert resume_point(stages, run) == (1, run / "checkpoints" / "step_4")  # in the middle of stage 1
    _checkpoint(run, 9, "grpo", 4)
    _ended(run, "grpo")
    assert resume_point(stages, run) == (3, None)  # every stage has ended: nothing left to run
    _checkpoint(run, 10, "other", 1)
    with pytest.raises(ConfigError, match="written in stage 'other', which this run's stages"):
        resume_point(stages, run)


def test_latest_checkpoint_after_a_step_passes_over_earlier_stages(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 2, "sft", 2)
    assert latest_checkpoint(run) == run / "checkpoints" / "step_2"
    assert latest_checkpoint(run, after_step=2) is None  # stage 1's learner restarts from its first weights
    _checkpoint(run, 4, "opsd", 2)
    assert latest_checkpoint(run, after_step=2) == run / "checkpoints" / "step_4"


def test_several_teachers_in_a_staged_run_are_refused_naming_the_key():
    cfg = load_config(TINY, [
        "stages=[{name: a, algo: opsd, steps: 1}]",
        "teachers={self: {context: solution}}",
    ])
    with pytest.raises(ConfigError, match=r"config key 'teachers' in a staged run \(stages\[0\]\)"):
        stage_configs(cfg)
