"""The teacher on the inference engine (docs/DESIGN.md, "The teacher on the inference engine").

- scorer.backend=vllm: a vLLM engine's prompt log-probs give, in float32, the targets of the
  transformers scorer (opsd.scoring.teacher_targets) on the same samples.
- scorer.on_rollout_engines: a live teacher scored by the rollout engines themselves: no scorer
  actor is started, and each batch's targets are those of the policy the step's teacher version
  names (the initial weights at step 1, the learner's first push at step 2), also when the
  rollouts ran a step ahead (rollout.max_staleness=1); a stopped run resumes and repeats.

Tolerances: float32 on CPU on both sides; the two compute the same logits with different kernels
(vLLM's CPU attention and GEMMs vs torch's), so log-probabilities agree to ~1e-6 and are compared
at 1e-4; top-k ids agree except where two neighbouring log-probabilities are closer than that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, from_ipc_bytes, read_ipc

from .conftest import local_config, make_trainer, policy_recording_trainer, read_metrics

pytestmark = pytest.mark.integration

SAMPLE_FIELDS = ["sample_id", "prompt_ids", "teacher_prompt_ids", "response_ids", "rollout_logprobs", "loss_mask",
                 "reward", "policy_version", "finish_reason"]


def assert_same_targets(got: dict, want_ids: np.ndarray, want_lp: np.ndarray, want_tok: np.ndarray) -> None:
    ids, lp = np.array(got["teacher_topk_ids"]), np.array(got["teacher_topk_logprobs"])
    assert ids.shape == want_ids.shape
    np.testing.assert_allclose(lp, want_lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(got["teacher_token_logprobs"]), want_tok, atol=1e-4, rtol=0)
    differ = ids != want_ids
    if differ.any():  # only near-ties may swap places
        gaps = np.abs(np.diff(want_lp, axis=1))
        near = np.zeros_like(differ)
        near[:, 1:] |= gaps < 1e-4
        near[:, :-1] |= gaps < 1e-4
        assert not (differ & ~near).any()


def forward_targets(model, ctx: list[int], resp: list[int], k: int):
    """One unpadded sequence through a Hugging Face model: full logits, no batching."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + resp])).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1: len(ctx) - 1 + len(resp)], dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    tok = logp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
    return ids.numpy(), lp.numpy(), tok.numpy()


# `make test-slow` (a vLLM engine of its own; the default run keeps under 20 minutes): the on-engine
# test below runs the same prompt log-probs path.
@pytest.mark.slow
def test_the_vllm_scorer_gives_the_transformers_scorers_targets_in_float32(cli_run, ray_session):
    """The samples of a saved batch (scored by the transformers scorer), scored again by a vLLM
    scorer actor: the same Arrow batch, the same targets; and the sampled-token-only form."""
    import ray

    from opsd.batch import Sample
    from opsd.workers.rollout import EngineScorerWorker
    from opsd.assets.models import resolve_model_path

    cfg = local_config("scorer.backend=vllm")
    saved = read_ipc(sorted((cli_run / "batches").glob("step_*.arrow"))[0])
    rows = saved.to_pylist()
    samples = [Sample(**{f: r[f] for f in SAMPLE_FIELDS}) for r in rows]
    engine = ray.remote(num_cpus=1)(EngineScorerWorker).remote(cfg, resolve_model_path("tiny"))
    try:
        table = from_ipc_bytes(ray.get(engine.score.remote(samples)))
        token_only = ray.get(engine.teacher_targets.remote([s.teacher_prompt_ids for s in samples],
                                                           [s.response_ids for s in samples], "token"))
        with pytest.raises(ray.exceptions.RayTaskError, match="does not sample"):
            ray.get(engine.generate.remote([[1, 2]], [0], n=1, max_tokens=2, temperature=1.0))
    finally:
        ray.kill(engine)
    assert batch_meta(table) == batch_meta(saved)
    assert table.column("sample_id").to_pylist() == saved.column("sample_id").to_pylist()
    for got, want in zip(table.to_pylist(), rows):
        assert_same_targets(got, np.array(want["teacher_topk_ids"]), np.array(want["teacher_topk_logprobs"]),
                            np.array(want["teacher_token_logprobs"]))
    # The engine's prompt log-probs hold only the top-k: the stop mass is not measured (null).
    assert table.column("teacher_stop_logprobs").null_count == table.num_rows
    for (ids, lps, tok, stop), want in zip(token_only, rows):
        assert ids is None and lps is None and stop is None
        np.testing.assert_allclose(tok, want["teacher_token_logprobs"], atol=1e-4, rtol=0)


# "vllm-scorer": a live teacher on a vLLM scorer actor of its own, which takes every push as a
# rollout engine does; "lora-adapter": the rollout engines serve the policy as a LoRA adapter and
# score the live teacher with it (`make test-slow`, both).
LORA_ADAPTER = ("model.lora.enabled=true", "model.lora.serve=adapter", "model.lora.r=4", "model.lora.alpha=8")


@pytest.mark.parametrize("where", ["rollout-engines", pytest.param("vllm-scorer", marks=pytest.mark.slow),
                                   pytest.param("lora-adapter", marks=pytest.mark.slow)])
def test_the_rollout_engines_score_a_live_teacher_and_no_scorer_actor_starts(where, tmp_path, tiny_model,
                                                                             ray_session, started_pools):
    from transformers import AutoModelForCausalLM

    trainer, run_dir = make_trainer(
        tmp_path, "teacher.mode=live", "logging.save_batches=true",
        "scorer.backend=vllm" if where == "vllm-scorer" else "scorer.on_rollout_engines=true",
        *(LORA_ADAPTER if where == "lora-adapter" else ()),
        "train.steps=2", "train.checkpoint_every=0", "eval.every=0", "learner.lr=1e-2",
        # step 2's rollouts run on the initial weights while step 1 trains; its score call queues
        # behind them on the same engine and must score with the pushed weights
        "rollout.max_staleness=1", cls=policy_recording_trainer())
    try:
        if where != "vllm-scorer":
            assert started_pools == [("rollout", "RolloutWorker")]  # and no pool of scorer actors
            assert trainer.actors.scorers is None and trainer.actors.scoring is trainer.actors.rollouts
        else:
            assert started_pools == [("rollout", "RolloutWorker"), ("scorer", "EngineScorerWorker")]
        trainer.run_steps(run_dir)
    finally:
        trainer.shutdown()
    metrics = read_metrics(run_dir.path)
    assert [m["teacher_version"] for m in metrics] == [1, 2]  # after each step's push, as with scorer actors
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    policies = [dict(model.state_dict()), trainer.policy_history[0]]
    assert max((policies[1][n] - policies[0][n]).abs().max().item() for n in policies[1]) > 1e-3  # it moved
    for step, policy in zip((1, 2), policies):
        table = read_ipc(run_dir.path / "batches" / f"step_{step:06d}.arrow")
        assert set(table.column("teacher_version").to_pylist()) == {step - 1}
        assert set(table.column("policy_version").to_pylist()) == {0}  # both sampled by the initial policy
        assert not model.load_state_dict(policy, strict=False).unexpected_keys
        for row in table.to_pylist():
            assert_same_targets(row, *forward_targets(model, row["teacher_prompt_ids"], row["response_ids"], 64))


# `make test-slow`: two runs of four steps each. "lora-adapter": the engines serve the student as a
# LoRA adapter and score the fixed teacher on their base weights (model.lora.serve=adapter).
ON_ENGINE = {"live": ("teacher.mode=live", "scorer.on_rollout_engines=true"),
             "lora-adapter": (*LORA_ADAPTER, "learner.lr=5e-2", "scorer.on_rollout_engines=true")}


@pytest.mark.slow
@pytest.mark.parametrize("teacher", list(ON_ENGINE))
def test_a_stopped_run_that_scores_on_the_rollout_engines_resumes_and_repeats_the_uninterrupted_one(
    teacher, tmp_path, ray_session, monkeypatch
):
    """test_resume's SIGTERM case with the teacher on the rollout engines: the resumed run
    samples (and a live teacher scores) with the restored policy's weights, pushed to fresh engines."""
    import opsd.launch.driver as driver
    from opsd.launch.stopping import Stopped

    from .conftest import local_overrides
    from .test_resume import CONFIG, SignalledTrainer, assert_repeats

    common = ("train.steps=4", "train.checkpoint_every=2", "eval.every=0", *ON_ENGINE[teacher])
    full = driver.train(CONFIG, local_overrides(tmp_path / "full", *common))
    with monkeypatch.context() as m:
        m.setattr(driver, "Trainer", SignalledTrainer)
        with pytest.raises(Stopped):
            driver.train(CONFIG, local_overrides(tmp_path / "part", *common))
    resumed = driver.train(None, [f"train.resume={tmp_path / 'part' / 'run'}"])
    assert_repeats(read_metrics(full), read_metrics(resumed))
    want = [1, 2, 3, 4] if teacher == "live" else [0, 0, 0, 0]
    assert [m["teacher_version"] for m in read_metrics(resumed)] == want


# `make test-slow`: a second CLI run (the SmolLM2 one is in test_smollm2.py).
@pytest.mark.slow
def test_a_run_with_the_vllm_scorer_trains_and_its_batches_hold_the_transformers_targets(tmp_path, tiny_model):
    import math
    import subprocess
    import sys

    from opsd.config import REPO_ROOT
    from opsd.workers.scorer import ScorerWorker

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "opsd.launch.cli", "train", "configs/tiny.yaml", f"run_dir={run_dir}", "train.steps=2",
           "logging.save_batches=true", "train.checkpoint_every=0", "eval.every=0", "logging.progress=false",
           "scorer.backend=vllm"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"opsd train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "1 scorer(s) (vLLM)" in proc.stdout
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    scorer = ScorerWorker(local_config(), tiny_model)  # the transformers scorer, in this process
    for path in sorted((run_dir / "batches").glob("step_*.arrow")):
        rows = read_ipc(path).to_pylist()
        want = scorer.teacher_targets([r["teacher_prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
        for row, (ids, lps, tok, _) in zip(rows, want):
            assert_same_targets(row, ids, lps, tok)
