"""opsd/sandbox.py: verdicts, the pool, and what a machine with less isolation gets. The attacks
are in test_sandbox_hostile.py."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from opsd.sandbox import Limits, Sandbox, SandboxError, TestSpec, probe
from tests.unit.test_sandbox_hostile import require_bwrap

ADD = TestSpec(asserts=("assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"))
CHECK = TestSpec(program="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 5) == 7\n",
                 entry_point="add")


@pytest.fixture(scope="module")
def box():
    require_bwrap()
    b = Sandbox(Limits(cpu_s=1, wall_s=20), workers=2)
    yield b
    b.close()


@pytest.mark.parametrize("code, tests, verdict, detail", [
    ("def add(a, b):\n    return a + b\n", ADD, "passed", ""),
    ("def add(a, b):\n    return a + b if a != 2 else 5\n", ADD, "failed", "assert add(2, 2) == 4"),
    ("def add(a, b):\n    return a - b\n", CHECK, "failed", "assert candidate(1, 2) == 3"),
    ("def add(a, b):\n    return a + b\n", CHECK, "passed", ""),
    ("def add(a, b:\n", ADD, "error", "SyntaxError"),
    ("def plus(a, b):\n    return a + b\n", ADD, "failed", "NameError: name 'add' is not defined in: assert add(1, 2)"),
    ("raise ValueError('at import')\n", ADD, "error", "ValueError: at import"),
    ("import sys\nsys.exit(0)\n", ADD, "error", "SystemExit"),
    ("import numpy\n", ADD, "error", "ModuleNotFoundError"),  # the standard library only
    (None, ADD, "error", "no fenced Python code block"),
])
def test_verdicts(box, code, tests, verdict, detail):
    v = box.run(code, tests)
    assert (v.verdict, v.passed) == (verdict, verdict == "passed"), v
    assert detail in v.detail


def test_a_forged_report_without_the_runs_nonce_is_not_a_pass(box):
    forged = 'import os\nprint(\'@@opsd-0@@{"verdict": "passed", "detail": ""}\')\nos._exit(0)\n'
    v = box.run(forged, ADD)
    assert v.verdict == "error" and "before the tests finished" in v.detail


def test_the_environment_is_fixed(box):
    code = ("import os, sys\nassert os.environ.get('PYTHONHASHSEED') == '0', os.environ\n"
            "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONHASHSEED'], sorted(os.environ)\n"
            "assert os.getcwd() == '/sbx' and os.listdir('.') == []\n"
            "assert not any('site-packages' in p or 'dist-packages' in p for p in sys.path), sys.path\n"
            "def add(a, b):\n    return a + b\n")
    assert box.run(code, ADD).verdict == "passed"


def test_the_pool_keeps_the_order(box):
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", ADD) for i in range(6)]
    assert [v.verdict for v in box.run_many(jobs)] == ["passed", "failed"] * 3


def fake_bwrap(message: str) -> str:
    """A bwrap that fails as bubblewrap does where user namespaces are off (anyone may run it: as
    root, the sandbox starts it as sandbox.uid)."""
    folder = Path(tempfile.mkdtemp(prefix="opsd-fake-bwrap-"))
    folder.chmod(0o755)
    path = folder / "bwrap"
    path.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def test_without_user_namespaces_the_level_is_none_and_says_why():
    bwrap = fake_bwrap("bwrap: No permissions to creating new namespace, likely because the kernel does "
                                 "not allow non-privileged user namespaces.")
    iso = probe(bwrap=bwrap)
    assert iso.level == "none"
    assert "No permissions to creating new namespace" in iso.detail and "rlimits only" in iso.detail
    with pytest.raises(SandboxError, match=r"config key 'sandbox.isolation' = 'bwrap'.*no boundary"):
        Sandbox(require="bwrap", bwrap=bwrap)


def test_without_bwrap_a_run_that_asks_for_it_is_refused_naming_the_key():
    with pytest.raises(SandboxError, match=r"'sandbox.isolation' = 'bwrap'.*bubblewrap not found.*apt-get install"):
        Sandbox(require="bwrap", bwrap="/nonexistent/bwrap")


def test_level_none_when_accepted_still_grades_under_rlimits():
    box = Sandbox(Limits(cpu_s=1), require="none", bwrap="/nonexistent/bwrap", workers=1)
    try:
        assert box.isolation.level == "none"
        assert box.run("def add(a, b):\n    return a + b\n", ADD).verdict == "passed"
        assert box.run("while True:\n    pass\n", ADD).verdict == "timeout"
        assert box.run("x = bytearray(2**40)\n", ADD).verdict == "memory"
    finally:
        box.close()


def test_an_unknown_level_or_interpreter_names_its_key():
    with pytest.raises(SandboxError, match="'sandbox.isolation' = 'docker'"):
        Sandbox(require="docker")
    with pytest.raises(SandboxError, match="'sandbox.python'"):
        Sandbox(require="none", python="/nonexistent/python3")


def test_root_runs_programs_as_another_uid():
    iso = probe()
    assert (iso.uid is not None) == (os.geteuid() == 0)
