"""Stopping a run on request: SIGTERM (Kubernetes preemption, `ray job stop`, a scheduler's stop),
SIGINT (Ctrl-C) or SIGHUP (a closed terminal)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class Stopped(Exception):
    """The run stopped on request (SIGTERM or SIGINT) after a checkpoint; ``code`` is the exit
    status the CLI returns (128 + the signal, as a shell reports a process the signal killed)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


class RunFault(RuntimeError):
    """A run ended on a fault it explains in one line (what happened, what to do next): the CLI
    prints it without a traceback."""


class BadSteps(RunFault):
    """train.max_bad_steps steps in a row had a non-finite loss or gradient norm; none of their
    updates was applied."""


class LearnerLost(RunFault):
    """A learner rank died and train.max_actor_restarts restarts of the group are used up."""


class ActorLost(RunFault):
    """A rollout worker or scorer died and could not be brought back: Ray did not place it again
    within cluster.place_timeout_s (its node is gone), or train.max_actor_restarts ran out."""


class StopSignals:
    """The first SIGTERM, SIGINT or SIGHUP asks the run to stop after the step in progress, with a
    checkpoint; a second one stops it at once (as KeyboardInterrupt).

    SIGTERM is what Kubernetes sends on preemption, what `ray job stop` sends the entrypoint and
    what `timeout`, SLURM's scancel and systemd send a whole process group (a local run's Ray
    cluster is out of that group: launch/localhead.py); SIGINT is Ctrl-C; SIGHUP a closed terminal. Installed after ray.init, which sets a SIGTERM handler of its own, and only
    from the main thread (the only one Python delivers signals to).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.restore()
            os.write(2, f"opsd: second {name}: stopping at once\n".encode())
            # ray.get turns this into a KeyboardInterrupt of its own; the finally blocks still run.
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: a handler that prints could interrupt a print of the main thread.
        os.write(2, f"opsd: {name}: stopping after the step in progress, with a checkpoint (send it again "
                    "to stop at once)\n".encode())
