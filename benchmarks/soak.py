"""``opsd bench soak``: a long run watched for what grows.

It runs ``opsd train`` (by default configs/tiny.yaml for 1,000 steps, in-place weight pushes on one
host, a checkpoint every 100 steps, the newest 2 kept) and every ``sample_every`` steps records,
for the driver, each rollout worker, scorer and learner rank: its resident memory, the shared
memory part of it, and its open file descriptors; for the rest of the local Ray cluster (GCS,
raylet, dashboard agent: the processes of the cluster's session that are not actors) their summed
resident memory; the machine's shared memory (/proc/meminfo: torch's and Ray's segments are
unlinked, so /dev/shm alone lists none of them) and the bytes and files in /dev/shm; and the run
directory's size. The report gives each series at the end of
warm-up, at the end, and its least-squares growth per 1,000 steps after warm-up, and draws them
(soak.png). Processes on another host than the driver are not sampled.

Figures and the machine go to docs/BENCHMARKS.md ("Soak").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

DEFAULTS = ("train.checkpoint_every=100", "train.keep_checkpoints=2", "eval.every=0", "logging.tensorboard=false")


def _pid_and_node(_actor: Any) -> tuple[int, str]:
    import ray

    return os.getpid(), ray.get_runtime_context().get_node_id()


def readable_pids(where: list[tuple[int, str]], here: str) -> list[int | None]:
    """The pids of processes on the driver's Ray node ``here``, None for the others: a pid of
    another host (a PID namespace of its own) names another process, or none, in this /proc."""
    return [pid if node == here else None for pid, node in where]


def _kib_field(path: str, field: str) -> float | None:
    """A ``Field:  N kB`` line of a /proc file, in MiB; None when it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of ``pid`` in MiB; None when it cannot be read (gone, another host)."""
    return _kib_field(f"/proc/{pid}/status", "VmRSS")


def proc_shmem_mb(pid: int) -> float | None:
    """The part of ``pid``'s resident memory that is shared memory (RssShmem: Ray's object store
    mapping, the learner's weights shared for in-place pushes)."""
    return _kib_field(f"/proc/{pid}/status", "RssShmem")


def proc_name(pid: int) -> str:
    """A process's name as ps shows it (Ray names its workers ``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        first = argv[0].decode(errors="replace")
        if first.startswith("ray::") or "/" not in first:
            return first.split()[0] if first else "?"
        if b"-m" in argv[1:]:  # python -m module
            return argv[argv.index(b"-m", 1) + 1].decode(errors="replace")
        # a script or binary by path: its base name
        script = next((a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")), first)
        return os.path.basename(script)
    except OSError:
        return "?"


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def dir_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, by the blocks they take (a sparse file counts what it uses)."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed meanwhile
            total += st.st_blocks * 512
            files += 1
    return total, files


def sample(trainer: Any, step: int, cluster_session: int | None) -> dict:
    """One row of the soak's series (see the module docstring)."""
    import ray

    from opsd.launch.localhead import session_members

    actors = trainer.actors
    roles = {"rollout": actors.rollouts.actors, "learner": actors.learner.ranks}
    if actors.scorers is not None:
        roles["scorer"] = actors.scorers.actors
    here = ray.get_runtime_context().get_node_id()
    pids = {role: readable_pids(ray.get([a.__ray_call__.remote(_pid_and_node) for a in handles]), here)
            for role, handles in roles.items()}
    pids["driver"] = [os.getpid()]
    row: dict = {"step": step, "time": time.time()}
    for role, ps in pids.items():
        for i, pid in enumerate(ps):
            on_this_host = pid is not None
            row[f"rss_mb/{role}{i}"] = proc_rss_mb(pid) if on_this_host else None
            row[f"shmem_mb/{role}{i}"] = proc_shmem_mb(pid) if on_this_host else None
            row[f"fds/{role}{i}"] = proc_fds(pid) if on_this_host else None
    if cluster_session is not None:
        actor_pids = {p for ps in pids.values() for p in ps if p is not None}
        others = [p for p in session_members(cluster_session) if p not in actor_pids]
        row["rss_mb/ray_daemons"] = sum(proc_rss_mb(p) or 0.0 for p in others)
        row["processes/ray_daemons"] = len(others)
        for p in others:  # and each by name (gcs_server, raylet, the dashboard agent, idle workers...)
            key = f"daemon_rss_mb/{proc_name(p)}"
            row[key] = row.get(key, 0.0) + (proc_rss_mb(p) or 0.0)
    shm_bytes, row["shm_files"] = dir_usage(Path("/dev/shm"))
    row["shm_mb"] = shm_bytes / 2**20
    # All shared memory of the machine (tmpfs, /dev/shm, memfd and unlinked segments, which
    # /dev/shm does not list): other processes' too.
    row["machine_shmem_mb"] = _kib_field("/proc/meminfo", "Shmem")
    run_bytes, row["run_dir_files"] = dir_usage(trainer.run.path)
    row["run_dir_mb"] = run_bytes / 2**20
    row["checkpoints"] = len(list(trainer.run.checkpoints.glob("step_*")))
    row["restarts"] = actors.rollouts.restarts + (actors.scorers.restarts if actors.scorers else 0)
    return row


def growth(samples: list[dict], key: str, warmup_step: int) -> dict | None:
    """The series ``key`` at the end of warm-up and at the end, and its least-squares slope per
    1,000 steps over the samples after warm-up."""
    pts = [(r["step"], r[key]) for r in samples if r.get(key) is not None and r["step"] >= warmup_step]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    first = next((r[key] for r in samples if r.get(key) is not None), None)
    return {"first": first, "after_warmup": pts[0][1], "end": pts[-1][1], "max": max(y for _, y in pts),
            "per_1000_steps": slope * 1000}


def plot(samples: list[dict], path: Path, warmup_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("resident memory (MiB)", "rss_mb/"), ("of it shared memory (MiB)", "shmem_mb/"),
              ("open file descriptors", "fds/"), ("machine's shared memory, /dev/shm (MiB)", ("machine_shmem_mb", "shm_mb")),
              ("run directory (MiB)", "run_dir_mb"), ("checkpoints kept", "checkpoints")]
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    steps = [r["step"] for r in samples]
    for ax, (title, prefix) in zip(axes.flat, groups):
        for key in sorted({k for r in samples for k in r if k.startswith(prefix)}):  # prefix: a str or a tuple
            ax.plot(steps, [r.get(key) for r in samples], label=key.split("/")[-1] if "/" in key else key)
        ax.axvline(warmup_step, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_soak(config: str, overrides: list[str], *, steps: int, sample_every: int, out_dir: Path,
               warmup_steps: int | None = None, out: Callable[[str], None] = print) -> dict:
    import opsd.launch.driver as driver
    from opsd.launch.cluster import local_cluster_session

    warmup = warmup_steps if warmup_steps is not None else max(sample_every, steps // 10)
    samples: list[dict] = []
    in_place: list[bool] = []

    class Watched(driver.Trainer):
        def train_one_step(self, step: int) -> dict:
            row = super().train_one_step(step)
            in_place.append(bool(row.get("sync_in_place")))
            if step == 1 or step % sample_every == 0 or step == self.cfg.train.steps:
                samples.append(sample(self, step, local_cluster_session()))
                s = samples[-1]
                out(f"soak: step {step}: learner0 {s.get('rss_mb/learner0') or 0:.0f} MiB, rollout0 "
                    f"{s.get('rss_mb/rollout0') or 0:.0f} MiB, driver {s['rss_mb/driver0'] or 0:.0f} MiB, "
                    f"/dev/shm {s['shm_mb']:.0f} MiB, run dir {s['run_dir_mb']:.0f} MiB")
            return row

    plain, driver.Trainer = driver.Trainer, Watched
    t0 = time.perf_counter()
    try:
        run_dir = driver.train(config, [*DEFAULTS, f"train.steps={steps}", *overrides])
    finally:
        driver.Trainer = plain
    wall = time.perf_counter() - t0
    keys = sorted({k for r in samples for k in r} - {"step", "time"})
    report = {"config": config, "overrides": [*DEFAULTS, f"train.steps={steps}", *overrides], "run_dir": str(run_dir),
              "steps": len(in_place), "wall_seconds": wall, "warmup_step": warmup, "sample_every": sample_every,
              "in_place_pushes": sum(in_place), "growth": {k: growth(samples, k, warmup) for k in keys},
              "samples": samples}
    from opsd.benchmarks.machine import machine

    report["machine"] = machine()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1))
    plot(samples, out_dir / "soak.png", warmup)
    out(f"bench soak: {report['steps']} steps in {wall / 60:.1f} min, {report['in_place_pushes']} pushes in place; "
        f"after step {warmup} (warm-up):")
    out(f"  {'series':24s} {'first':>9s} {'warm':>9s} {'end':>9s} {'max':>9s} {'per 1k steps':>13s}")
    for key, g in report["growth"].items():
        if g is not None:
            out(f"  {key:24s} {g['first']:9.1f} {g['after_warmup']:9.1f} {g['end']:9.1f} {g['max']:9.1f} "
                f"{g['per_1000_steps']:+13.2f}")
    out(f"  figures: {out_dir / 'soak.json'}, {out_dir / 'soak.png'}")
    return report
