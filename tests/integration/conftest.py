"""Shared fixtures: one `opsd train` run through the CLI, and a local Ray (the tiny model: tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.config import REPO_ROOT

pytestmark = pytest.mark.integration

CLI_STEPS = 3


@pytest.fixture(scope="session")
def cli_run(tiny_model, tmp_path_factory) -> Path:
    """`opsd train` exactly as a user runs it (local Ray started by the command), batches saved.

    Runs before the in-process Ray fixture is created, so the two clusters never overlap.
    """
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    cmd = [sys.executable, "-m", "opsd.launch.cli", "train", "configs/tiny.yaml", f"run_dir={run_dir}", f"train.steps={CLI_STEPS}",
           "logging.save_batches=true", "train.checkpoint_every=3", "logging.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"opsd train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return run_dir


@pytest.fixture(scope="session")
def ray_session(tiny_model, request):
    """One local Ray for the in-process tests (4 logical CPUs on 2 cores: actors mostly wait)."""
    import ray

    from opsd.launch.cluster import init_ray, shutdown_ray
    from opsd.config import load_config

    # A CLI run, if any test needs it, finishes before this cluster starts (two clusters of one
    # process's tests would share the cores). Under pytest-xdist every worker collects every test
    # but runs only some, so a worker runs the CLI run only when a test of its own needs it.
    if "PYTEST_XDIST_WORKER" not in os.environ and any("cli_run" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("cli_run")
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["cluster.num_cpus=4"])
    init_ray(cfg)
    yield ray
    shutdown_ray()


def read_metrics(run_dir: Path, *, baseline: bool = False) -> list[dict]:
    """The rows of metrics.jsonl; without ``baseline``, the training steps only (not the step-0
    evaluation of the initial weights that a run with eval.every > 0 logs first)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return rows if baseline else [r for r in rows if r["step"] > 0]


def local_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", "logging.progress=false", "logging.tensorboard=false", *extra]


def local_config(*overrides: str):
    from opsd.config import load_config

    return load_config(REPO_ROOT / "configs" / "tiny.yaml", list(overrides))


def make_trainer(tmp_path: Path, *overrides: str, cls=None):
    """A started Trainer on the local config (the caller shuts it down) and its run directory."""
    from opsd.launch.checkpoints import RunDir
    from opsd.launch.driver import Trainer, prepare_config

    cfg, run_path = prepare_config(str(REPO_ROOT / "configs" / "tiny.yaml"), local_overrides(tmp_path, *overrides))
    trainer = (cls or Trainer)(cfg)
    trainer.start()
    return trainer, RunDir(run_path)


@pytest.fixture
def started_pools(monkeypatch) -> list[tuple[str, str]]:
    """(pool name, actor class name) of every actor pool a run starts, in order."""
    import opsd.launch.actors as actors_module
    from opsd.launch.cluster import ActorPool

    pools: list[tuple[str, str]] = []

    class CountedPool(ActorPool):
        def __init__(self, name, cls, *args, **kwargs):
            pools.append((name, cls.__name__))
            super().__init__(name, cls, *args, **kwargs)

    monkeypatch.setattr(actors_module, "ActorPool", CountedPool)
    return pools


def policy_recording_trainer():
    """A Trainer class that keeps the learner's full weights (LoRA merged) after every push, in
    ``policy_history``."""
    from opsd.launch.driver import Trainer

    class Recording(Trainer):
        def sync(self) -> None:
            super().sync()
            self.policy_history = getattr(self, "policy_history", [])
            self.policy_history.append(self.actors.learner.full_state())

    return Recording
