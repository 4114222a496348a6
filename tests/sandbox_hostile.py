"""The hostile programs of tests/unit/test_sandbox_hostile.py, and a runner for them that needs the
standard library only, so the test can run it as another user (``python3 tests/sandbox_hostile.py
TARGETS_JSON``: one JSON object of verdicts on stdout).

Each program is graded by ``assert f() == 1``; the ones whose attack is contained and that then
define ``f`` pass, the others end as their verdict says. The targets (paths, a port, a pid) are
those of the test, outside the sandbox: each attack would succeed against them without it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OK = "def f():\n    return 1\n"

# name -> (program; its format fields are the targets), expected verdict, a word its detail holds
PROGRAMS: dict[str, tuple[str, str, str]] = {
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", "error", "BlockingIOError"),
    "memory_bomb": ("hog = []\nwhile True:\n    hog.append(bytearray(2**24))\n", "memory", "MemoryError"),
    "infinite_loop": ("while True:\n    pass\n", "timeout", "CPU"),
    "print_1gb": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n", "killed", "output"),
    "write_run_dir": ("open({run_dir!r} + '/checkpoints/pwned', 'w').write('x')\n" + OK, "error", "FileNotFoundError"),
    "write_home": ("open({home!r} + '/{marker}', 'w').write('x')\n" + OK, "error", "FileNotFoundError"),
    "read_ray_token": ("print(open({token!r}).read())\n" + OK, "error", "FileNotFoundError"),
    "read_dataset": ("print(open({dataset!r}).read())\n" + OK, "error", "FileNotFoundError"),
    "tcp_connect": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'pwned')\n" + OK,
                    "error", "Error"),
    "background_process": ("import os\nif os.fork() == 0:\n    os.setsid()\n"
                           "    os.execv('/usr/bin/sleep', ['sleep', '{sleep}'])\n" + OK, "passed", ""),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "try:\n    os.kill({pid}, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n" + OK,
                    "passed", ""),
    "delete_workdir": ("import os, shutil\nshutil.rmtree(os.getcwd(), ignore_errors=True)\n"
                       "try:\n    os.rmdir(os.getcwd())\nexcept OSError:\n    pass\n" + OK, "passed", ""),
}


def run_all(targets: dict, workers: int = 2, cpu_s: float = 1.0) -> dict[str, dict]:
    """Every hostile program graded in the sandbox (bwrap required): name -> Verdict.as_dict()."""
    from opsd.sandbox import Limits, Sandbox, TestSpec

    box = Sandbox(Limits(cpu_s=cpu_s, wall_s=30.0, memory_mb=256, processes=16), require="bwrap", workers=workers)
    targets = {**targets, "pid": os.getpid()}  # the grading process itself, which kill_parent aims at
    try:
        names = list(PROGRAMS)
        spec = TestSpec(asserts=("assert f() == 1",))
        verdicts = box.run_many([(PROGRAMS[n][0].format(**targets), spec) for n in names])
        out = {n: v.as_dict() for n, v in zip(names, verdicts)}
        out["_isolation"] = {"level": box.isolation.level, "detail": box.isolation.detail}
        return out
    finally:
        box.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    found = run_all(json.loads(sys.argv[1]))
    print(json.dumps(found))
