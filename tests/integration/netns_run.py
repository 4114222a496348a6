"""The driver of one training run on the hosts of tests/integration/test_hosts.py; the results go
to a JSON file for that test.

Run inside the head host's network and PID namespaces
(``python -m tests.integration.netns_run OUT.json WORK_DIR HEAD_IP store-loss|gloo``). The hosts are
made and killed by the test; this process asks for a kill at the start of a step by writing
``WORK_DIR/ask-<step>`` (what to do) and waits for ``WORK_DIR/done-<step>``:

- ``store-loss``: object_store pushes, 6 steps of 4 prompts, a checkpoint every 2; as step 3 begins
  the actor host is killed whole and a new one starts (rollout worker and scorer restarted there and
  caught up); as step 5 begins the learner host is killed and replaced (the learner group restarts
  there from the step-4 checkpoint);
- ``gloo``: 3 steps through gloo broadcasts, receivers connecting to learner rank 0's host address.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 300
ASKS = {"store-loss": {3: "replace actors", 5: "replace learner"}, "gloo": {}}


def ask(work: Path, step: int, action: str) -> None:
    done = work / f"done-{step}"
    (work / f"ask-{step}").write_text(action)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test did not answer {action!r} at step {step} within {HANDSHAKE_TIMEOUT_S} s")
        time.sleep(0.2)


def main(out_path: str, work_dir: str, head_ip: str, mode: str) -> None:
    import ray

    import opsd.launch.driver as driver
    from opsd.config import REPO_ROOT

    work = Path(work_dir)
    out: dict = {"placement": {}, "node_ips": {}, "asked": []}

    def remember_nodes() -> None:
        for node in ray.nodes():
            out["node_ips"][node["NodeID"]] = node["NodeManagerAddress"]

    class HostLoss(driver.Trainer):
        def train_one_step(self, step: int) -> dict:
            action = ASKS[mode].get(step)
            if action and action not in out["asked"]:
                out["asked"].append(action)
                ask(work, step, action)
            row = super().train_one_step(step)
            remember_nodes()
            out["placement"][str(step)] = self.actors.placement()
            return row

    run = work / "run"
    config = str(REPO_ROOT / "configs" / "tiny.yaml")
    steps = 6 if mode == "store-loss" else 3
    overrides = [
        f"run_dir={run}", f"cluster.address={head_ip}:6379", "cluster.place_timeout_s=240",
        "logging.progress=false", "logging.tensorboard=false", "eval.every=0",
        "data.max_rows=24", "train.prompts_per_step=4", f"train.steps={steps}", "train.checkpoint_every=2",
        f"sync.transport={'gloo' if mode == 'gloo' else 'object_store'}",
        f"rollout.resources={json.dumps({'opsd_actors': 1})}", f"scorer.resources={json.dumps({'opsd_actors': 1})}",
        f"learner.resources={json.dumps({'opsd_learner': 1})}",
    ]
    driver.Trainer, plain = HostLoss, driver.Trainer
    try:
        driver.train(config, overrides)
        cfg, _ = driver.prepare_config(config, overrides)
        fresh = plain(cfg)
        out["expected_uids"] = [[fresh.data.pairs[i].uid for i in fresh.data.sampler.next_batch(4)]
                                for _ in range(steps)]
    finally:
        driver.Trainer = plain
    out["checkpoints"] = sorted(p.name for p in (run / "checkpoints").iterdir())
    out["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
