"""More than one Ray node: learner ranks on one node, rollout worker and scorer on another (pinned
by custom resources), one run directory; then whole nodes are removed mid-run.

The run itself is tests/integration/multinode_run.py, in a process of its own (a process joins one
Ray cluster, and this one may already have the suite's local one).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.config import REPO_ROOT

pytestmark = pytest.mark.integration


def run_cluster(tmp_path, mode: str) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "tests.integration.multinode_run", str(out), str(tmp_path), mode],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"the multi-node run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    return result


def assert_every_prompt_once_in_order(result: dict) -> None:
    metrics = [m for m in result["metrics"] if m["step"] > 0]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # The learner and the receivers are on different nodes: every push went through the store.
    assert not any(m["sync_in_place"] for m in metrics)
    # The surviving history: one epoch of 24 problems, each once, in an uninterrupted run's order.
    assert [[sid.rsplit("#", 1)[0] for sid in m["sample_ids"]] for m in metrics] == result["expected_uids"]
    assert len({u for step in result["expected_uids"] for u in step}) == 24


def assert_on(placement: dict, nodes: dict) -> None:
    assert set(placement["learner"]) == {nodes["learner"]}
    assert placement["rollout"] == placement["scorer"] == [nodes["actors"]]


# Slow (`make test-slow`): the default run stays under 20 minutes on 2 cores.
@pytest.mark.slow
def test_roles_stay_on_their_nodes_and_the_run_survives_losing_each_node(tiny_model, tmp_path):
    result = run_cluster(tmp_path, "replace")
    nodes, where = result["nodes"], result["placement"]
    assert result["events"] == ["actors lost", "learner lost"] and result["first"] == "finished"
    assert len({nodes["initial"]["learner"], nodes["initial"]["actors"]}) == 2
    for step in ("1", "2"):
        assert_on(where[step], nodes["initial"])
    # The actor node is gone as step 3 begins: rollout and scorer come back on its replacement.
    for step in ("3", "4"):
        assert_on(where[step], nodes["after actors lost"])
    assert nodes["after actors lost"]["actors"] != nodes["initial"]["actors"]
    # (The scorer is back, on its fixed teacher's initial weights, before its next call: nothing to redo.)
    assert "opsd: warning: rollout 0 died" in result["stdout"]
    # The learner node is gone as step 5 begins: a new group on the new node, from the step-4 checkpoint.
    for step in ("5", "6"):
        assert_on(where[step], nodes["after learner lost"])
    assert "restarting the learner group from" in result["stdout"] and "step_4" in result["stdout"]
    assert "placement: rollout on" in result["stdout"]
    assert_every_prompt_once_in_order(result)
    assert result["checkpoints_after_first"] == ["step_2", "step_4", "step_6"]


@pytest.mark.slow
def test_a_lost_learner_node_that_nobody_replaces_stops_the_run_at_its_last_checkpoint(tiny_model, tmp_path):
    result = run_cluster(tmp_path, "lose")
    first = result["first"]
    assert "a learner rank died in step 5" in first
    assert "could not be placed within cluster.place_timeout_s=30 s" in first and "opsd_learner" in first
    assert f"resume from {tmp_path / 'run' / 'checkpoints' / 'step_4'} with: opsd train --resume" in first
    assert result["checkpoints_after_first"] == ["step_2", "step_4"]
    for step in ("1", "2", "3", "4"):
        assert_on(result["placement"][step], result["nodes"]["initial"])
    for step in ("5", "6"):  # the resumed run, on the new learner node
        assert_on(result["placement"][step], result["nodes"]["resumed"])
    assert_every_prompt_once_in_order(result)
