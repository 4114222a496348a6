"""Stages: several objectives in turn in one run (docs/DESIGN.md, "Stages").

A config's ``stages:`` is an ordered list; each entry names a stage, its objective (``algo``), its
``steps``, its teacher (``initial`` or ``stage:<an earlier stage>``) and its ``overrides`` (any
config keys, dotted or nested). Stage k's effective config is the run's config with stage k's
overrides on top, checked as a one-stage config is (config.merge_layers). Each stage starts every
actor anew from the weights the stage before it ended with (``stages/<name>/`` in the run
directory), with a fresh optimizer and learning-rate schedule, and runs the existing Trainer;
steps are counted across the whole run, and every metrics row carries its stage.

The Trainer class is handed in by the driver (launch/driver.train), which dispatches here: this
module never imports the driver.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from opsd.config import MOVED_KEYS, Config, ConfigError, key_hint, merge_layers, to_yaml, uses_scorer
from opsd.launch.checkpoints import RunDir, RunState, latest_checkpoint, resume_hint

INITIAL = "initial"  # a stage's teacher: the run's initial weights
FROM_STAGE = "stage:"  # ... or the weights an earlier stage ended with: stage:<name>
ENTRY_KEYS = ("name", "algo", "steps", "teacher", "overrides")
STAGE_END = "stage_end.json"  # in a stage's weights folder: where the run stood when the stage ended
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name under stages/

# What every stage of a run shares, so a stage's overrides may not change it: key -> why.
RUN_WIDE = {
    "run_dir": "a run has one directory",
    "stages": "stages do not nest",
    "train.resume": "a run is resumed as a whole (opsd train --resume RUN_DIR)",
    "train.steps": "a stage's length is its own 'steps'",
    "algo": "a stage's objective is its own 'algo'",
    "model.path": "a stage starts from the weights the stage before it ended with (the first, from model.path of the "
                  "run); a teacher that is another model is teacher.model",
    "cluster": "the stages run on one Ray cluster",
    "logging": "a run has one metrics log",
}


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    algo: str
    steps: int
    teacher: str  # INITIAL or FROM_STAGE + an earlier stage's name
    overrides: dict  # nested, as a config layer
    first_step: int  # the run's step count before this stage's first step

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps

    @property
    def where(self) -> str:
        return f"stages[{self.index}]"

    @property
    def teacher_stage(self) -> str | None:
        """The earlier stage whose final weights are this stage's teacher, or None (the initial weights)."""
        return self.teacher.removeprefix(FROM_STAGE) if self.teacher.startswith(FROM_STAGE) else None


# --- parsing ----------------------------------------------------------------------------------


def parse_stages(cfg: Config) -> list[Stage]:
    """cfg.stages as Stage records, every entry's shape and every override key checked; errors name
    ``stages[i]`` and the key. Empty for a one-stage config."""
    entries = OmegaConf.to_container(cfg.stages, resolve=True) if OmegaConf.is_config(cfg.stages) else cfg.stages
    stages: list[Stage] = []
    first = 0
    for i, entry in enumerate(entries):
        stage = _parse_entry(i, entry, first, [s.name for s in stages])
        stages.append(stage)
        first = stage.last_step
    return stages


def _parse_entry(i: int, entry: Any, first_step: int, earlier: list[str]) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"config key '{where}': expected a mapping with {', '.join(ENTRY_KEYS)}; got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1, cutoff=0.6)
            hint = f". Did you mean '{where}.{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{where}.{key}': not a key of a stage (expected {', '.join(ENTRY_KEYS)}){hint}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"config key '{where}.name' = {name!r}: expected a name of letters, digits, '_', '.' or '-' "
                          "(it names the stage's folder under stages/ in the run directory)")
    if name in earlier:
        raise ConfigError(f"config key '{where}.name' = {name!r}: stages[{earlier.index(name)}] has that name already")
    algo = entry.get("algo")
    if not isinstance(algo, str) or not algo:
        raise ConfigError(f"config key '{where}.algo' = {algo!r}: expected an objective (opsd, grpo, sft, kd, "
                          "contrastive, mix or a plug-in)")
    steps = entry.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"config key '{where}.steps' = {steps!r}: expected a whole number of steps >= 1")
    teacher = entry.get("teacher", INITIAL)
    if teacher is None:
        teacher = INITIAL
    if not isinstance(teacher, str) or (teacher != INITIAL and not teacher.startswith(FROM_STAGE)):
        raise ConfigError(f"config key '{where}.teacher' = {teacher!r}: expected '{INITIAL}' (the run's initial "
                          f"weights) or '{FROM_STAGE}<name>' (the weights an earlier stage ended with)")
    if teacher.startswith(FROM_STAGE) and teacher.removeprefix(FROM_STAGE) not in earlier:
        raise ConfigError(f"config key '{where}.teacher' = {teacher!r}: no earlier stage has that name"
                          + (f" (earlier stages: {', '.join(earlier)})" if earlier else " (this is the first stage)"))
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"config key '{where}.overrides': expected a mapping of config keys, got {overrides!r}")
    layer = nested(overrides, f"{where}.overrides")
    check_override_keys(layer, f"{where}.overrides", algo)
    return Stage(i, name, algo, steps, teacher, layer, first_step)


def nested(overrides: dict, where: str) -> dict:
    """``{"loss.temperature": 1, "rollout": {"n": 4}}`` -> one nested mapping; a key given twice is an error."""
    out: dict = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config key '{where}': {key!r} is not a config key")
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{where}.{'.'.join(parts[:depth + 1])}' is given twice")
        value = nested(value, f"{where}.{key}") if isinstance(value, dict) else value
        if parts[-1] in node:
            if not (isinstance(node[parts[-1]], dict) and isinstance(value, dict)):
                raise ConfigError(f"config key '{where}.{key}' is given twice")
            _merge_into(node[parts[-1]], value, f"{where}.{key}")
        else:
            node[parts[-1]] = value
    return out


def _merge_into(into: dict, more: dict, where: str) -> None:
    for key, value in more.items():
        if key in into and not (isinstance(into[key], dict) and isinstance(value, dict)):
            raise ConfigError(f"config key '{where}.{key}' is given twice")
        if key in into:
            _merge_into(into[key], value, f"{where}.{key}")
        else:
            into[key] = value


def _leaves(layer: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in layer.items():
        if isinstance(value, dict) and value:
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def check_override_keys(layer: dict, where: str, algo: str) -> None:
    """Every key of a stage's overrides is a config key a stage may change; an unknown one is named
    with the closest known key (an old key's new name under ``algo`` included), a run-wide one
    (RUN_WIDE) with why not."""
    schema = OmegaConf.structured(Config)
    for key in _leaves(layer):
        for wide, why in RUN_WIDE.items():
            if key == wide or key.startswith(wide + "."):
                raise ConfigError(f"config key '{where}.{key}': a stage cannot change it ({why})")
        if key in MOVED_KEYS:
            continue  # an old key, moved into an objective's options by merge_layers
        node: Any = schema
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict:
                break  # a free mapping (objectives, resources, teacher.options) or a leaf: the merge judges it
            if part not in node:
                known = ".".join(key.split(".")[:depth + 1])
                moved = difflib.get_close_matches(key, list(MOVED_KEYS), n=1, cutoff=0.85)
                hint = f". Did you mean 'objectives.{algo}.{MOVED_KEYS[moved[0]]}'?" if moved else key_hint(known)
                raise ConfigError(f"config key '{where}.{key}': no such config key{hint}")
            node = node[part] if isinstance(node[part], DictConfig) else None


# --- a stage's config --------------------------------------------------------------------------


def stage_config(cfg: Config, stage: Stage, *, model_path: str | None = None) -> Config:
    """Stage ``stage``'s effective config: the run's config, then the stage's overrides, its algo and
    steps (train.steps: the run's step count at its end); ``model_path`` (the weights it starts
    from) in place of model.path. Checked as a one-stage config; an error names the stage."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base["stages"] = []
    layer = json.loads(json.dumps(stage.overrides))  # a copy the merge may not touch
    layer["algo"] = stage.algo
    layer.setdefault("train", {})["steps"] = stage.last_step
    if model_path is not None:
        layer.setdefault("model", {})["path"] = model_path
    try:
        scfg = merge_layers([("the run's config", base), (f"{stage.where}.overrides", layer)])
        check_stage(scfg, stage)
    except ConfigError as exc:
        raise ConfigError(f"stage {stage.name!r} ({stage.where}): {exc}") from None
    return scfg


def check_stage(scfg: Config, stage: Stage) -> None:
    """What a stage's teacher allows (docs/DESIGN.md, "Stages"): a teacher other than the initial
    weights is a fixed copy of the student scored by the scorer."""
    if scfg.teachers:
        raise ConfigError(
            f"config key 'teachers' in a staged run ({stage.where}): several teachers and stages do not go together "
            "yet (a teacher without a model is the student's initial weights, which a later stage no longer starts "
            "from); give each stage one teacher (teacher.model, or the stage's teacher), or run the stages as runs"
        )
    if stage.teacher_stage is not None:
        key = f"config key '{stage.where}.teacher' = {stage.teacher!r}"
        if scfg.teacher.model is not None:
            raise ConfigError(f"{key} with teacher.model={scfg.teacher.model!r}: give one teacher; unset teacher.model "
                              f"or set {stage.where}.teacher to {INITIAL!r}")
        if scfg.teacher.mode != "fixed":
            raise ConfigError(f"{key} with teacher.mode={scfg.teacher.mode}: a live or EMA teacher is a copy of the "
                              "student and starts from the stage's own first weights; use teacher.mode=fixed")
        if not uses_scorer(scfg):
            raise ConfigError(f"{key}: algo={scfg.algo} scores nothing with a teacher; leave the stage's teacher out")
    if (stage.index > 0 and scfg.teacher.mode == "fixed" and scfg.teacher.model is None and uses_scorer(scfg)
            and scfg.scorer.on_rollout_engines):
        raise ConfigError(
            f"config key 'scorer.on_rollout_engines' = true with a fixed teacher in {stage.where}: the rollout engines "
            "hold the weights this stage starts from, not its teacher's; set scorer.on_rollout_engines=false"
        )


def stage_configs(cfg: Config) -> list[tuple[Stage, Config]]:
    """Every stage with its effective config (model.path: the run's, whose tokenizer every stage's
    weights share), as train and validate check them before anything starts."""
    return [(stage, stage_config(cfg, stage)) for stage in parse_stages(cfg)]


# --- the run -----------------------------------------------------------------------------------


def weights_dir(run_path: Path, name: str) -> Path:
    """Where stage ``name``'s final weights (a Hugging Face directory) are kept."""
    return run_path / "stages" / name


def stage_ended(run_path: Path, name: str) -> dict | None:
    """What stage_end.json of a finished stage holds (its last step, tokens, data position), else None."""
    end = weights_dir(run_path, name) / STAGE_END
    return json.loads(end.read_text()) if end.is_file() else None


def resume_point(stages: list[Stage], run_path: Path) -> tuple[int, Path | None]:
    """(the stage to run next, the checkpoint it resumes from or None for its start) of a resumed run:
    the newest sound checkpoint says which stage and step; a stage whose weights were kept has ended."""
    ckpt = latest_checkpoint(run_path)
    if ckpt is None:
        raise ConfigError(f"train.resume={run_path}: no complete checkpoint under {run_path / 'checkpoints'}")
    state = RunState.read(ckpt)
    names = [s.name for s in stages]
    if state.stage not in names:
        raise ConfigError(f"train.resume={run_path}: checkpoint {ckpt.name} was written in stage {state.stage!r}, "
                          f"which this run's stages ({', '.join(names)}) do not have")
    k = names.index(state.stage)
    if state.step >= stages[k].last_step and stage_ended(run_path, state.stage) is not None:
        return k + 1, None
    return k, ckpt


def train_stages(cfg: Config, run_path: Path, trainer_cls: Callable[..., Any]) -> Path:
    """Run the stages of ``cfg`` (fresh or resumed: cfg.train.resume) with ``trainer_cls`` (the
    driver's Trainer) in one run directory; as driver.train does for one stage, with the same
    stops, checkpoints and faults."""
    from opsd.launch.resources import check_local_capacity
    from opsd.launch.cluster import init_ray, shutdown_ray, starts_local_cluster
    from opsd.launch.problems import check_data, check_model
    from opsd.launch.stopping import StopSignals, Stopped

    checked = stage_configs(cfg)
    stages = [s for s, _ in checked]
    # The checks of a one-stage run, for every stage, before the run directory exists.
    if starts_local_cluster(cfg):
        for _, scfg in checked:
            check_local_capacity(scfg)
    initial, tokenizer = check_model(cfg)
    for _, scfg in checked:
        check_model(scfg)
        check_data(scfg, tokenizer)
    start, ckpt = resume_point(stages, run_path) if cfg.train.resume else (0, None)
    fresh = not run_path.exists()
    run = RunDir(run_path)
    for unfinished in [*run.checkpoints.glob(".step_*.tmp"), *(run.path / "stages").glob(".*.tmp")]:
        shutil.rmtree(unfinished, ignore_errors=True)  # writes a kill interrupted
    (run.path / "config.yaml").write_text(to_yaml(cfg))
    if ckpt is None and start > 0:
        run.truncate_metrics(stages[start - 1].last_step)
    started = init_ray(cfg)
    stop = StopSignals().install()
    trained = False
    try:
        for stage in stages[start:]:
            if stop.requested and stage.index > start:
                name = signal.Signals(stop.signum).name
                raise Stopped(f"stopped by {name} after stage {stages[stage.index - 1].name!r} (step "
                              f"{stage.first_step}); {resume_hint(run.path)}", stop.signum)
            trainer = _stage_trainer(cfg, stage, stages, run.path, initial, trainer_cls)
            try:
                trainer.start(local_cluster=started)
                if ckpt is not None and stage.index == start:
                    trainer.restore(ckpt, run)
                    print(f"opsd: resumed from {ckpt} (stage {stage.name!r}, step {trainer.step})")
                trainer.run_steps(run, stop)
                trained = True
                _finish_stage(trainer, stage, run)
            finally:
                trainer.shutdown()
    except BaseException:
        if fresh and not trained and not any((run.path / "stages").glob("*")) and latest_checkpoint(run.path) is None:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    finally:
        stop.restore()
        if started:
            shutdown_ray()
    return run.path


def _stage_trainer(cfg: Config, stage: Stage, stages: list[Stage], run_path: Path, initial: str,
                   trainer_cls: Callable[..., Any]) -> Any:
    """A Trainer for ``stage``: its config, the weights it starts from, its teacher, the step count
    and data position the run has reached."""
    before = stages[stage.index - 1] if stage.index > 0 else None
    model_path = str(weights_dir(run_path, before.name)) if before else None
    scfg = stage_config(cfg, stage, model_path=model_path)
    teacher = None  # the scorer loads the stage's first weights (a live or EMA teacher, another model)
    if scfg.teacher.mode == "fixed" and scfg.teacher.model is None and uses_scorer(scfg):
        teacher = str(weights_dir(run_path, stage.teacher_stage)) if stage.teacher_stage else initial
    say = f"opsd: stage {stage.index + 1} of {len(stages)}: {stage.name!r} (algo={stage.algo}, steps " \
          f"{stage.first_step + 1}-{stage.last_step}"
    print(say + (f", teacher {stage.teacher})" if uses_scorer(scfg) else ")"), flush=True)
    trainer = trainer_cls(scfg, teacher_weights=teacher, stage=stage.name)
    ended = stage_ended(run_path, before.name) if before else None
    trainer.begin_at(stage.first_step, ended["tokens_generated_total"] if ended else 0)
    if ended is not None and _same_rows(stage_config(cfg, before), scfg, ended["sampler"],
                                        trainer.data.sampler.state_dict()):
        # The same training rows as the stage before: its data position carries over, so the run
        # goes on through its epochs rather than drawing the first prompts again.
        trainer.data.sampler.load_state_dict(ended["sampler"])
        trainer.data.initial_sampler = trainer.data.sampler.state_dict()
    return trainer


def _same_rows(before: Config, scfg: Config, ended: dict, sampler: dict) -> bool:
    """Whether two stages train on the same rows in the same order (data and prompt sections, and
    the sampler's size, seed and shuffle)."""
    return (OmegaConf.to_container(before.data) == OmegaConf.to_container(scfg.data)
            and OmegaConf.to_container(before.prompt) == OmegaConf.to_container(scfg.prompt)
            and all(ended.get(k) == sampler[k] for k in ("num_items", "seed", "shuffle")))


def _finish_stage(trainer: Any, stage: Stage, run: RunDir) -> None:
    """A checkpoint at the stage's last step (a resumed run starts the next stage from it), then the
    stage's final weights with stage_end.json, kept under stages/<name>/ (renamed into place whole)."""
    last = latest_checkpoint(run.path)
    state = RunState.read(last) if last is not None else None
    if state is None or state.step != stage.last_step or state.stage != stage.name:
        trainer.save_checkpoint()
    final = weights_dir(run.path, stage.name)
    if final.is_dir() and (final / STAGE_END).is_file():
        return  # kept already (a run resumed after the stage ended, before its checkpoint said so)
    tmp = final.with_name(f".{stage.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainer.actors.learner.export_hf(str(tmp))
    end = {"stage": stage.name, "step": trainer.step, "tokens_generated_total": trainer.tokens_total,
           "sampler": trainer.data.sampler.state_dict()}
    (tmp / STAGE_END).write_text(json.dumps(end, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"opsd: stage {stage.name!r} ended at step {trainer.step}; its weights: {final}", flush=True)
