"""Several teachers (teachers:): a tiny run with two, each row routed by its `teacher` column, and
one pool's scorer killed before the second step.

- ``base``: the student's initial weights, teacher context ``solution`` (the student's template);
- ``big``: another tiny checkpoint (tests/conftest.py ``teacher_model``: seed 1, a chat template
  with a system turn of its own), context ``none``, and the teacher of rows without a route.

Every saved row must name the teacher its data row names, and hold that checkpoint's targets by an
independent float32 forward (1e-4; the other checkpoint's are far off); the teacher prompts are
each teacher's context in its own template; the metrics per teacher equal a direct computation on
the saved batches; the killed scorer is restarted and the run trains on every prompt once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, read_ipc
from opsd.config import REPO_ROOT
from opsd.launch.driver import Trainer

from tests.conftest import TEACHER_SYSTEM
from .conftest import make_trainer, read_metrics
from .test_engine_scoring import assert_same_targets, forward_targets

pytestmark = pytest.mark.integration

ROUTES = ["base", "big", None]  # row i's teacher column: ROUTES[i % 3] (None: the key is absent)
ROWS, PER_STEP, STEPS = 16, 8, 2


class KillingTrainer(Trainer):
    """Kills the `big` pool's scorer before step 2 (before its rollouts are even submitted)."""

    def train_one_step(self, step):
        import ray

        if step == 2:
            actor = self.actors.teacher_pools["big"].actors[0]
            self.incarnation_before = ray.get(actor.incarnation.remote())
            ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts); the pool retries the call
        return super().train_one_step(step)


def routed_set(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The toy set's first ROWS rows with a teacher column; and each row's teacher by uid."""
    rows = [json.loads(line) for line in (REPO_ROOT / "data/toy/train.jsonl").read_text().splitlines()[:ROWS]]
    expected = {}
    for i, row in enumerate(rows):
        if ROUTES[i % 3] is not None:
            row["teacher"] = ROUTES[i % 3]
        expected[row["id"]] = ROUTES[i % 3] or "big"
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, expected


def test_two_teachers_score_the_rows_routed_to_them_and_a_killed_pool_scorer_is_restarted(
        tiny_model, teacher_model, tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ray = ray_session
    data, expected = routed_set(tmp_path)
    trainer, run = make_trainer(
        tmp_path, f"data.train_path={data}", f"train.prompts_per_step={PER_STEP}", f"train.steps={STEPS}",
        "train.checkpoint_every=0", "eval.every=0", "logging.save_batches=true",
        "teachers.base.context=solution", f"teachers.big.model={teacher_model}", "teachers.big.context=none",
        "teacher.default=big", cls=KillingTrainer,
    )
    try:
        trainer.run_steps(run)
        pools = trainer.actors.teacher_pools
        after = ray.get(pools["big"].actors[0].incarnation.remote())
        restarts = {name: pool.restarts for name, pool in pools.items()}
    finally:
        trainer.shutdown()
    assert after.token != trainer.incarnation_before.token, "the big pool's scorer was not restarted"
    assert restarts == {"base": 0, "big": 1}

    metrics = read_metrics(run.path)
    uids = Counter(sid.rsplit("#", 1)[0] for m in metrics for sid in m["sample_ids"])
    assert len(uids) == ROWS and set(uids.values()) == {1}  # every prompt trained on once, the kill included

    models = {"base": AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
              "big": AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32).eval()}
    tok = AutoTokenizer.from_pretrained(teacher_model)
    system = f"<|im_start|>system\n{TEACHER_SYSTEM}<|im_end|>\n"
    paths = sorted((run.path / "batches").glob("step_*.arrow"))
    assert len(paths) == STEPS
    seen, apart = Counter(), 0.0
    for path, m in zip(paths, metrics):
        table = read_ipc(path)
        assert json.loads(batch_meta(table)["opsd.teachers"]) == {"base": None, "big": teacher_model}
        assert [r["sample_id"] for r in table.select(["sample_id"]).to_pylist()] == m["sample_ids"]  # sampler order
        gaps = {"base": [], "big": []}
        for row in table.to_pylist():
            name = row["teacher"]
            assert name == expected[row["sample_id"].rsplit("#", 1)[0]]
            seen[name] += 1
            ctx, resp = row["teacher_prompt_ids"], row["response_ids"]
            if name == "big":  # context none in the big teacher's template: its system turn, then the student's prompt
                assert tok.decode(ctx) == system + tok.decode(row["prompt_ids"])
            else:  # context solution in the student's template: no system turn, more than the student's prompt
                assert not tok.decode(ctx).startswith(system) and len(ctx) > len(row["prompt_ids"])
            k = len(row["teacher_topk_ids"][0])
            assert_same_targets(row, *forward_targets(models[name], ctx, resp, k))
            other = models["big" if name == "base" else "base"]
            apart = max(apart, float(np.abs(forward_targets(other, ctx, resp, k)[2]
                                            - np.array(row["teacher_token_logprobs"])).max()))
            mask = np.array(row["loss_mask"], bool)
            gaps[name] += list((np.array(row["rollout_logprobs"], np.float64)
                                - np.array(row["teacher_token_logprobs"], np.float64))[mask])
        for name, gap in gaps.items():
            assert gap, f"no {name} row in {path.name}"  # the seed's draw puts both teachers in both steps
            assert m[f"teacher/{name}/samples"] == sum(1 for r in table.column("teacher").to_pylist() if r == name)
            assert m[f"teacher/{name}/kl"] == pytest.approx(float(np.mean(gap)), abs=1e-6)
    assert apart > 1e-2, apart  # the other checkpoint would have given other targets
    assert dict(seen) == dict(Counter(expected.values()))
