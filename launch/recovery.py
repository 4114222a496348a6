"""Bringing a run back from a dead actor, and stopping one whose numbers went bad (docs/DESIGN.md,
"Faults").

A rollout worker or scorer that dies is restarted by Ray; its pool retries the call it was in
(launch/cluster.py) after the restart hook has brought the new process to the current weights:
:meth:`WeightSync.catch_up` for rollout workers and a live teacher, :func:`restore_ema_teacher`
for an EMA teacher, whose state lives only in the scorers. A learner rank that dies takes the
whole learner group with it: the driver starts a new group (:func:`new_learner_group`) from the
last complete checkpoint, or the initial weights, and trains the lost steps again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from opsd.config import Config
from opsd.launch.resources import custom_suffix
from opsd.launch.checkpoints import RunDir, RunState, latest_checkpoint, read_teacher, resume_hint, root_cause
from opsd.launch.cluster import ActorPool, actor_errors
from opsd.launch.stopping import BadSteps, LearnerLost
from opsd.workers.learner import LearnerGroup


def learner_died(exc: BaseException, learner: LearnerGroup) -> bool:
    """Whether ``exc`` comes from a learner rank that died (and not from anything else)."""
    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, actor_errors()):
            return learner.broken()
        chain = chain.__cause__ or chain.__context__
    return False


def restore_ema_teacher(scorers: ActorPool, actor: Any, teacher_version: int, run_path: Path, *,
                        after_step: int = 0) -> None:
    """A restarted scorer of an EMA teacher gets the EMA: copied from a healthy sibling, else from
    a checkpoint taken at the current teacher version (after ``after_step``: a stage's own);
    anything older would silently score with a different teacher."""
    import ray

    if not teacher_version:
        return  # still the initial weights, which the new process loaded
    for other in scorers.actors:
        if other is actor:
            continue
        try:
            state, version = ray.get(other.get_state.remote(), timeout=300)
        except ray.exceptions.RayError:
            continue  # dead or gone too: try the next, then the checkpoint
        ray.get(actor.load_state.remote(state, version))
        return
    ckpt = latest_checkpoint(run_path, after_step)
    if ckpt is None or RunState.read(ckpt).teacher_version != teacher_version:
        raise RuntimeError(
            f"the EMA teacher's scorer died and its state at teacher version {teacher_version} is lost (no other "
            "scorer holds it and no checkpoint was taken at that version); resume from the last checkpoint with "
            "--resume"
        )
    ray.get(actor.load_state.remote(read_teacher(ckpt), teacher_version))


def check_restart(cfg: Config, exc: BaseException, *, restarts: int, died_in: int, run_path: Path,
                  ema_moved: bool, after_step: int = 0) -> Path | None:
    """Whether the learner group may be restarted (else :class:`LearnerLost` naming why and what to
    do); returns the checkpoint it restarts from (None: the initial weights, or a stage's first
    ones: no checkpoint after ``after_step``)."""
    cause = root_cause(exc)
    if restarts >= cfg.train.max_actor_restarts:
        raise LearnerLost(
            f"a learner rank died in step {died_in} ({cause}) and the learner group was already restarted "
            f"{restarts} time(s) (train.max_actor_restarts={cfg.train.max_actor_restarts}); {resume_hint(run_path)}"
        ) from exc
    ckpt = latest_checkpoint(run_path, after_step)
    if ckpt is None and ema_moved:
        raise LearnerLost(
            f"a learner rank died in step {died_in} ({cause}) before any checkpoint, and the EMA teacher "
            "cannot be rewound to the initial weights; start the run again (with train.checkpoint_every > 0)"
        ) from exc
    return ckpt


def new_learner_group(cfg: Config, model_path: str, exc: BaseException, *, died_in: int, run_path: Path,
                      ckpt: Path | None) -> LearnerGroup:
    """A new learner group, placed within cluster.place_timeout_s: a lost node that no autoscaler
    replaces must not leave the run waiting forever."""
    import ray

    try:
        return LearnerGroup(cfg, model_path, place_timeout=cfg.cluster.place_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise LearnerLost(
            f"a learner rank died in step {died_in} ({root_cause(exc)}) and a new learner group could not be placed "
            f"within cluster.place_timeout_s={cfg.cluster.place_timeout_s:g} s ({cfg.learner.num_ranks} x "
            f"{cfg.learner.num_cpus_per_rank:g} CPU / {cfg.learner.num_gpus_per_rank:g} GPU"
            f"{custom_suffix(cfg.learner.resources)}); once the cluster has them, {resume_hint(run_path, ckpt)}"
        ) from exc


class NumericsWatch:
    """A step whose update was skipped (a non-finite loss or gradient: never applied) is reported;
    train.max_bad_steps of them in a row stop the run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.bad_steps: list[int] = []  # the latest steps in a row whose update was skipped
        self.overflow_skips = 0  # fp16 updates skipped by the loss scaler, the loss finite

    def reset(self) -> None:
        self.bad_steps = []

    def see(self, row: dict, write: Callable[[str], None], run: RunDir) -> None:
        if not row["update_skipped"]:
            self.bad_steps = []
            return
        if row.get("no_loss_tokens"):
            write(f"opsd: step {row['step']}: no token counted in the loss (every sample left out); no update")
            return
        if self.cfg.model.dtype == "float16" and not row["nonfinite_sample_ids"]:
            # fp16 loss scaling skips on overflow while it calibrates: normal, not a fault, but
            # counted and said (the learning-rate schedule does not advance on it either).
            self.overflow_skips += 1
            write(f"opsd: step {row['step']}: the fp16 loss scale overflowed and the update was skipped "
                  f"({self.overflow_skips} such step(s) in this run)")
            return
        self.bad_steps.append(row["step"])
        ids = row["nonfinite_sample_ids"]
        named = f"the loss of samples {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}" if ids else "the gradient"
        write(f"opsd: warning: step {row['step']}: {named} is not finite (loss {row['loss']}, grad norm "
              f"{row['grad_norm']}); its update was skipped")
        limit = self.cfg.train.max_bad_steps
        if len(self.bad_steps) >= limit:
            raise BadSteps(
                f"steps {self.bad_steps[0]}-{self.bad_steps[-1]}: {len(self.bad_steps)} steps in a row with a "
                f"non-finite loss or gradient norm (train.max_bad_steps={limit}); none was applied, so the weights "
                f"are those of step {self.bad_steps[0] - 1}. Look at the samples named in {run.metrics_file} "
                f"(nonfinite_sample_ids) and at learner.lr; then {resume_hint(run.path)}"
            )
