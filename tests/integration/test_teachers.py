"""Several teachers (teachers:), on real Ray actors:

- default run: two teachers' scorer pools (transformers), a step's samples routed to them by their
  ``teacher`` and rejoined in order, each row holding its teacher checkpoint's targets by an
  independent float32 forward; one pool's scorer killed, the same samples scored again: the pool
  restarts it and the batch is the same;
- `make test-slow`: a tiny run of the same two teachers, ``big`` on a vLLM scorer (a pool's own
  backend), each row routed by its data column, with that pool's scorer killed before step 2.

The teachers: ``base``, the student's initial weights reading the solution (the student's
template); ``big``, another tiny checkpoint (tests/conftest.py ``teacher_model``: seed 1, a chat
template with a system turn of its own) reading the student's prompt (context none), also the
teacher of rows without a route.
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
from .conftest import local_config, make_trainer, read_metrics

pytestmark = pytest.mark.integration

ROUTES = ["base", "big", None]  # row i's teacher column: ROUTES[i % 3] (None: the key is absent)
ROWS, PER_STEP, STEPS = 16, 8, 2


TEACHERS = ("teachers.base.context=solution", "teachers.big.context=none", "teacher.default=big")


def forward_logp(model, row: dict) -> np.ndarray:
    """log-softmax of a float32 forward of ``model`` on the row's teacher prompt + response, one
    unpadded sequence, at the response positions: [T, V]."""
    ctx, resp = row["teacher_prompt_ids"], row["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + resp])).logits[0].float()
    return torch.log_softmax(logits[len(ctx) - 1: len(ctx) - 1 + len(resp)], dim=-1).numpy()


def assert_same_targets(row: dict, logp: np.ndarray, k: int) -> None:
    """The row's teacher targets against ``logp`` [T, V] (1e-4): the top-k log-probabilities in
    order, the log-probability of every id the row names (so a tie at the k-th place may go either
    way), the sampled tokens'."""
    ids, lp = np.array(row["teacher_topk_ids"]), np.array(row["teacher_topk_logprobs"])  # [T, k]
    assert ids.shape == (len(row["response_ids"]), k) and all(len(set(r)) == k for r in ids.tolist())
    np.testing.assert_allclose(lp, -np.sort(-logp, axis=1)[:, :k], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(logp, ids, axis=1), lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(token_logprobs(logp, row), row["teacher_token_logprobs"], atol=1e-4, rtol=0)


def token_logprobs(logp: np.ndarray, row: dict) -> np.ndarray:
    return logp[np.arange(len(row["response_ids"])), row["response_ids"]]


def assert_scored_by_its_teacher(rows: list[dict], models: dict, k: int) -> None:
    """Each row's targets are its teacher's (the ``teacher`` column), and the other checkpoint's
    would be far off (the check can tell them apart)."""
    apart = 0.0
    for row in rows:
        assert_same_targets(row, forward_logp(models[row["teacher"]], row), k)
        other = forward_logp(models["big" if row["teacher"] == "base" else "base"], row)
        apart = max(apart, float(np.abs(token_logprobs(other, row) - np.array(row["teacher_token_logprobs"])).max()))
    assert apart > 1e-2, apart


def models_of(tiny_model: str, teacher_model: str) -> dict:
    from transformers import AutoModelForCausalLM

    return {"base": AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
            "big": AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32).eval()}


def test_two_pools_score_the_samples_routed_to_them_in_order_and_one_survives_a_kill(tiny_model, teacher_model,
                                                                                     ray_session):
    from opsd.batch import Sample
    from opsd.launch.actors import scorer_pool_of
    from opsd.launch.teachers import TeacherPools
    from opsd.teachers import teacher_config

    ray = ray_session
    cfg = local_config(f"teachers.big.model={teacher_model}", *TEACHERS)
    paths = {"base": tiny_model, "big": teacher_model}
    kw = dict(max_restarts=cfg.train.max_actor_restarts, place_timeout=cfg.cluster.place_timeout_s)
    pools = {name: scorer_pool_of(teacher_config(cfg, name), paths[name], f"scorer:{name}", kw) for name in paths}
    try:
        for pool in pools.values():
            pool.wait_ready()
        scoring = TeacherPools(pools, {"base": None, "big": teacher_model})
        rng = np.random.default_rng(0)
        route = ["big", "base", "big", "big", "base", "big", "base"]
        samples = []
        for i, name in enumerate(route):
            T = int(rng.integers(3, 9))
            samples.append(Sample(f"p{i}#0", [1, 2, 3], rng.integers(5, 500, int(rng.integers(4, 12))).tolist(),
                                  rng.integers(5, 500, T).tolist(), [-1.0] * T, [True] * T, 1.0, 0, "stop",
                                  teacher=name))
        first = scoring.collect(samples, scoring.submit(samples, 0))
        before = ray.get(pools["big"].actors[0].incarnation.remote())
        ray.kill(pools["big"].actors[0], no_restart=False)  # Ray restarts it; the pool retries the call
        again = scoring.collect(samples, scoring.submit(samples, 0))
        after = ray.get(pools["big"].actors[0].incarnation.remote())
        restarts = {name: pool.restarts for name, pool in pools.items()}
    finally:
        for pool in pools.values():
            pool.kill()
    assert before.token != after.token and restarts == {"base": 0, "big": 1}
    assert first.column("sample_id").to_pylist() == [s.sample_id for s in samples]
    assert first.column("teacher").to_pylist() == route
    assert json.loads(batch_meta(first)["opsd.teachers"]) == {"base": None, "big": teacher_model}
    assert again.equals(first)  # the restarted scorer is the same fixed teacher
    assert_scored_by_its_teacher(first.to_pylist(), models_of(tiny_model, teacher_model), cfg.scorer.topk)


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


# `make test-slow`: a whole run with two scorer pools costs ~4 minutes on 2 cores; the default run
# keeps the pools test above (the same routing, rejoining, targets and kill, without the run).
@pytest.mark.slow
def test_a_run_routes_each_row_by_its_data_column_and_goes_on_after_a_pools_scorer_is_killed(
        tiny_model, teacher_model, tmp_path, ray_session):
    from transformers import AutoTokenizer

    ray = ray_session
    data, expected = routed_set(tmp_path)
    trainer, run = make_trainer(
        tmp_path, f"data.train_path={data}", f"train.prompts_per_step={PER_STEP}", f"train.steps={STEPS}",
        "train.checkpoint_every=0", "eval.every=0", "logging.save_batches=true", f"teachers.big.model={teacher_model}",
        "teachers.big.scorer.backend=vllm", *TEACHERS, cls=KillingTrainer,
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

    models = models_of(tiny_model, teacher_model)
    tok = AutoTokenizer.from_pretrained(teacher_model)
    system = f"<|im_start|>system\n{TEACHER_SYSTEM}<|im_end|>\n"
    paths = sorted((run.path / "batches").glob("step_*.arrow"))
    assert len(paths) == STEPS
    seen = Counter()
    for path, m in zip(paths, metrics):
        table = read_ipc(path)
        rows = table.to_pylist()
        assert json.loads(batch_meta(table)["opsd.teachers"]) == {"base": None, "big": teacher_model}
        assert [r["sample_id"] for r in rows] == m["sample_ids"]  # the sampler's order
        assert_scored_by_its_teacher(rows, models, len(rows[0]["teacher_topk_ids"][0]))
        gaps = {"base": [], "big": []}
        for row in rows:
            name = row["teacher"]
            assert name == expected[row["sample_id"].rsplit("#", 1)[0]]
            seen[name] += 1
            ctx = row["teacher_prompt_ids"]
            if name == "big":  # context none in the big teacher's template: its system turn, then the student's prompt
                assert tok.decode(ctx) == system + tok.decode(row["prompt_ids"])
            else:  # context solution in the student's template: no system turn, more than the student's prompt
                assert not tok.decode(ctx).startswith(system) and len(ctx) > len(row["prompt_ids"])
            mask = np.array(row["loss_mask"], bool)
            gaps[name] += list((np.array(row["rollout_logprobs"], np.float64)
                                - np.array(row["teacher_token_logprobs"], np.float64))[mask])
        for name, gap in gaps.items():
            assert gap, f"no {name} row in {path.name}"  # the seed's draw puts both teachers in both steps
            assert m[f"teacher/{name}/samples"] == sum(r["teacher"] == name for r in rows)
            assert m[f"teacher/{name}/kl"] == pytest.approx(float(np.mean(gap)), abs=1e-6)
    assert dict(seen) == dict(Counter(expected.values()))
