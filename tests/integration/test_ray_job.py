"""`ray job submit` against a real Ray head, as on a cluster (README, "On a GPU cluster").

The test starts its own head with `ray start --head --block` on loopback, on ports of its own and
in a temp dir of its own, so that it neither joins nor disturbs another local cluster (another
test's `ray.init()` reads the default temp dir, never this one). It submits
`opsd train` with the repository as working dir and launch/runtime_env.yaml, waits for the job, and
checks the run directory. The head is stopped through its own process handle: `ray stop` would
stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from opsd.launch.checkpoints import latest_checkpoint
from opsd.config import REPO_ROOT

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT = 120
JOB_TIMEOUT = 600
STEPS = 2
TOKEN = secrets.token_hex(32)


def api_get(address: str, path: str, token: str | None = TOKEN) -> dict:
    """GET a dashboard REST path, with the cluster's token as the `ray` CLI sends it."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with urllib.request.urlopen(urllib.request.Request(f"{address}{path}", headers=headers), timeout=30) as r:
        return json.load(r)


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked (one at a time, the
    kernel may hand the same ephemeral port out twice, and Ray refuses two components on one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ports_free(lo: int, hi: int) -> bool:
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def worker_port_range(width: int = 64, avoid: frozenset[int] = frozenset()) -> tuple[int, int]:
    """A range of free ports away from Ray's default worker range (10002-19999) and from ``avoid``."""
    for _ in range(50):
        lo = random.randrange(30000, 45000)
        if ports_free(lo, lo + width - 1) and not any(lo <= p < lo + width for p in avoid):
            return lo, lo + width - 1
    raise RuntimeError("no free range of worker ports found")


def ray_exe() -> str:
    exe = VENV_BIN / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


def job_env() -> dict:
    """The environment of the head, which its job drivers inherit: the project's venv first on PATH
    (the `opsd` console script), the locally built tiny model (artifacts/ is not uploaded), and
    nothing that would point Ray at another cluster."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OPSD_TINY_DIR"] = str(REPO_ROOT / "artifacts" / "tiny-qwen3")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray replaces --node-ip-address 127.0.0.1 with the machine's outward address unless it is
    # told that the cluster is single-node; this keeps GCS, raylet, workers and the job's driver
    # (which inherits this environment) on loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Token authentication on, as the README tells a cluster user to run it (and as KubeRay's
    # authOptions does it): the mode and the token in the environment of the head, of the
    # submitting CLI and so of the job's driver. The token is this test's own, not the one a
    # local cluster may have left in ~/.ray/auth_token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = TOKEN
    # On SIGTERM `ray start --block` first drains the node for up to 30 s (for Serve); nothing
    # here needs that.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    for var in ("RAY_ADDRESS", "RAY_TMPDIR"):
        env.pop(var, None)
    return env


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"<{path}: {exc}>"


def head_logs(temp_dir: Path) -> str:
    """The ends of the head's dashboard and job logs, for a failure message."""
    logs = sorted((temp_dir / "session_latest" / "logs").glob("*"))
    wanted = [p for p in logs if p.name.startswith(("dashboard.", "dashboard_JobHead", "job-driver-"))]
    return "\n".join(f"--- {p.name}\n{tail(p, 1500)}" for p in wanted if p.is_file())


class RayHead:
    """A Ray head in its own process group, owned by this test."""

    def __init__(self, temp_dir: Path, log: Path):
        self.temp_dir = temp_dir
        self.log = log
        picked = free_ports(9)
        ports = iter(picked)
        self.dashboard_port = next(ports)
        lo, hi = worker_port_range(avoid=frozenset(picked))
        cmd = [
            ray_exe(), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(next(ports)),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--dashboard-agent-listen-port", str(next(ports)), "--dashboard-agent-grpc-port", str(next(ports)),
            "--runtime-env-agent-port", str(next(ports)), "--metrics-export-port", str(next(ports)),
            "--ray-client-server-port", str(next(ports)),
            "--node-manager-port", str(next(ports)), "--object-manager-port", str(next(ports)),
            "--min-worker-port", str(lo), "--max-worker-port", str(hi),
            "--num-cpus", "2", "--object-store-memory", str(512 * 2**20),
            "--temp-dir", str(temp_dir),
        ]
        self.out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=job_env(), stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float) -> None:
        """Until the dashboard's HTTP server answers (any status: the cluster may require a
        token, which the `ray` CLI finds by itself), then until `ray job list` works."""
        deadline = time.monotonic() + timeout
        http_up = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited with {self.proc.returncode}:\n{tail(self.log)}")
            if not http_up:
                try:
                    with urllib.request.urlopen(f"{self.address}/api/version", timeout=5):
                        http_up = True
                except urllib.error.HTTPError:
                    http_up = True
                except OSError:
                    pass
            if http_up:
                try:
                    if ray_cli("job", "list", "--address", self.address, timeout=60).returncode == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(1.0)
        raise AssertionError(f"Ray jobs API at {self.address} not ready in {timeout} s (http up: {http_up}):\n"
                             f"{tail(self.log)}\n{head_logs(self.temp_dir)}")

    def stop(self) -> None:
        """SIGTERM to `ray start --block`, which then stops the processes it started; SIGKILL to
        its process group if it does not exit, and to any of its descendants still alive."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:  # e.g. a job driver, which runs in a session of its own
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.out.close()


def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = job_env()
    return subprocess.run([ray_exe(), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_head(tiny_model):
    # Short and private: Ray's unix sockets live under it (path length limit ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="opsdrj-", dir="/tmp"))
    head = RayHead(temp_dir, temp_dir / "ray-start.log")
    try:
        head.wait_ready(HEAD_START_TIMEOUT)
        yield head
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_ray_job_submit_trains(ray_head, tmp_path):
    run_dir = (tmp_path / "run").resolve()
    job_id = f"opsd-test-{os.getpid()}-{int(time.time())}"
    address = ray_head.address
    submit = [
        "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env", "launch/runtime_env.yaml",
        "--submission-id", job_id, "--",
        "opsd", "train", "configs/tiny.yaml", f"run_dir={run_dir}", f"train.steps={STEPS}", "eval.every=0",
        # Smaller steps than the default run: this test is about the submission path.
        "train.prompts_per_step=4", "rollout.max_tokens=32", "logging.progress=false", "logging.tensorboard=false",
    ]

    def diagnose(what: str) -> str:
        try:
            logs = ray_cli("job", "logs", "--address", address, job_id, timeout=60).stdout
        except subprocess.TimeoutExpired:
            logs = "<ray job logs timed out>"
        return f"{what}\n--- job logs (end)\n{logs[-6000:]}\n--- head\n{head_logs(ray_head.temp_dir)[-6000:]}"

    try:
        proc = ray_cli(*submit, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        ray_cli("job", "stop", "--address", address, job_id, timeout=60)
        pytest.fail(diagnose(f"`ray job submit` did not finish in {JOB_TIMEOUT} s: {exc}"))
    assert proc.returncode == 0, diagnose(f"ray job submit exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                                          f"{proc.stderr[-4000:]}")

    status = ray_cli("job", "status", "--address", address, job_id, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout)
    assert "succeeded" in text.lower(), diagnose(f"job status:\n{text}\n{status.stderr}")
    info = api_get(address, f"/api/jobs/{job_id}")
    assert info["status"] == "SUCCEEDED", diagnose(f"job info: {info}")
    # The cluster runs with token authentication: a request without the token is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_get(address, f"/api/jobs/{job_id}", token=None)
    assert refused.value.code in (401, 403), refused.value

    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints" / f"step_{STEPS}"
    assert (ckpt / "driver_state.json").is_file(), f"no complete checkpoint in {sorted(run_dir.rglob('*'))[:40]}"
    assert (ckpt / "hf" / "config.json").is_file()
    # The driver's own output came back through the job's log stream.
    assert f"run directory: {run_dir}" in proc.stdout

    # `ray job stop` on a resumed run: the driver gets SIGTERM, finishes its step and checkpoints
    # within the RAY_JOB_STOP_WAIT_TIME_S that launch/runtime_env.yaml gives it (Ray's default of
    # 3 s would SIGKILL it first).
    resume_id = f"{job_id}-resume"
    # Far more steps than could ever finish before the stop reaches the driver: with 20 more, a
    # fast machine finished them all while `ray job stop` was starting, and nothing was stopped.
    more = STEPS + 10_000
    proc = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
                   "launch/runtime_env.yaml", "--submission-id", resume_id, "--no-wait", "--",
                   "opsd", "train", "--resume", str(run_dir), f"train.steps={more}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    deadline = time.monotonic() + JOB_TIMEOUT
    while len((run_dir / "metrics.jsonl").read_text().splitlines()) <= STEPS:
        assert time.monotonic() < deadline, diagnose("the resumed job trained no step")
        time.sleep(1)
    stop = ray_cli("job", "stop", "--address", address, resume_id, timeout=600)
    assert stop.returncode == 0, stop.stderr[-4000:]
    logs = re.sub(r"\x1b\[[0-9;]*m", "", ray_cli("job", "logs", "--address", address, resume_id, timeout=60).stdout)
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {more}; checkpoint (\S+);", logs)
    assert stopped, diagnose(f"no graceful stop in the job's log:\n{logs[-4000:]}")
    step = int(stopped.group(1))
    assert step > STEPS and Path(stopped.group(2)) == run_dir / "checkpoints" / f"step_{step}"
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{step}"  # verified by its manifest
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    assert api_get(address, f"/api/jobs/{resume_id}")["status"] == "STOPPED"
