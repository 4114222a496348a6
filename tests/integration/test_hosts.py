"""Hosts with addresses of their own: every Ray node in its own network namespace (an address on a
bridge, as a machine on a LAN) and its own PID namespace, the driver in the head's.

The layout (made by this test, as root; it skips, saying why, where namespaces cannot be made):

    bridge ob<id>  (no address of its own; the hosts reach each other through it)
    ├── head     10.<a>.<b>.10  ray head, 0 CPUs; the driver (tests/integration/netns_run.py) joins it
    ├── learner  10.<a>.<b>.11  1 CPU, resource opsd_learner: the learner ranks
    ├── actors   10.<a>.<b>.12  2 CPUs, resource opsd_actors: the rollout worker and the scorer
    └── (spares) 10.<a>.<b>.13, .14: the replacements of a killed host

A whole host is killed the way a machine dies: SIGKILL to the init process of its PID namespace
takes every process in it at once, then its network namespace goes away. Token authentication is
on for every node and the driver.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from opsd.config import REPO_ROOT

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
HOST_START_TIMEOUT_S = 180
# A host whose `ray start` gave up on Ray's own fixed wait for its raylet to register is started
# again, this many times in all (only for that failure).
HOST_START_ATTEMPTS = 3
RAY_REGISTRATION_TIMEOUT = "The current node timed out during startup"
RUN_TIMEOUT_S = 1500
# pytest's own limit (pyproject: 900 s a test) must not end a run before RUN_TIMEOUT_S does: that
# kills the driver without its log. Three hosts' start and stop come on top of the run.
TEST_TIMEOUT_S = RUN_TIMEOUT_S + 900
RESOURCES = {"learner": (1, {"opsd_learner": 2.0}), "actors": (2, {"opsd_actors": 2.0})}


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make the hosts, or None."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"opsdp{secrets.token_hex(2)}"
    try:
        made = run("ip", "link", "add", probe, "type", "bridge", check=False)
        if made.returncode != 0:
            return f"cannot make a bridge: {made.stderr.strip()}"
        run("ip", "link", "del", probe, check=False)
        ns = run("unshare", "--net", "--pid", "--fork", "--mount-proc", "true", check=False)
        if ns.returncode != 0:
            return f"cannot make network and PID namespaces: {ns.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make namespaces: {exc}"
    return None


class Hosts:
    """The bridge, the namespaces and the Ray nodes in them; ``close()`` removes everything."""

    def __init__(self, work: Path):
        self.work = work
        self.id = secrets.token_hex(2)
        self.bridge = f"ob{self.id}"
        self.net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.token = secrets.token_hex(32)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ips: dict[str, str] = {}
        self.namespaces: list[str] = []
        self.next_ip = 10
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "link", "set", self.bridge, "up")

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   OPSD_TINY_DIR=str(REPO_ROOT / "artifacts" / "tiny-qwen3"), PYTHONUNBUFFERED="1")
        return env

    def _namespace(self, name: str) -> str:
        ns, veth = f"o{self.id}{name}", f"ov{self.id}{len(self.namespaces)}"
        ip = f"{self.net}.{self.next_ip}"
        self.next_ip += 1
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        self.ips[name] = ip
        return ns

    def start(self, name: str, role: str) -> None:
        """A host called ``name``: the head, or a worker node with ``role``'s CPUs and resources."""
        ns = self._namespace(name)
        ip = self.ips[name]
        temp = Path(tempfile.mkdtemp(prefix=f"r{name[:2]}", dir=self.work))  # short: Ray's socket paths
        ray = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", ip,
               "--temp-dir", str(temp), "--object-store-memory", str(150 * 2**20)]
        if role == "head":
            ray += ["--head", "--port", "6379", "--num-cpus", "0", "--include-dashboard", "false"]
        else:
            cpus, resources = RESOURCES[role]
            ray += ["--address", f"{self.ips['head']}:6379", "--num-cpus", str(cpus),
                    "--resources", json.dumps(resources)]
        for attempt in range(1, HOST_START_ATTEMPTS + 1):
            log = open(self.work / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *ray],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
            log.close()
            deadline = time.monotonic() + HOST_START_TIMEOUT_S
            while "Ray runtime started" not in (self.work / f"{name}.log").read_text(errors="replace"):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            else:
                return
            # `ray start` gives a raylet a fixed 30 s to register with the GCS (ray/_private/node.py,
            # raylet_start_wait_time_s); on a loaded machine (load average ~35 seen) that can run out:
            # the start failed and exited, the host did not. Start it again; any other failure is the test's.
            text = self.log(name)
            if self.procs[name].poll() is None or RAY_REGISTRATION_TIMEOUT not in text or attempt == HOST_START_ATTEMPTS:
                raise AssertionError(f"host {name} did not start (attempt {attempt}):\n{text}")
            (self.work / f"{name}.log").rename(self.work / f"{name}.attempt{attempt}.log")
            print(f"host {name}: Ray's node registration timed out (attempt {attempt}); starting it again")

    def init_pid(self, name: str) -> int:
        """The PID (here) of the init process of ``name``'s PID namespace: unshare's child."""
        pid = self.procs[name].pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, f"host {name}: unshare has no child"
        return int(children[0])

    def kill(self, name: str) -> None:
        """The whole host at once: every process of its PID namespace, then its network."""
        os.kill(self.init_pid(name), signal.SIGKILL)
        self.procs[name].wait(timeout=60)

    def driver(self, *argv: str, log: Path) -> subprocess.Popen:
        """``argv`` in the head's network, PID and mount namespaces (the mount one for its /proc)."""
        with open(log, "w") as out:
            return subprocess.Popen(["nsenter", "--target", str(self.init_pid("head")), "--net", "--pid", "--mount",
                                     "--wd=" + str(REPO_ROOT), *argv], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=60)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.bridge, check=False)


@pytest.fixture
def hosts(tiny_model, tmp_path_factory):
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"no hosts of their own here: {why}")
    # Short: Ray's unix socket paths must stay under ~107 bytes.
    work = Path(tempfile.mkdtemp(prefix="opsdh-", dir="/tmp"))
    made = Hosts(work)
    try:
        made.start("head", "head")
        made.start("learner", "learner")
        made.start("actors", "actors")
        yield made
    finally:
        made.close()
        shutil.rmtree(work, ignore_errors=True)


def train(hosts: Hosts, mode: str) -> tuple[dict, str]:
    """The run of tests/integration/netns_run.py, answering its requests to kill and replace hosts."""
    out = hosts.work / "out.json"
    log = hosts.work / "driver.log"
    proc = hosts.driver(sys.executable, "-m", "tests.integration.netns_run", str(out), str(hosts.work),
                        hosts.ips["head"], mode, log=log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    answered: set[Path] = set()
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"the run did not end in {RUN_TIMEOUT_S} s:\n{log.read_text()[-6000:]}"
            for request in sorted(set(hosts.work.glob("ask-*")) - answered):
                action, role = request.read_text().split()
                assert action == "replace"
                hosts.kill(role)
                hosts.start(f"{role}2", role)
                (hosts.work / request.name.replace("ask-", "done-")).write_text("")
                answered.add(request)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"the run failed ({proc.returncode}):\n{text[-8000:]}"
    return json.loads(out.read_text()), text


def ips_of(result: dict, step: int) -> dict:
    where = result["placement"][str(step)]
    ip = result["node_ips"]
    return {role: sorted({ip[n] for n in where[role]}) for role in ("learner", "rollout", "scorer")}


def assert_every_push_through_the_store(result: dict, steps: int) -> None:
    rows = [m for m in result["metrics"] if m["step"] > 0]
    assert [m["step"] for m in rows] == list(range(1, steps + 1))
    assert [m["policy_version"] for m in rows] == list(range(1, steps + 1))
    # Learner and receivers on different hosts: the in-place push is refused, every push is a copy.
    assert not any(m["sync_in_place"] for m in rows)
    # One pass over the data in an uninterrupted run's order.
    assert [[sid.rsplit("#", 1)[0] for sid in m["sample_ids"]] for m in rows] == result["expected_uids"]


# Slow (`make test-slow`): three Ray nodes and their replacements on 2 cores.
@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_hosts_of_their_own_train_and_survive_losing_each_host(hosts):
    result, log = train(hosts, "store-loss")
    ip = hosts.ips
    assert result["asked"] == ["replace actors", "replace learner"]
    for step in (1, 2):
        assert ips_of(result, step) == {"learner": [ip["learner"]], "rollout": [ip["actors"]], "scorer": [ip["actors"]]}
    # The actor host died as step 3 began: rollout worker and scorer came back on its replacement.
    for step in (3, 4):
        assert ips_of(result, step) == {"learner": [ip["learner"]], "rollout": [ip["actors2"]],
                                        "scorer": [ip["actors2"]]}
    # Each death announced once, whichever call saw it, though the new process on a fresh PID
    # namespace may have the old one's pid (issue 41).
    for role in ("rollout", "scorer"):
        assert log.count(f"opsd: warning: {role} 0 died") == 1, log[-6000:]
    # The learner host died as step 5 began: a new group on its replacement, from the step-4 checkpoint.
    for step in (5, 6):
        assert ips_of(result, step) == {"learner": [ip["learner2"]], "rollout": [ip["actors2"]],
                                        "scorer": [ip["actors2"]]}
    assert "restarting the learner group from" in log and "step_4" in log
    assert_every_push_through_the_store(result, 6)
    assert result["checkpoints"] == ["step_2", "step_4", "step_6"]


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_gloo_pushes_between_hosts_of_their_own(hosts):
    result, log = train(hosts, "gloo")
    ip = hosts.ips
    for step in (1, 2, 3):
        assert ips_of(result, step) == {"learner": [ip["learner"]], "rollout": [ip["actors"]], "scorer": [ip["actors"]]}
    rows = [m for m in result["metrics"] if m["step"] > 0]
    assert [m["policy_version"] for m in rows] == [1, 2, 3] and not any(m["sync_in_place"] for m in rows)
    assert [[sid.rsplit("#", 1)[0] for sid in m["sample_ids"]] for m in rows] == result["expected_uids"]
