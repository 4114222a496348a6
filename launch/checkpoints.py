"""Checkpoints a run can trust, and what a resumed run reads back.

A checkpoint is written whole into ``.step_N.tmp`` (the learner's DeepSpeed state, ``hf/``
weights, an EMA teacher's weights, the driver's :class:`RunState`), then a manifest of every file
with its size and SHA-256, last, then one rename makes it final: a kill at any moment leaves
either the complete checkpoint or none, and older ones untouched. Resume takes the newest one
that verifies.

Importing this module imports neither torch nor Ray, so that the CLI can name its errors
without loading either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from opsd.launch.stopping import RunFault


MANIFEST = "manifest.json"


class RunDir:
    """A run directory: config.yaml, metrics.jsonl, batches/ and checkpoints/step_N/."""

    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file = path / "metrics.jsonl"
        self.batches = path / "batches"
        self.checkpoints = path / "checkpoints"

    def truncate_metrics(self, last_step: int) -> None:
        """Forget steps after the checkpoint being resumed from: they will be redone."""
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError):
                pass  # a line torn by the interruption
        self.metrics_file.write_text("".join(ln + "\n" for ln in kept))


class CheckpointError(RunFault):
    """A checkpoint could not be written (a full disk, a lost volume); the previous one is intact."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Every file of a checkpoint with its size and SHA-256, written last."""
    files = {
        str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint, or None when every file its manifest lists is there with
    its size and checksum. One from before manifests existed is judged by its driver state."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        try:
            json.loads((ckpt / "driver_state.json").read_text())
        except (ValueError, OSError) as exc:
            return f"{ckpt / 'driver_state.json'} is damaged ({exc})"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, OSError, KeyError, TypeError) as exc:
        return f"{manifest} is damaged ({exc})"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, its manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its checksum"
    return None


def finished_checkpoints(checkpoints: Path) -> list[Path]:
    """The ``step_N`` folders under ``checkpoints``, oldest first by N (a ``.step_N.tmp`` is unfinished
    and never one of them); whether each verifies is not checked here."""
    done = [(int(d.name.split("_")[-1]), d) for d in checkpoints.glob("step_*")
            if d.name.split("_")[-1].isdigit() and d.is_dir()]
    return [d for _, d in sorted(done)]


def latest_checkpoint(run_dir: Path, after_step: int = 0) -> Path | None:
    """The newest checkpoint that verifies against its manifest. A newer, damaged one is passed
    over with a warning; an unfinished one (.step_N.tmp, left by a kill during the write) is never
    a candidate. With ``after_step``, only those of later steps (a stage's own: launch/stages.py)."""
    for d in reversed(finished_checkpoints(run_dir / "checkpoints")):
        if int(d.name.split("_")[-1]) <= after_step:
            break
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        print(f"opsd: warning: checkpoint {d.name} is damaged: {problem}; using an older one", flush=True)
    return None


def prune_checkpoints(checkpoints: Path, keep: int, newest: Path) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (``keep`` 0: none is deleted);
    returns what was deleted. ``newest``, the one just written (complete: its manifest was written
    before its rename), is always kept."""
    if keep <= 0:
        return []
    old = [d for d in finished_checkpoints(checkpoints)[:-keep] if d != newest]
    for d in old:
        # Renamed first, so a kill during the delete leaves a name resume never reads.
        doomed = d.with_name(f".{d.name}.deleting")
        os.replace(d, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in checkpoints.glob(".step_*.deleting"):  # a delete a kill interrupted earlier
        shutil.rmtree(leftover, ignore_errors=True)
    return old


@dataclass
class RunState:
    """The driver's part of a checkpoint: where the run is, besides the learner's weights."""

    step: int
    policy_version: int
    teacher_version: int
    tokens_generated_total: int
    sampler: dict  # EpochSampler.state_dict()
    # Prompt batches drawn for later steps whose rollouts were in flight (rollout.max_staleness >
    # 0), oldest first: a resumed run does them first.
    pending_indices: list[list[int]] = field(default_factory=list)
    # The stage the checkpoint was written in and its step within that stage (launch/stages.py);
    # None in a one-stage run.
    stage: str | None = None
    stage_step: int | None = None

    @classmethod
    def read(cls, ckpt: Path) -> "RunState":
        state = json.loads((ckpt / "driver_state.json").read_text())
        pending = state.get("pending_indices") or []
        # A checkpoint of one batch in flight (before up to s were) holds one flat list.
        state["pending_indices"] = [pending] if pending and isinstance(pending[0], int) else [list(p) for p in pending]
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})


def write_checkpoint(checkpoints: Path, state: RunState, learner: Any, *, export_hf: bool,
                     teacher: Callable[[], dict] | None = None,
                     learner_died: Callable[[BaseException], bool] = lambda exc: False) -> Path:
    """``checkpoints/step_<state.step>``: the learner's state (and ``hf/`` with ``export_hf``), the
    EMA teacher's weights when ``teacher`` gives them, and ``state``; atomically (see above).

    A write that fails for a learner rank's death (``learner_died``) raises that error (the driver
    restarts the learner group); any other failure (a full disk) raises :class:`CheckpointError` naming it,
    the free space and the checkpoint that is still intact."""
    final = checkpoints / f"step_{state.step}"
    tmp = checkpoints / f".step_{state.step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        learner.save_checkpoint(str(tmp / "learner"))
        if export_hf:
            learner.export_hf(str(tmp / "hf"))
        if teacher is not None:
            from safetensors.torch import save_file

            (tmp / "teacher").mkdir()
            save_file(teacher(), tmp / "teacher" / "ema.safetensors")
        (tmp / "driver_state.json").write_text(json.dumps(asdict(state), indent=1))
        write_manifest(tmp)
    except Exception as exc:  # any failure of the write: the temporary folder goes, the cause is named
        shutil.rmtree(tmp, ignore_errors=True)
        if learner_died(exc):
            raise  # the driver restarts the learner group
        previous = latest_checkpoint(checkpoints.parent)
        kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
        # A full disk often surfaces as a writer's own error (torch.save: "unexpected pos"): the
        # free space says what happened.
        free = shutil.disk_usage(checkpoints).free / 2**30
        raise CheckpointError(
            f"writing checkpoint step_{state.step} under {checkpoints} failed ({free:.1f} GiB free there): "
            f"{root_cause(exc)}; {kept}. Free space on that volume (or fix it) and resume with: "
            f"opsd train --resume {checkpoints.parent}"
        ) from exc
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_teacher(ckpt: Path) -> dict:
    """The EMA teacher's weights saved with a checkpoint."""
    from safetensors.torch import load_file

    return load_file(ckpt / "teacher" / "ema.safetensors")


def root_cause(exc: BaseException) -> str:
    """The error under Ray's wrapping (a RayTaskError names the remote one as its cause)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and cause is not exc:
        exc, cause = cause, getattr(cause, "cause", None) or cause.__cause__
    return f"{type(exc).__name__}: {exc}".split("\n")[0]


def resume_hint(run_path: Path, ckpt: Path | None = None) -> str:
    """What a user does after a run ended: resume from ``ckpt`` (default: the newest sound
    checkpoint), or start again when there is none."""
    ckpt = ckpt or latest_checkpoint(run_path)
    if ckpt is None:
        return "no checkpoint was written, so start the run again"
    return f"resume from {ckpt} with: opsd train --resume {run_path}"
