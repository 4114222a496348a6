"""Checkpoints a run can trust: a manifest of every file with its size and SHA-256, written last
inside a temporary folder that one rename makes final; resume takes the newest one that verifies.

Kept free of torch and Ray so that the CLI can name its errors without loading either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from opsd.launch.stopping import RunFault


MANIFEST = "manifest.json"


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies against its manifest. A newer, damaged one is passed
    over with a warning; an unfinished one (.step_N.tmp, left by a kill during the write) is never
    a candidate."""
    done = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        if d.name.split("_")[-1].isdigit() and d.is_dir():
            done.append((int(d.name.split("_")[-1]), d))
    for _, d in sorted(done, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        print(f"opsd: warning: checkpoint {d.name} is damaged: {problem}; using an older one", flush=True)
    return None
