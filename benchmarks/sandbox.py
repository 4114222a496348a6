"""``opsd bench sandbox``: programs graded per second by the sandbox's pool, and what the sandbox costs
against running the same passing programs bare.

The programs are MBPP's reference solutions with their tests (``mbpp-test``, which all pass), each
run three ways with the same interpreter: bare (``python3 -c`` of the code and its asserts, no
limits, no runner), at level ``none`` (opsd's runner and rlimits in a plain child process) and at
level ``bwrap`` (the sandbox as graded in training), each with pools of 1 and ``workers``.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor


def _bare(python: str, code: str, asserts: tuple[str, ...], setup: str) -> bool:
    program = "\n".join([code, setup, *asserts])
    return subprocess.run([python, "-S", "-s", "-B", "-c", program], capture_output=True, timeout=60).returncode == 0


def bench_sandbox(programs: int = 100, workers: tuple[int, ...] = (1, 2), python: str = "/usr/bin/python3") -> dict:
    from opsd.assets.datasets import ensure, named
    from opsd.data import load_problems
    from opsd.sandbox import Limits, Sandbox, TestSpec, probe
    from opsd.verify import extract_code

    # mbpp/123's reference needs more than 4 s of CPU on a slow core: it measures the program, not the sandbox
    rows = [p for p in load_problems(ensure(named("mbpp-test"))) if p.uid != "mbpp/123"][:programs]
    jobs = [(extract_code(p.solution), TestSpec.from_json(p.answer)) for p in rows]
    report: dict = {"programs": len(jobs), "isolation": probe(python=python).describe(), "runs": []}
    for pool in workers:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(pool) as ex:
            ok = list(ex.map(lambda j: _bare(python, j[0], j[1].asserts, j[1].setup), jobs))
        wall = time.perf_counter() - t0
        report["runs"].append({"how": "bare", "pool": pool, "seconds": wall, "per_second": len(jobs) / wall,
                               "passed": sum(ok)})
        for level in ("none", "bwrap"):
            box = Sandbox(Limits(), require=level, workers=pool, python=python,
                          bwrap="bwrap" if level == "bwrap" else "/nonexistent/bwrap")
            try:
                t0 = time.perf_counter()
                verdicts = box.run_many(jobs)
                wall = time.perf_counter() - t0
            finally:
                box.close()
            report["runs"].append({"how": level, "pool": pool, "seconds": wall, "per_second": len(jobs) / wall,
                                   "passed": sum(v.passed for v in verdicts)})
    bare = {r["pool"]: r["seconds"] for r in report["runs"] if r["how"] == "bare"}
    for r in report["runs"]:
        r["overhead_ms_per_program"] = 1000 * (r["seconds"] - bare[r["pool"]]) * r["pool"] / len(jobs)
    for r in report["runs"]:
        print(f"{r['how']:6s} pool {r['pool']}: {r['per_second']:6.1f} programs/s ({r['seconds']:.1f} s for "
              f"{len(jobs)}, {r['passed']} passed), {r['overhead_ms_per_program']:+.0f} ms per program against bare")
    return report
