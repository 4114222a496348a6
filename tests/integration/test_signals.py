"""Stops the way schedulers send them, to `opsd train` run as a user runs it (a process of its own,
in a session of its own, as under `timeout`, SLURM or systemd):

- SIGTERM (or SIGHUP) to the whole process group: the step in progress finishes, a checkpoint is
  written, the run exits 128 + signal with the resume line; the local Ray cluster, in a session
  of its own (launch/localhead.py), is still there for all of that and gone afterwards;
- a second group signal stops it at once, and still nothing of the run is left;
- `kill -9` of the driver alone: nothing of the run is left a short, stated time later.

"Nothing of the run": no process in the driver's session other than the driver, and none in the
session of the cluster's keeper.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsd.config import REPO_ROOT
from opsd.launch.checkpoints import latest_checkpoint
from opsd.launch.localhead import TEMP_DIR, session_members

pytestmark = pytest.mark.integration

GONE_WITHIN_S = 30.0  # the stated time: the keeper checks its parent 5x a second, then 10 s grace


class Run:
    """`opsd train configs/tiny.yaml` in a new session; its output in files."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.dir = tmp_path / "run"
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        cmd = [sys.executable, "-m", "opsd.launch.cli", "train", "configs/tiny.yaml", f"run_dir={self.dir}",
               "train.steps=200", "train.checkpoint_every=100", "eval.every=0", "logging.progress=false",
               "logging.tensorboard=false", *overrides]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.keeper: int | None = None

    def output(self) -> str:
        return self.out.read_text(errors="replace")[-3000:] + "\n" + self.err.read_text(errors="replace")[-6000:]

    def steps_done(self) -> int:
        path = self.dir / "metrics.jsonl"
        return sum(1 for line in path.read_text().splitlines() if line) if path.is_file() else 0

    def wait_for_steps(self, n: int, timeout: float = 600) -> None:
        """Until n steps are logged; records the cluster's keeper (a child of the driver) meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended early ({self.proc.returncode}):\n{self.output()}"
            if self.keeper is None:
                self.keeper = find_keeper(self.proc.pid)
            if self.steps_done() >= n and self.keeper is not None:
                return
            time.sleep(0.2)
        raise AssertionError(f"no {n} steps in {timeout} s:\n{self.output()}")

    def wait_for_text(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.err.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not printed in {timeout} s:\n{self.output()}")

    def leftovers(self) -> dict[str, list[str]]:
        """Processes of the run still alive after GONE_WITHIN_S: the driver's session, the keeper's."""
        deadline = time.monotonic() + GONE_WITHIN_S
        while True:
            left = {name: [describe(p) for p in session_members(sid) if p != os.getpid()]
                    for name, sid in (("driver's session", self.proc.pid), ("cluster's session", self.keeper))}
            if not any(left.values()) or time.monotonic() > deadline:
                return {k: v for k, v in left.items() if v}
            time.sleep(0.5)

    def kill(self) -> None:
        for sid in (self.proc.pid, self.keeper):
            if sid:
                for pid in session_members(sid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def find_keeper(driver: int) -> int | None:
    for pid in session_members(driver):
        if pid != driver and "opsd.launch.localhead" in cmdline(pid):
            return pid
    for entry in os.listdir("/proc"):  # it has left the driver's session: its own, led by itself
        if entry.isdigit() and "opsd.launch.localhead" in cmdline(int(entry)) and parent(int(entry)) == driver:
            return int(entry)
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def describe(pid: int) -> str:
    return f"{pid} {cmdline(pid)[:120]}"


@pytest.fixture
def run_of(tmp_path, tiny_model):
    runs: list[Run] = []

    def start(*overrides: str) -> Run:
        runs.append(Run(tmp_path, *overrides))
        return runs[-1]

    yield start
    for r in runs:  # whatever a failed assertion left
        r.kill()


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores. A SIGTERM's stop,
# checkpoint and resume are in the default run through test_resume.py (the signal sent to the
# driver's main thread) and the handler's two signals in tests/unit/test_checkpoints.py.
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_process_group_stops_the_run_with_a_checkpoint(run_of, signum):
    started = time.time()
    run = run_of()
    run.wait_for_steps(2)
    # The cluster records its address in a Ray temp dir of opsd's own, not in the default one where
    # a plain ray.init() elsewhere on the machine would find it (and join it, or fail on it later).
    assert f"--temp-dir={TEMP_DIR}" in cmdline(run.keeper).split()
    assert os.stat(os.path.join(TEMP_DIR, "ray_current_cluster")).st_mtime >= started - 1
    os.killpg(run.proc.pid, signum)
    code = run.proc.wait(timeout=300)
    text = run.output()
    assert code == 128 + signum, text
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step" in text and "opsd train --resume" in text, text
    # The checkpoint of the step it stopped after, complete (its manifest verifies).
    last = json.loads((run.dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    ckpt = latest_checkpoint(run.dir)
    assert ckpt is not None and ckpt.name == f"step_{last}", (ckpt, last, text)
    assert "Failed to connect to GCS" not in text
    assert run.leftovers() == {}


@pytest.mark.slow
def test_a_second_group_signal_stops_at_once_and_leaves_nothing(run_of):
    run = run_of()
    run.wait_for_steps(2)
    os.killpg(run.proc.pid, signal.SIGTERM)
    run.wait_for_text("stopping after the step in progress")
    os.killpg(run.proc.pid, signal.SIGTERM)
    code = run.proc.wait(timeout=120)
    assert code != 0 and "second SIGTERM: stopping at once" in run.output(), run.output()
    assert run.leftovers() == {}


@pytest.mark.slow
def test_nothing_outlives_a_driver_killed_with_sigkill(run_of):
    run = run_of()
    run.wait_for_steps(1)
    log = Path(os.readlink(f"/proc/{run.keeper}/fd/1"))  # the keeper's log, which the driver would delete
    assert log.name.startswith("opsd-localhead-") and log.is_file()
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=30) == -signal.SIGKILL
    assert run.leftovers() == {}
    assert not log.exists()  # nor does its log file outlive it
