"""The sandbox: model-written code runs here, in processes of its own, never in an opsd process.

docs/DESIGN.md, "The sandbox", is the boundary written down; tests/unit/test_sandbox_hostile.py
tests it from the outside. In short, one program (a response's code and the tests it is graded by)
runs in a fresh process tree under bubblewrap (``bwrap``, Debian's ``bubblewrap``), a maintained
isolation tool:

- its own user, PID, network, mount, IPC, UTS and cgroup namespaces (``--unshare-all
  --unshare-user``), no further user namespaces inside (``--disable-userns``), a session of its
  own (``--new-session``: no terminal injection), killed with its parent (``--die-with-parent``);
- a filesystem of ``/usr`` read-only, a fresh ``/proc`` and ``/dev``, and two small private
  tmpfs (``/sbx``, its working directory, and ``/tmp``); nothing of the run (run directory,
  checkpoints, ``~/.ray`` and its token, the dataset, the home directory) exists inside;
- an empty environment but ``PYTHONHASHSEED`` (fixed), ``PATH`` and ``LANG``; a fixed interpreter
  (``sandbox.python``) with ``-S -s``: the standard library only;
- when opsd runs as root, the program runs as an unprivileged uid (``sandbox.uid``): root is
  exempt from RLIMIT_NPROC, and a fork bomb must meet the limit as root too.

Limits are the kernel's: RLIMIT_CPU (the verdict ``timeout`` comes from CPU time, which does not
depend on the machine's load), RLIMIT_AS (``memory``), RLIMIT_NPROC (counted per user namespace,
so only the program's own processes count), RLIMIT_NOFILE, RLIMIT_FSIZE, and tmpfs sizes; the
parent adds a wall-clock backstop (``sandbox.wall_s``: a program that sleeps) and reads at most
``sandbox.output_kb`` of output, then kills. The program's PID namespace dies with its first
process: nothing it started outlives it.

Where bwrap cannot run (not installed; a pod without user namespaces) the level is ``none``: a
child process with the same rlimits, an empty private directory and a process group of its own,
and no boundary at all around files and network. ``sandbox.isolation`` is the least a run accepts;
a machine that gives less is refused with an error naming the key, never silently.

The module imports the standard library only (and opsd.errors): it runs in the driver, in Ray actors, and in tests
as another user.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

from opsd.errors import ConfigError

__all__ = ["LEVELS", "VERDICTS", "Isolation", "Limits", "Sandbox", "SandboxError", "TestSpec", "Verdict", "probe",
           "shared"]

# Weakest first. "none" is still a process of its own under rlimits, but no boundary.
LEVELS = ("none", "bwrap")
VERDICTS = ("passed", "failed", "timeout", "memory", "killed", "error")


class SandboxError(ConfigError):
    """The sandbox cannot give what the config asks for; the message names the key (a config error:
    the CLI prints it as one line)."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 4.0  # CPU seconds of each process (RLIMIT_CPU): the timeout verdict
    wall_s: float = 20.0  # the parent's backstop for a program that does not use CPU (sleeps, blocks)
    memory_mb: int = 512  # address space of each process (RLIMIT_AS)
    processes: int = 32  # processes and threads in the program's user namespace (RLIMIT_NPROC)
    open_files: int = 64  # RLIMIT_NOFILE
    file_mb: int = 16  # the largest file it may write (RLIMIT_FSIZE), and each tmpfs' size
    output_kb: int = 64  # stdout and stderr together; more, and it is killed

    @property
    def output_bytes(self) -> int:
        return self.output_kb * 1024


@dataclass(frozen=True)
class TestSpec:
    """What a program is graded by: ``setup`` run first, then each of ``asserts`` on its own (the
    first that fails is the detail), or ``program`` (HumanEval's ``check(candidate)``), which is
    then called on ``entry_point`` when it defines ``check``."""

    asserts: tuple[str, ...] = ()
    setup: str = ""
    program: str = ""
    entry_point: str | None = None
    __test__ = False  # not a pytest test class, whatever its name

    def __post_init__(self) -> None:
        if not self.asserts and not self.program.strip():
            raise ValueError("a test spec needs asserts or a test program")

    def to_json(self) -> str:
        return json.dumps({"asserts": list(self.asserts), "setup": self.setup, "program": self.program,
                           "entry_point": self.entry_point}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TestSpec":
        d = json.loads(text)
        return cls(tuple(d.get("asserts", ())), d.get("setup", ""), d.get("program", ""), d.get("entry_point"))


@dataclass
class Verdict:
    verdict: str  # one of VERDICTS
    detail: str = ""  # the first failing assert, the error, the limit that was hit
    cpu_s: float | None = None  # CPU time of the program and its reaped children, as its runner measured it
    wall_s: float = 0.0
    output: str = ""  # the program's own output, at most sandbox.output_kb (for a reader, not a grade)

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    level: str  # one of LEVELS
    detail: str  # what the program gets (or, for none, what is missing)
    uid: int | None = None  # the uid programs run as when opsd runs as root

    def describe(self) -> str:
        return f"{self.level}: {self.detail}"


# --- what runs inside ------------------------------------------------------------------------
# The runner is the program's first code: it lowers its own rlimits (hard and soft: nothing inside
# can raise them again), then runs the code and the tests, and writes one line that starts with a
# nonce of this run. It shares the process with the code it runs, so a program written to forge
# its own verdict could; the boundary is what protects the machine, and a forged "passed" would
# still need the tests' own function to pass them or the nonce read out of this process.

_RUNNER = r'''
import os, resource, sys, types
_J = %(job)s
for _name, _soft, _hard in _J["rlimits"]:
    resource.setrlimit(getattr(resource, _name), (_soft, _hard))
_MAIN = os.getpid()
_OUT = os.fdopen(os.dup(1), "w")

def _report(verdict, detail=""):
    if os.getpid() != _MAIN:  # a child the program forked: only the program's own process reports
        os._exit(0)
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    _OUT.write("\n" + _J["nonce"] + repr({"verdict": verdict, "detail": detail[:2000], "cpu_s": cpu}) + "\n")
    _OUT.flush()
    os._exit(0)

def _where(exc, source, filename):
    import traceback
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename and frame.lineno:
            lines = source.splitlines()
            if 0 < frame.lineno <= len(lines):
                return lines[frame.lineno - 1].strip()
    return ""

def _error(exc):
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]

_mod = types.ModuleType("solution")
_mod.__file__ = "solution.py"
sys.modules["solution"] = _mod
_ns = _mod.__dict__
try:
    exec(compile(_J["code"], "solution.py", "exec"), _ns)
except MemoryError:
    _report("memory", "MemoryError while running the solution")
except SystemExit as exc:
    _report("error", f"the solution exited (SystemExit {exc.code!r}) before the tests ran")
except BaseException as exc:
    line = _where(exc, _J["code"], "solution.py")
    _report("error", _error(exc) + (f" at: {line}" if line else ""))
_checks = [("setup", _J["setup"])] if _J["setup"].strip() else []
_checks += [("assert", a) for a in _J["asserts"]]
if _J["program"].strip():
    _checks.append(("program", _J["program"]))
    if _J["entry_point"]:
        _checks.append(("check", "check(" + _J["entry_point"] + ")"))
_tests_src = _J["program"]
for _kind, _src in _checks:
    if _kind == "check" and "check" not in _ns:
        continue
    if _kind != "check":
        _tests_src = _src
    try:
        exec(compile(_src, "<check>" if _kind == "check" else "<tests>", "exec"), _ns)
    except MemoryError:
        _report("memory", "MemoryError while running the tests")
    except SystemExit as exc:
        _report("error", f"exited (SystemExit {exc.code!r}) before the tests finished")
    except AssertionError as exc:
        line = _src.strip() if _kind == "assert" else _where(exc, _tests_src, "<tests>")
        _report("failed", (line or _src.strip())[:1000] + (f" ({exc})" if str(exc) else ""))
    except BaseException as exc:
        if _kind == "setup":
            _report("error", "the tests' setup failed: " + _error(exc))
        line = _src.strip() if _kind == "assert" else _where(exc, _tests_src, "<tests>")
        _report("failed", _error(exc) + (f" in: {line}" if line else ""))
_report("passed")
'''

_SETTINGS = ("isolation", "workers", "cpu_s", "wall_s", "memory_mb", "processes", "open_files", "file_mb", "output_kb",
             "python", "bwrap", "uid")  # the fields of opsd.config.SandboxConfig
_SHARED: dict[tuple, "Sandbox"] = {}
_SHARED_LOCK = threading.Lock()


def shared(sc, log=None) -> "Sandbox":
    """This process's sandbox for the config's ``sandbox`` section (made, and its isolation said
    through ``log``, on first use); a SandboxError if the machine gives less than it asks."""
    key = tuple(getattr(sc, f) for f in _SETTINGS)
    with _SHARED_LOCK:
        if key not in _SHARED:
            box = Sandbox.from_config(sc)
            (log or _say)(f"opsd: model-written code runs in a sandbox, isolation {box.isolation.describe()} "
                          f"(required: sandbox.isolation={sc.isolation}; {box.workers} at a time)")
            _SHARED[key] = box
        return _SHARED[key]


def _say(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


_SIGNALS = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")}


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class _Cmd:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    cleanup: str | None = None  # a private directory to delete afterwards (level none)


def _bwrap_argv(bwrap: str, python: str, limits: Limits) -> list[str]:
    size = str(limits.file_mb * 2**20)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr"]
    for link, target in (("/lib", "usr/lib"), ("/lib64", "usr/lib64"), ("/bin", "usr/bin"), ("/sbin", "usr/sbin")):
        if os.path.islink(link):  # a merged-/usr system: the links are all it needs of /
            argv += ["--symlink", target, link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/sbx",
             "--chdir", "/sbx", "--clearenv"]
    for k, v in _env("/sbx").items():
        argv += ["--setenv", k, v]
    return argv + [python, "-S", "-s", "-B", "-"]


def _env(home: str) -> dict[str, str]:
    return {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}


def _drop(uid: int | None) -> dict:
    """Popen's arguments that run the child as ``uid`` (opsd as root), else nothing."""
    return dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}


_PROBES: dict[tuple, Isolation] = {}
_PROBE_LOCK = threading.Lock()


def probe(bwrap: str = "bwrap", python: str = "/usr/bin/python3", uid: int = 65534) -> Isolation:
    """The strongest isolation this process can give programs, found by starting one (bwrap's own
    check of user namespaces included); remembered per process."""
    key = (bwrap, python, uid, os.geteuid())
    with _PROBE_LOCK:
        if key not in _PROBES:
            _PROBES[key] = _probe(bwrap, python, uid)
        return _PROBES[key]


def _probe(bwrap: str, python: str, uid: int) -> Isolation:
    drop = uid if _is_root() else None
    who = f"as uid {uid} (opsd runs as root, which RLIMIT_NPROC would not hold)" if drop is not None else \
        f"as opsd's own uid {os.geteuid()}"
    if not os.access(python, os.X_OK):
        return Isolation("none", f"no interpreter at {python} (sandbox.python); no program can run", drop)
    found = shutil.which(bwrap)
    if found is None:
        return Isolation("none", f"bubblewrap not found ({bwrap!r} is not on PATH): programs run {who} under "
                         "rlimits only, and can read what that uid reads and reach the network; install "
                         "bubblewrap (apt-get install bubblewrap) for the bwrap level", drop)
    argv = _bwrap_argv(found, python, Limits())[:-1] + ["-c", "pass"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/", **_drop(drop))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Isolation("none", f"{found} did not start ({type(exc).__name__}: {exc}); programs run {who} under "
                         "rlimits only, with no boundary around files and network", drop)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return Isolation("none", f"{found} cannot make its namespaces here ({why[-1] if why else done.returncode}): "
                         "user namespaces are off (a pod without privileges, user.max_user_namespaces=0) or "
                         f"refused; programs run {who} under rlimits only, with no boundary around files and "
                         "network", drop)
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout.strip() or "bubblewrap"
    return Isolation("bwrap", f"{version}: own user, PID, network, mount, IPC, UTS and cgroup namespaces, /usr "
                     f"read-only, private tmpfs working directory, {python} with the standard library only; "
                     f"programs run {who}", drop)


class Sandbox:
    """Runs programs with their tests, ``workers`` at a time; refuses to exist with less isolation
    than ``require`` (the config key ``key`` names it in the error)."""

    def __init__(self, limits: Limits = Limits(), *, require: str = "bwrap", workers: int = 2,
                 python: str = "/usr/bin/python3", bwrap: str = "bwrap", uid: int = 65534,
                 key: str = "sandbox.isolation"):
        if require not in LEVELS:
            raise SandboxError(f"config key '{key}' = {require!r}; expected one of {list(LEVELS)}")
        if workers < 1:
            raise SandboxError(f"config key 'sandbox.workers' = {workers}; expected at least 1")
        self.limits = limits
        self.python = python
        self.workers = workers
        self.isolation = probe(bwrap, python, uid)
        if "no interpreter" in self.isolation.detail:
            raise SandboxError(f"config key 'sandbox.python' = {python!r}: {self.isolation.detail}")
        if LEVELS.index(self.isolation.level) < LEVELS.index(require):
            raise SandboxError(
                f"config key '{key}' = {require!r}, but this machine gives programs isolation "
                f"{self.isolation.describe()}. Install bubblewrap and allow user namespaces, or accept less "
                f"with {key}=none (model-written code could then read the run's files and reach the network)")
        self.bwrap = shutil.which(bwrap) if self.isolation.level == "bwrap" else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opsd-sandbox")

    @classmethod
    def from_config(cls, sc) -> "Sandbox":
        """From the config's ``sandbox`` section (opsd.config.SandboxConfig)."""
        limits = Limits(cpu_s=sc.cpu_s, wall_s=sc.wall_s, memory_mb=sc.memory_mb, processes=sc.processes,
                        open_files=sc.open_files, file_mb=sc.file_mb, output_kb=sc.output_kb)
        return cls(limits, require=sc.isolation, workers=sc.workers, python=sc.python, bwrap=sc.bwrap, uid=sc.uid)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run_many(self, jobs: Sequence[tuple[str | None, TestSpec]]) -> list[Verdict]:
        """Each (code, tests) graded, ``workers`` at a time, in the order given."""
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def run(self, code: str | None, tests: TestSpec) -> Verdict:
        """One program: ``code`` (None: the response had no code) with ``tests``, in a sandbox."""
        if code is None:
            return Verdict("error", "no fenced Python code block in the response")
        nonce = "@@opsd-" + secrets.token_hex(16) + "@@"
        lim = self.limits
        cpu = max(1, int(lim.cpu_s + 0.999))
        rlimits = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", lim.memory_mb * 2**20, lim.memory_mb * 2**20),
                   ("RLIMIT_NPROC", lim.processes, lim.processes), ("RLIMIT_NOFILE", lim.open_files, lim.open_files),
                   ("RLIMIT_FSIZE", lim.file_mb * 2**20, lim.file_mb * 2**20), ("RLIMIT_CORE", 0, 0)]
        if self.bwrap is None and self.isolation.uid is None:
            # no user namespace of its own: RLIMIT_NPROC would count every process of opsd's uid
            rlimits = [r for r in rlimits if r[0] != "RLIMIT_NPROC"]
        job = {"rlimits": rlimits, "nonce": nonce, "code": code, "asserts": list(tests.asserts), "setup": tests.setup,
               "program": tests.program, "entry_point": tests.entry_point}
        runner = (_RUNNER % {"job": repr(job)}).encode()  # a literal: the runner imports no json
        cmd = self._command()
        try:
            return self._execute(cmd, runner, nonce)
        finally:
            if cmd.cleanup:
                shutil.rmtree(cmd.cleanup, ignore_errors=True)

    def _command(self) -> _Cmd:
        uid = self.isolation.uid
        if self.bwrap is not None:
            return _Cmd(_bwrap_argv(self.bwrap, self.python, self.limits))
        # level none: an empty private directory, the same interpreter flags and environment
        work = tempfile.mkdtemp(prefix="opsd-sbx-")
        if uid is not None:
            os.chown(work, uid, uid)
        return _Cmd([self.python, "-S", "-s", "-B", "-"], _env(work), work, work)

    def _execute(self, cmd: _Cmd, runner: bytes, nonce: str) -> Verdict:
        lim = self.limits
        stdin = os.memfd_create("opsd-sandbox-runner")
        try:
            os.write(stdin, runner)
            os.lseek(stdin, 0, os.SEEK_SET)
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=cmd.cwd, env=cmd.env, start_new_session=True, close_fds=True,
                                    **_drop(self.isolation.uid))
        finally:
            os.close(stdin)
        out = bytearray()
        why = ""  # the parent's reason to kill: "wall" or "output"
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = t0 + lim.wall_s
        try:
            while True:  # read until the pipe closes (every holder gone), the cap, or the deadline
                ready, _, _ = select.select([fd], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    out += chunk
                    if len(out) > lim.output_bytes:
                        why = "output"
                        break
                if time.monotonic() > deadline:
                    why = "wall"
                    break
            if not why and not _exited(proc, deadline):
                why = "wall"
        finally:
            # The whole group, before its leader is reaped (its id cannot be reused until then):
            # bwrap's namespace dies with it (--die-with-parent, then its PID 1); at level none,
            # whatever stayed in the program's process group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(proc.pid, 0)
            proc.returncode = 0  # reaped here: Popen must not wait for it again
            proc.stdout.close()
        wall = time.monotonic() - t0
        text = out[: lim.output_bytes].decode(errors="replace")
        shown, found = _split_report(text, nonce)
        if why == "output":
            return Verdict("killed", f"more than {lim.output_kb} KiB of output (sandbox.output_kb)", None, wall, shown)
        if why == "wall":
            return Verdict("timeout", f"still running after {lim.wall_s:g} s of wall-clock time (sandbox.wall_s)",
                           None, wall, shown)
        if found is not None:
            return Verdict(found["verdict"], found["detail"], found.get("cpu_s"), wall, shown)
        return Verdict(*_from_status(status, lim, self.bwrap is not None), None, wall, shown)


def _exited(proc: subprocess.Popen, deadline: float) -> bool:
    """Whether ``proc`` ended by ``deadline``; it is left unreaped (WNOWAIT)."""
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _split_report(text: str, nonce: str) -> tuple[str, dict | None]:
    """The program's own output, and the runner's report (None when it never wrote one)."""
    at = text.rfind(nonce)
    if at < 0:
        return text, None
    line = text[at + len(nonce):].split("\n", 1)[0]
    try:
        report = ast.literal_eval(line)  # a literal only: nothing in it is run
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text, None
    if not isinstance(report, dict) or report.get("verdict") not in VERDICTS or not isinstance(report.get("detail"), str):
        return text, None
    return text[:at].rstrip("\n"), report


def _from_status(status: int, lim: Limits, bwrap: bool) -> tuple[str, str]:
    """A verdict from how the program ended when its runner wrote none."""
    sig = None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    elif os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if bwrap and code > 128:  # bwrap exits with 128 + the signal that ended the program
            sig = code - 128
        elif code != 0:
            return "error", f"exited with status {code} before the tests finished"
        else:
            return "error", "exited before the tests finished"
    name = _SIGNALS.get(sig, f"signal {sig}")
    if sig == signal.SIGXCPU:
        return "timeout", f"used its {lim.cpu_s:g} s of CPU time (sandbox.cpu_s)"
    if sig == signal.SIGKILL:  # bwrap's status does not say who sent it, nor the CPU it had used
        return "killed", ("ended by SIGKILL: a kill, or the CPU time's hard limit (sandbox.cpu_s + 1 s) after it "
                          "ignored SIGXCPU")
    if sig == signal.SIGXFSZ:
        return "killed", f"wrote a file larger than {lim.file_mb} MiB (sandbox.file_mb)"
    return "killed", f"ended by {name}"
