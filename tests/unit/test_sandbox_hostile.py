"""The hostile-program suite (docs/DESIGN.md, "The sandbox"): every attack a model-written program
could make on the machine, run through opsd's sandbox as root and as a normal user. Each must end
with its verdict, the listener must get no connection, no file outside may change, and no process
may outlive its program. It fails loudly the day the boundary moves.

Needs bubblewrap: skipped with the reason without it, except where OPSD_REQUIRE_SANDBOX=1 (CI,
.ci/run), where a missing sandbox is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from opsd.sandbox import probe
from tests.sandbox_hostile import PROGRAMS, run_all

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def require_bwrap() -> None:
    iso = probe()
    if iso.level != "bwrap":
        if os.environ.get("OPSD_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"OPSD_REQUIRE_SANDBOX=1 but the sandbox is {iso.describe()}")
        pytest.skip(f"no bubblewrap sandbox here: {iso.describe()}")


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def processes_with(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(proc.name)
            except OSError:
                pass
    return found


@pytest.fixture
def world():
    """What the programs attack: a run directory, a home with ~/.ray/auth_token, a dataset, all
    readable and writable by anyone (so that only the sandbox stands between them and the
    programs, whoever runs them), a listener, and markers to find leftovers by."""
    root = Path(tempfile.mkdtemp(prefix="opsd-hostile-"))
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "config.yaml").write_text("algo: grpo\n")
    (root / "home" / ".ray").mkdir(parents=True)
    secret = secrets.token_hex(16)
    (root / "home" / ".ray" / "auth_token").write_text(secret)
    (root / "data.jsonl").write_text('{"id": 1, "problem": "secret data"}\n')
    for p in [root, *root.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    listener = Listener()
    targets = {"run_dir": str(root / "run"), "home": str(root / "home"), "token": str(root / "home" / ".ray" / "auth_token"),
               "dataset": str(root / "data.jsonl"), "port": listener.port, "marker": f"pwned-{secrets.token_hex(4)}",
               "sleep": f"4242.{secrets.randbelow(10**6)}"}
    try:
        yield root, targets, listener, secret
    finally:
        listener.close()
        shutil.rmtree(root, ignore_errors=True)


def check(found: dict, root: Path, before: dict, targets: dict, listener: Listener, secret: str) -> None:
    assert found["_isolation"]["level"] == "bwrap"
    wrong = {n: (found[n]["verdict"], found[n]["detail"]) for n, (_, verdict, word) in PROGRAMS.items()
             if found[n]["verdict"] != verdict or word not in found[n]["detail"]}
    assert not wrong, f"verdicts other than expected: {wrong}"
    assert listener.accepted == 0
    assert snapshot(root) == before, "a file outside the sandbox changed"
    assert all(secret not in v["output"] for n, v in found.items() if n != "_isolation")
    assert processes_with(targets["sleep"]) == [], "a process outlived its program"


def test_hostile_programs_as_this_user(world):
    """In this process: as root where the tests run as root (programs then run as nobody)."""
    require_bwrap()
    root, targets, listener, secret = world
    before = snapshot(root)
    found = run_all(targets)
    check(found, root, before, targets, listener, secret)
    if os.geteuid() == 0:
        assert "as uid 65534" in found["_isolation"]["detail"]


def test_hostile_programs_as_a_normal_user(world):
    """The same suite started by an unprivileged user (nobody), with the standard library only."""
    require_bwrap()
    if os.geteuid() != 0:
        pytest.skip("the tests run as a normal user already (test_hostile_programs_as_this_user)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux) to become nobody")
    root, targets, listener, secret = world
    before = snapshot(root)
    done = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3",
                           str(REPO / "tests" / "sandbox_hostile.py"), json.dumps(targets)],
                          capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "opsd's own uid 65534" in found["_isolation"]["detail"]
    check(found, root, before, targets, listener, secret)
