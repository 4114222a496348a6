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


def eos_ids(model_dir) -> list[int]:
    """The stop ids as vLLM reads them, straight from the model folder's JSON files."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    assert ids, f"{model_dir}: no eos_token_id"
    return sorted(ids)


def check_stop_probabilities(row: dict, table, model, model_dir) -> dict[str, int]:
    """A step's stop-probability metrics (``row``) against a plain fp32 forward of ``model`` (the
    weights that trained on ``table``) and a row-by-row mean: at the last response position of each
    row whose context applied, by how it ended (cut: "length", finished: "stop"), the student's
    probability of a stop id at the batch's temperature, the teacher's from its saved column. Returns
    how many rows of each kind it checked."""
    import numpy as np
    import torch

    from opsd.batch import batch_meta

    stop_ids = eos_ids(model_dir)
    temp = float(batch_meta(table)["opsd.temperature"])
    seen = {"truncated": [], "finished": []}
    for r in table.to_pylist():
        kind = {"length": "truncated", "stop": "finished"}.get(r["finish_reason"])
        if kind is None or not r["response_ids"] or r["context_applied"] is False:
            continue
        seq = r["prompt_ids"] + r["response_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(seq) - 2].double() / temp
        student = float(torch.softmax(logits, -1)[stop_ids].sum())
        teacher = float(np.exp(np.float64(r["teacher_stop_logprobs"][-1])))
        seen[kind].append((teacher, student))
    for kind, pairs in seen.items():
        if not pairs:
            assert row[f"stop_prob_student_{kind}"] is None and row[f"stop_gap_{kind}"] is None
            continue
        teacher, student = np.mean([t for t, _ in pairs]), np.mean([s for _, s in pairs])
        assert row[f"stop_prob_student_{kind}"] == pytest.approx(student, rel=1e-4, abs=1e-7)
        assert row[f"stop_prob_teacher_{kind}"] == pytest.approx(teacher, rel=1e-4, abs=1e-7)
        assert row[f"stop_gap_{kind}"] == pytest.approx(teacher - student, rel=1e-3, abs=1e-7)
    return {kind: len(pairs) for kind, pairs in seen.items()}


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
