"""benchmarks/soak.py: the growth figures and the /proc readings behind `opsd bench soak`."""

from __future__ import annotations

import os

import numpy as np
import pytest

from opsd.benchmarks.soak import dir_usage, growth, proc_fds, proc_rss_mb, proc_shmem_mb, readable_pids


def test_growth_is_the_least_squares_slope_after_warmup():
    rng = np.random.default_rng(0)
    steps = list(range(0, 1001, 25))
    values = [500 + (0.0 if s < 100 else 0.03 * s) + rng.normal(0, 2) for s in steps]
    samples = [{"step": s, "rss": v} for s, v in zip(steps, values)]
    samples[3]["rss"] = None  # a process that could not be read is left out
    g = growth(samples, "rss", 100)
    kept = [(s, v) for s, v in zip(steps, values) if s >= 100]
    slope = np.polyfit([s for s, _ in kept], [v for _, v in kept], 1)[0]
    assert g["per_1000_steps"] == pytest.approx(slope * 1000, rel=1e-9)
    assert g["first"] == values[0] and g["after_warmup"] == kept[0][1] and g["end"] == values[-1]
    assert g["max"] == max(v for _, v in kept)
    assert growth(samples[:1], "rss", 0) is None


def test_proc_readings_of_this_process(tmp_path):
    rss, shmem, fds = proc_rss_mb(os.getpid()), proc_shmem_mb(os.getpid()), proc_fds(os.getpid())
    assert rss > 10 and 0 <= shmem <= rss and fds >= 3
    with open(tmp_path / "x", "w"):
        assert proc_fds(os.getpid()) == fds + 1
    assert proc_rss_mb(2**22 + 7) is None  # no such process (above the largest pid_max)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 10000)
    used, files = dir_usage(tmp_path)
    assert files == 2 and used >= 10000


def test_only_processes_on_the_drivers_node_are_read_by_pid():
    # pid 108 on another host is another process (or none) in this /proc: never read.
    assert readable_pids([(108, "nodeA"), (108, "nodeB"), (7, "nodeA")], "nodeA") == [108, None, 7]
