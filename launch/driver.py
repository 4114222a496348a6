"""The training driver (docs/DESIGN.md, "One step"). ``Trainer.train_one_step`` reads as the step:

    prompts -> rollouts (vLLM actors) -> samples -> teacher scores (an Arrow batch) -> train (a ZeRO
    group) -> sync weights -> the metrics row (and a held-out evaluation every eval.every steps)

and ``Trainer.run_steps`` as the run around it (checkpoints, stops, faults). The machinery under
them has rooms of its own: problems.py (the training set as prompts), actors.py (starting the
actors), pipeline.py (rollouts in flight, staleness, scoring overlap), weights.py (weight pushes),
checkpoints.py (checkpoints and resume), recovery.py (dead actors, learner restarts), metrics.py
(the metrics row).
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import OmegaConf

from opsd.batch import write_ipc
from opsd.config import Config, ConfigError, check, load_config, to_yaml
from opsd.launch.actors import Actors, say, start_actors
from opsd.launch.checkpoints import (RunDir, RunState, latest_checkpoint, prune_checkpoints, read_teacher, resume_hint,
                                     write_checkpoint)
from opsd.launch.cluster import init_ray, shutdown_ray, starts_local_cluster
from opsd.launch.loggers import MetricsLogger, read_metrics
from opsd.launch.metrics import StepFacts, eval_summary, step_row
from opsd.launch.pipeline import Pipeline, Ready
from opsd.launch.problems import load_training_set
from opsd.launch.recovery import NumericsWatch, check_restart, learner_died, new_learner_group, restore_ema_teacher
from opsd.launch.stopping import ActorLost, StopSignals, Stopped
from opsd.launch.teachers import resolve_teachers, teacher_metrics
from opsd.launch.resources import check_local_capacity
from opsd.launch.validate import check_teacher_tokenizer


class Trainer:
    pipeline_cls = Pipeline  # what turns prompts into batches (tests put a faulty one in its place)

    def __init__(self, cfg: Config, *, teacher_weights: str | None = None, stage: str | None = None):
        """``teacher_weights``: what a fixed teacher's scorers load in place of the student's first
        weights (a stage's teacher: launch/stages.py); ``stage``: the stage this Trainer runs, recorded
        in its metrics rows and checkpoints (None: a one-stage run)."""
        from opsd.launch.problems import check_model

        self.cfg = cfg
        self.stage = stage
        # A named model (made on first use), a .gguf file (imported once), a directory or a hub id;
        # the same checks as `opsd validate` (launch/problems.py), fetching what they need.
        self.model_path, self.tokenizer = check_model(cfg)
        # Another model as the teacher (teacher.model): what its scorers load, and its tokenizer,
        # whose chat template renders the teacher's prompts. None: the student is its own teacher.
        self.teacher_path: str | None = teacher_weights
        teacher_tokenizer = None
        if cfg.teacher.model is not None:
            from opsd.assets.models import check_model_dir, load_tokenizer, resolve_model_path

            self.teacher_path = resolve_model_path(cfg.teacher.model)
            check_model_dir(self.teacher_path, trust_remote_code=cfg.model.trust_remote_code, key="teacher.model")
            check_teacher_tokenizer(cfg, (self.model_path, self.teacher_path))  # as opsd validate does
            teacher_tokenizer = load_tokenizer(self.teacher_path, trust_remote_code=cfg.model.trust_remote_code)
        # Several teachers (teachers:): what each one's scorer pool loads, and the other models' tokenizers.
        self.teacher_paths, teacher_tokenizers = resolve_teachers(cfg, self.model_path) if cfg.teachers else ({}, {})
        self.data = load_training_set(cfg, self.tokenizer, teacher_tokenizer, teacher_tokenizers)
        self.step = 0
        self.first_step = 0  # the run's step count when this Trainer began (a later stage's: > 0)
        self.first_tokens = 0
        self.policy_version = 0  # the weights the learner holds and pushed last
        self.teacher_version = 0  # the weights the teacher scores with
        self.tokens_total = 0
        self.numerics = NumericsWatch(cfg)
        self.learner_restarts = 0
        self.actors: Actors | None = None
        self.pipeline: Pipeline | None = None
        self.run: RunDir | None = None

    def begin_at(self, step: int, tokens_total: int) -> None:
        """Count on from ``step`` and ``tokens_total`` (a stage after the first), the weights it holds
        being where a learner lost before this Trainer's first checkpoint restarts from."""
        self.step = self.first_step = step
        self.tokens_total = self.first_tokens = tokens_total

    def start(self, *, local_cluster: bool = True) -> None:
        self.actors = start_actors(self.cfg, self.model_path, local_cluster=local_cluster,
                                   teacher_path=self.teacher_path, teacher_paths=self.teacher_paths)
        say(f"{len(self.data.pairs)} training problems")
        rollouts, scorers = self.actors.rollouts, self.actors.scorers
        # A restarted actor is brought to the current weights before its call is retried.
        rollouts.on_restart = lambda actor: self.actors.weights.catch_up(rollouts, actor)
        if scorers is not None:
            scorers.on_restart = self._catch_up_scorer
        self.pipeline = self.pipeline_cls(self.cfg, self.data, rollouts, self.actors.scoring, self.tokenizer)

    def _catch_up_scorer(self, actor: Any) -> None:
        if self.cfg.teacher.mode == "live":
            self.actors.weights.catch_up(self.actors.scorers, actor)
        elif self.cfg.teacher.mode == "ema":
            restore_ema_teacher(self.actors.scorers, actor, self.teacher_version, self.run.path,
                                after_step=self.first_step)

    def shutdown(self) -> None:
        if self.actors is not None:
            self.actors.shutdown()

    # --- one step ------------------------------------------------------------------------------

    def train_one_step(self, step: int) -> dict:
        """prompts -> rollouts -> scores -> train -> sync (-> eval); returns the metrics row."""
        cfg, learner = self.cfg, self.actors.learner
        seconds: dict[str, float] = {}
        t_step = t0 = time.perf_counter()
        ready = self.pipeline.take(step, self.policy_version)
        self.pipeline.fill(step, self.policy_version)
        seconds["rollout"], t0 = time.perf_counter() - t0, time.perf_counter()

        batch = self.score(ready)
        if cfg.logging.save_batches:
            write_ipc(batch, self.run.batches / f"step_{step:06d}.arrow")
        seconds["score"], t0 = time.perf_counter() - t0, time.perf_counter()

        training = learner.submit_train(batch)
        # The next step's batch is scored meanwhile when the teacher is fixed (scorer.overlap).
        self.pipeline.score_ahead(training, self.policy_version + 1, self.teacher_version)
        stats = learner.collect_train(training)
        seconds["train"], t0 = time.perf_counter() - t0, time.perf_counter()

        self.sync()
        seconds["sync"] = time.perf_counter() - t0

        self.step = step
        if ready.generated:
            self.tokens_total += sum(len(s.response_ids) for s in ready.samples)
        row = step_row(cfg, ready.samples, stats, StepFacts(
            step, self.policy_version, self.teacher_version, self.tokens_total, ready.dropped, ready.generated,
            seconds, score_overlapped=ready.scoring is not None, sync_in_place=self.actors.weights.in_place,
            skipped=ready.skipped, sync_mb=self.actors.weights.pushed_bytes / 2**20,
        ))
        if cfg.teachers:
            row.update(teacher_metrics(batch))  # teacher/<name>/kl, ... (launch/teachers.py)
        if self.stage is not None:
            row["stage"] = self.stage
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps) and self.data.eval_pairs:
            row.update(self.evaluate())
        row["step_seconds"] = time.perf_counter() - t_step
        return row

    def score(self, ready: Ready) -> pa.Table:
        """This step's samples -> the Arrow batch (with the teacher's targets when there is one)."""
        return self.pipeline.score(ready, self.teacher_version)

    def sync(self) -> None:
        """Learner rank 0 -> rollout workers (and the teacher when it is live, or EMA on its steps)."""
        self.policy_version += 1
        pools = [self.actors.rollouts]
        mode = self.cfg.teacher.mode
        if self.actors.scorers and (mode == "live" or (mode == "ema" and self.policy_version % self.cfg.teacher.sync_every == 0)):
            pools.append(self.actors.scorers)
        if self.actors.weights.collective:
            # Every receiver of a collective push takes part at the same moment: let the
            # overlapped rollouts finish first rather than have the learner wait inside a
            # broadcast (and its sync.timeout_s) for them.
            self.pipeline.drain()
        self.actors.weights.push(self.policy_version, pools)
        if len(pools) > 1 or (self.actors.scores_on_rollouts and mode != "fixed"):
            # (a fixed teacher on the rollout engines is the base they keep under a LoRA adapter)
            self.teacher_version = self.policy_version

    def evaluate(self) -> dict[str, float]:
        """Greedy (or eval.temperature) answers on the held-out problems, graded by opsd.verify;
        the same code path as `opsd eval` (launch/evaluate.py)."""
        from opsd.launch.evaluate import evaluate_pairs

        cfg = self.cfg.eval
        metrics, _ = evaluate_pairs(
            self.actors.rollouts, self.data.eval_pairs, n=cfg.n, max_tokens=cfg.max_tokens,
            temperature=cfg.temperature, seed=0, expect_version=self.policy_version, extract=self.cfg.grading.extract,
            sandbox=self.cfg.sandbox,
        )
        return {f"eval/{k}": v for k, v in metrics.items()}

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        state = RunState(self.step, self.policy_version, self.teacher_version, self.tokens_total,
                         self.data.sampler.state_dict(), self.pipeline.in_flight_prompts(),
                         stage=self.stage, stage_step=self.step - self.first_step)
        teacher = None
        if self.actors.scorers and self.cfg.teacher.mode == "ema":
            import ray

            teacher = lambda: ray.get(self.actors.scorers.actors[0].state_dict_cpu.remote())  # noqa: E731
        ckpt = write_checkpoint(self.run.checkpoints, state, self.actors.learner, export_hf=self.cfg.train.export_hf,
                                teacher=teacher, learner_died=lambda exc: learner_died(exc, self.actors.learner))
        prune_checkpoints(self.run.checkpoints, self.cfg.train.keep_checkpoints, ckpt)
        return ckpt

    def restore(self, ckpt: Path, run: RunDir) -> None:
        """The learner, the data position and the versions of ``ckpt``; its weights pushed to every
        receiver under their saved version, and the metrics after its step forgotten."""
        self.run = run
        state = RunState.read(ckpt)
        self.actors.learner.load_checkpoint(str(ckpt / "learner"))
        self.data.sampler.load_state_dict(state.sampler)
        self.pipeline.pending = state.pending_indices
        self.step, self.tokens_total = state.step, state.tokens_generated_total
        self.policy_version = state.policy_version - 1
        self.sync()  # pushes the restored policy (and a live teacher) under its saved version
        if self.cfg.teacher.mode == "ema" and self.actors.scorers:
            import ray

            teacher = read_teacher(ckpt)
            ray.get([a.load_state.remote(teacher, state.teacher_version) for a in self.actors.scorers.actors])
        self.teacher_version = state.teacher_version
        self.run.truncate_metrics(self.step)

    # --- the loop ------------------------------------------------------------------------------

    def run_steps(self, run: RunDir, stop: StopSignals | None = None) -> None:
        """Steps until train.steps, or until ``stop`` is requested: then the step in progress is
        finished and checkpointed, and :class:`Stopped` is raised."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run = run
        logger = MetricsLogger(run.path, cfg.logging, config=OmegaConf.to_container(cfg, resolve=True))
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="opsd train", unit="step",
                   disable=not cfg.logging.progress, dynamic_ncols=True)
        saved_at = self.step  # a resumed run starts at its checkpoint
        try:
            if self.step == 0 and cfg.eval.every and cfg.eval.at_start and self.data.eval_pairs:
                # The baseline every later evaluation is read against: the initial weights.
                bar.write(f"opsd: evaluating the initial weights on {len(self.data.eval_pairs)} held-out problems")
                baseline = self.evaluate()
                bar.write(f"opsd: step 0: held-out accuracy {baseline[f'eval/accuracy_{cfg.grading.extract}']:.2f} "
                          f"({cfg.grading.extract})")
                logger.log({"step": 0, "policy_version": self.policy_version, **baseline,
                            **({"stage": self.stage} if self.stage is not None else {})})
            while self.step < cfg.train.steps:
                if stop is not None and stop.requested:
                    self._stop(stop, saved_at)
                try:
                    row = self.train_one_step(self.step + 1)
                    logger.log(row)  # metrics.jsonl, TensorBoard, W&B (launch/loggers.py)
                    self.numerics.see(row, bar.write, run)
                    every = cfg.train.checkpoint_every
                    if every and (self.step % every == 0 or self.step == cfg.train.steps):
                        self.save_checkpoint()
                        saved_at = self.step
                except Exception as exc:  # a learner rank's death is recovered from; anything else ends the run
                    if not learner_died(exc, self.actors.learner):
                        raise
                    self._recover_learner(exc, bar)  # back to the last checkpoint, or to step 0
                    bar.reset(total=cfg.train.steps)
                    bar.update(self.step)
                    saved_at = self.step
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row['reward_mean'] or 0:.2f}",
                                tok_s=f"{row['tokens_generated'] / max(row['step_seconds'], 1e-9):.1f}")
        except ActorLost as exc:
            # The learner still holds step self.step, but the data position is mid-step: the run
            # goes back to its last complete checkpoint, like any other stop without one.
            raise ActorLost(f"step {self.step + 1}: {exc}; {resume_hint(run.path)}") from exc
        finally:
            bar.close()
            logger.close()
        summary = eval_summary(read_metrics(run.path), cfg.grading.extract)
        if summary:
            say(summary)

    def _recover_learner(self, exc: BaseException, bar: Any) -> None:
        """_restart_learner until a new group is up and restored: a new group whose rank dies while
        it starts or loads the checkpoint is one more learner death, restarted the same way and
        counted against train.max_actor_restarts like any other."""
        while True:
            try:
                return self._restart_learner(exc, bar)
            except Exception as again:
                if not learner_died(again, self.actors.learner):
                    raise
                exc = again

    def _restart_learner(self, exc: BaseException, bar: Any) -> None:
        """A new learner group from the last complete checkpoint (or the initial weights when none
        was written yet): the rollout workers and scorers are brought to those weights, the data
        position and the metrics log rewind with it, and the lost steps are trained again."""
        from opsd.launch.checkpoints import root_cause

        died_in = self.step + 1
        ckpt = check_restart(self.cfg, exc, restarts=self.learner_restarts, died_in=died_in, run_path=self.run.path,
                             ema_moved=self.cfg.teacher.mode == "ema" and self.teacher_version > 0,
                             after_step=self.first_step)
        self.learner_restarts += 1
        bar.write(f"opsd: warning: a learner rank died in step {died_in} ({root_cause(exc)}); restarting the learner "
                  f"group from {ckpt or 'the initial weights'} (restart {self.learner_restarts} of "
                  f"{self.cfg.train.max_actor_restarts})")
        self.actors.learner.shutdown()
        # Rollouts for the next steps, of weights about to be rewound: finished, then dropped.
        self.pipeline.drain()
        self.pipeline.inflight = []
        self.numerics.reset()
        self.actors.replace_learner(new_learner_group(self.cfg, self.model_path, exc, died_in=died_in,
                                                      run_path=self.run.path, ckpt=ckpt))
        if ckpt is not None:
            self.restore(ckpt, self.run)
        else:
            # The new group holds the initial weights: version 0, pushed to whoever moved on.
            self.data.sampler.load_state_dict(self.data.initial_sampler)
            self.pipeline.pending = []
            self.step, self.tokens_total = self.first_step, self.first_tokens
            self.policy_version = -1
            self.sync()
            self.teacher_version = 0
            self.run.truncate_metrics(self.step)
        bar.write(f"opsd: learner group restarted at step {self.step}")
        self.actors.log_placement()

    def _stop(self, stop: StopSignals, saved_at: int) -> None:
        name = signal.Signals(stop.signum).name
        if self.step == 0:
            raise Stopped(f"stopped by {name} before the first step; nothing was trained", stop.signum)
        if saved_at != self.step:
            # Rollouts in flight for the next step (max_staleness > 0) are not waited for: the
            # checkpoint records their prompts as pending, and a resumed run draws them first.
            self.save_checkpoint()
        raise Stopped(
            f"stopped by {name} after step {self.step} of {self.cfg.train.steps}; checkpoint "
            f"{self.run.checkpoints / f'step_{self.step}'}; resume with: opsd train --resume {self.run.path}",
            stop.signum,
        )


def prepare_config(config_path: str | None, overrides: list[str]) -> tuple[Config, Path]:
    """Resolve the config and run directory; a resumed run reuses its saved config."""
    cfg = load_config(config_path, overrides)
    if cfg.train.resume:
        run_path = Path(cfg.train.resume)
        saved = run_path / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"train.resume={run_path}: no config.yaml there; is it a run directory?")
        # The saved config wins, except for what this command line overrides.
        cfg = load_config(saved, [o for o in overrides if not o.startswith("train.resume=")])
        cfg.train.resume = str(run_path)
    elif cfg.run_dir:
        run_path = Path(cfg.run_dir)
    else:
        run_path = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    # Absolute: learner ranks write checkpoint shards here from their own working directories
    # (under `ray job submit` that is a temporary copy of the code).
    run_path = run_path.resolve()
    cfg.run_dir = str(run_path)
    return cfg, run_path


def train(config_path: str | None, overrides: list[str]) -> Path:
    cfg, run_path = prepare_config(config_path, overrides)
    if cfg.stages:
        from opsd.launch.stages import train_stages

        return train_stages(cfg, run_path, Trainer)
    if starts_local_cluster(cfg):
        check_local_capacity(cfg)  # a local cluster's size is known: refused before Ray starts
    # The config, the model and every data row are checked (Trainer) before the run directory
    # exists; a new run that fails before its first step leaves none behind.
    trainer = Trainer(cfg)
    if trainer.data.skipped:
        print(f"opsd: skipped {len(trainer.data.skipped)} over-long prompts (prompt.overlong=skip)")
    ckpt = None
    if cfg.train.resume:
        ckpt = latest_checkpoint(run_path)
        if ckpt is None:
            raise ConfigError(f"train.resume={run_path}: no complete checkpoint under {run_path / 'checkpoints'}")
    fresh = not run_path.exists()
    run = RunDir(run_path)
    for unfinished in run.checkpoints.glob(".step_*.tmp"):
        shutil.rmtree(unfinished, ignore_errors=True)  # a checkpoint write that was killed
    (run.path / "config.yaml").write_text(to_yaml(cfg))
    started = init_ray(cfg)
    stop = StopSignals().install()  # after ray.init, which sets a SIGTERM handler of its own
    try:
        trainer.start(local_cluster=started)
        if ckpt is not None:
            trainer.restore(ckpt, run)
            print(f"opsd: resumed from {ckpt} (step {trainer.step})")
        trainer.run_steps(run, stop)
    except BaseException as exc:  # any end but success, a second signal's KeyboardInterrupt too; raised again
        if fresh and trainer.step == 0:
            shutil.rmtree(run.path, ignore_errors=True)
        elif isinstance(exc, KeyboardInterrupt):
            print(f"opsd: stopped at once in step {trainer.step + 1}; {resume_hint(run.path)}", file=sys.stderr,
                  flush=True)
        raise
    finally:
        stop.restore()
        trainer.shutdown()
        if started:
            shutdown_ray()
    return run.path
