"""One training run on a three-node Ray cluster on this machine, losing a node twice; the
results go to a JSON file for tests/integration/test_multinode.py.

Run in a process of its own (``python -m tests.integration.multinode_run OUT.json WORK_DIR replace|lose``): a
process joins one Ray cluster, and the test process already has a local one.

The cluster (ray.cluster_utils.Cluster, each node a raylet of its own with its own CPUs):
- head: the driver only (0 CPUs);
- learner node: the learner ranks (custom resource ``opsd_learner``);
- actor node: the rollout worker and the scorer (custom resource ``opsd_actors``).

What happens (6 steps of 4 prompts, one epoch of 24 problems, a checkpoint every 2 steps):
1. (``replace`` only) as step 3 begins, the actor node is removed and a new one with the same resources is added (as
   an autoscaler or KubeRay would): the rollout worker and the scorer are restarted there, caught
   up, and the run goes on;
2. as step 5 begins, the learner node is removed, and then
   - ``replace``: a new one is added; the learner group is restarted there from the checkpoint at
     step 4 and the run ends normally;
   - ``lose``: nothing replaces it; the group cannot be placed again within
     cluster.place_timeout_s and the run stops with LearnerLost naming the step-4 checkpoint; a new
     learner node is added and the run is resumed from there to the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ACTORS = {"opsd_actors": 2.0}
LEARNER = {"opsd_learner": 2.0}
# Long enough for a restarted rollout worker to start vLLM on its new node (2 cores, under load).
PLACE_TIMEOUT_S = 120
NODE_ARGS = dict(object_store_memory=150 * 2**20)


def main(out_path: str, work: str, mode: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import opsd.launch.driver as driver
    from opsd.launch.stopping import LearnerLost
    from opsd.config import REPO_ROOT

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, **NODE_ARGS))
    nodes = {"learner": cluster.add_node(num_cpus=1, resources=LEARNER, **NODE_ARGS),
             "actors": cluster.add_node(num_cpus=2, resources=ACTORS, **NODE_ARGS)}
    cluster.wait_for_nodes()
    out: dict = {"events": [], "placement": {}}

    def node_ids() -> dict:
        return {name: node.node_id for name, node in nodes.items()}

    out["nodes"] = {"initial": node_ids()}

    class NodeLoss(driver.Trainer):
        def train_one_step(self, step: int) -> dict:
            if step == 3 and mode == "replace" and "actors lost" not in out["events"]:
                cluster.remove_node(nodes["actors"])
                nodes["actors"] = cluster.add_node(num_cpus=2, resources=ACTORS, **NODE_ARGS)
                out["events"].append("actors lost")
                out["nodes"]["after actors lost"] = node_ids()
            if step == 5 and "learner lost" not in out["events"]:
                cluster.remove_node(nodes["learner"])
                out["events"].append("learner lost")
                if mode == "replace":
                    nodes["learner"] = cluster.add_node(num_cpus=1, resources=LEARNER, **NODE_ARGS)
                out["nodes"]["after learner lost"] = node_ids()
            row = super().train_one_step(step)
            out["placement"][str(step)] = self.actors.placement()
            return row

    run = Path(work) / "run"
    config = str(REPO_ROOT / "configs" / "tiny.yaml")
    # Placing a lost learner group needs no start-up time: a short wait makes the "lose" case quick.
    timeout = PLACE_TIMEOUT_S if mode == "replace" else 30
    overrides = [
        f"run_dir={run}", f"cluster.address={cluster.address}", f"cluster.place_timeout_s={timeout}",
        "logging.progress=false", "logging.tensorboard=false", "eval.every=0",
        "data.max_rows=24", "train.prompts_per_step=4", "train.steps=6", "train.checkpoint_every=2",
        f"rollout.resources={json.dumps({'opsd_actors': 1})}", f"scorer.resources={json.dumps({'opsd_actors': 1})}",
        f"learner.resources={json.dumps({'opsd_learner': 1})}",
    ]
    driver.Trainer, plain = NodeLoss, driver.Trainer
    try:
        t0 = time.monotonic()
        try:
            driver.train(config, overrides)
            out["first"] = "finished"
        except LearnerLost as exc:
            out["first"] = str(exc)
        out["first_seconds"] = time.monotonic() - t0
        out["checkpoints_after_first"] = sorted(p.name for p in (run / "checkpoints").iterdir())
        if mode == "lose":
            nodes["learner"] = cluster.add_node(num_cpus=1, resources=LEARNER, **NODE_ARGS)
            cluster.wait_for_nodes()
            out["nodes"]["resumed"] = node_ids()
            driver.train(None, [f"train.resume={run}"])
        # The order an uninterrupted run draws its prompts in: the same sampler, replayed.
        cfg, _ = driver.prepare_config(config, overrides)
        fresh = plain(cfg)
        out["expected_uids"] = [[fresh.data.pairs[i].uid for i in fresh.data.sampler.next_batch(4)] for _ in range(6)]
    finally:
        driver.Trainer = plain
        ray.shutdown()
        cluster.shutdown()
    out["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
