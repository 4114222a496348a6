"""The keeper of a run's local Ray cluster: ``python -m opsd.launch.localhead --parent PID -- [ray start options]``.

A local run's Ray daemons (GCS, raylet, dashboard agent, the actors' worker processes) live in a
session of their own, led by this process, instead of in the driver's process group
(docs/DESIGN.md, "Faults"). So a signal sent to the driver's whole group (``timeout``, SLURM's
``scancel``, systemd, a shell's job control) reaches the driver alone, which finishes its step and
writes its checkpoint on a cluster that is still there.

This process runs ``ray start --head --block`` as its child and waits. It ends the cluster when:

- the driver asks (SIGTERM, from :class:`opsd.launch.cluster.LocalCluster.stop`);
- the driver dies, however it dies, ``kill -9`` included: this process then has another parent
  (it checks five times a second);
- ``ray start`` itself ends.

Ending is: SIGTERM to ``ray start`` (which stops the processes it started), ``--grace-s`` seconds
for it to exit, then SIGKILL to every other process of this session, so that nothing the
cluster started (a dashboard agent whose raylet died first, say) outlives it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time


class LocalClusterError(RuntimeError):
    """The local cluster did not come up; the message holds the end of its log."""


# The local clusters' Ray temp dir (sessions and logs): short, as Ray's socket paths must be.
TEMP_DIR = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray-opsd")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_JOIN_LINE = re.compile(r"ray start --address='[^']*:(\d+)'")


def started_port(log: str) -> int | None:
    """The GCS port in ``ray start``'s banner ("Ray runtime started", then the line that tells
    other nodes how to join: ``ray start --address='HOST:PORT'``); None before it is printed."""
    text = _ANSI.sub("", log)
    if "Ray runtime started" not in text:
        return None
    found = _JOIN_LINE.search(text)
    return int(found.group(1)) if found else None


class LocalCluster:
    """A Ray head of this run's own, in a session of its own, kept by this module's process.

    ``start()`` returns the GCS address to give ``ray.init``; ``stop()`` (after ``ray.shutdown``)
    ends the cluster and waits for it. A driver that dies without calling ``stop`` still ends it
    (the keeper sees its parent change)."""

    def __init__(self, *, num_cpus: int | None, dashboard: bool, grace_s: float = 10.0, ready_s: float = 120.0):
        self.num_cpus, self.dashboard, self.grace_s, self.ready_s = num_cpus, dashboard, grace_s, ready_s
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.log_path: str | None = None

    def start(self) -> str:
        import tempfile

        # Port 0: the GCS binds a free port itself and `ray start` prints it (a port picked free
        # here and bound by the GCS a moment later could be taken in between by another job).
        # A temp dir of opsd's own: `ray start` records its address in the temp dir's
        # ray_current_cluster, and a plain ray.init() elsewhere on this machine joins the cluster
        # named in the default one (or fails on it, once this cluster is gone).
        options = ["--port=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={TEMP_DIR}",
                   f"--include-dashboard={'true' if self.dashboard else 'false'}", "--dashboard-host=127.0.0.1"]
        if self.num_cpus is not None:
            options.append(f"--num-cpus={self.num_cpus}")
        log = tempfile.NamedTemporaryFile("w", prefix="opsd-localhead-", suffix=".log", delete=False)
        self.log_path = log.name
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opsd.launch.localhead", "--parent", str(os.getpid()),
                 f"--grace-s={self.grace_s:g}", "--", *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its log is read for the start line
                start_new_session=True,  # the point: out of the driver's process group and session
            )
        self.address = f"127.0.0.1:{self._wait_ready()}"
        return self.address

    def _wait_ready(self) -> int:
        """The GCS port, once the head's raylet is up (``ray start`` prints its banner, with the
        address, after it) and the port answers; or an error once the keeper ends."""
        import socket

        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LocalClusterError(f"the local Ray cluster ended while starting (exit {self.proc.returncode}):\n"
                                        f"{self.log_tail()}")
            port = started_port(self.log_tail(8000))
            if port is not None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                        return port
                except OSError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise LocalClusterError(f"the local Ray cluster did not start within {self.ready_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        """End the cluster (SIGTERM to its keeper) and wait for it, at most grace_s + 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.grace_s + 10)
            except subprocess.TimeoutExpired:
                for pid in session_members(self.proc.pid):  # the keeper leads its session
                    _kill(pid)
                self.proc.wait()
        self.proc = None
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opsd.launch.localhead")
    p.add_argument("--parent", type=int, required=True, help="the driver's PID: gone already -> stop at once")
    p.add_argument("--grace-s", type=float, default=10.0)
    p.add_argument("ray_start", nargs=argparse.REMAINDER, help="options of ray start, after --")
    args = p.parse_args(argv)
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    if os.getppid() != args.parent:  # the driver died before the death signal was armed
        return _end(None, args.grace_s)
    options = [a for a in args.ray_start if a != "--"]
    child = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", *options])
    # The driver's death, however it dies: this process is handed to another parent.
    while not stop["requested"] and child.poll() is None and os.getppid() == args.parent:
        time.sleep(0.2)
    orphaned = os.getppid() != args.parent
    code = _end(child, args.grace_s)
    if orphaned:  # no driver will read (and delete) this process's log: it goes with it
        _remove_own_log()
    return code


def _remove_own_log() -> None:
    """Delete the file this process's stdout writes to, when it is a regular file under the
    temp dir (LocalCluster's log)."""
    import tempfile

    try:
        path = os.readlink("/proc/self/fd/1")
        if os.path.dirname(path) == tempfile.gettempdir() and os.path.basename(path).startswith("opsd-localhead-"):
            os.unlink(path)
    except OSError:
        pass  # no such file, or not ours to remove


def _end(child: subprocess.Popen | None, grace_s: float) -> int:
    code = 0
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            code = 1
    elif child is not None:
        code = child.returncode
    # Everything else left in this session goes (Ray's workers lead process groups of their own,
    # but stay in the session).
    for pid in session_members(os.getsid(0)):
        if pid != os.getpid():
            _kill(pid)
    return code


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # gone meanwhile


def session_members(sid: int) -> list[int]:
    """The PIDs of a session, from /proc (field 6 of /proc/PID/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            out.append(int(entry))
    return out


if __name__ == "__main__":
    sys.exit(main())
