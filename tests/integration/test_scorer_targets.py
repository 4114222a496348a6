"""Test 2: the teacher targets in a saved batch equal an independent transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, from_ipc_bytes, read_ipc

from .conftest import check_stop_probabilities, eos_ids, read_metrics

pytestmark = pytest.mark.integration


def test_saved_targets_match_plain_forward(cli_run, tiny_model):
    from transformers import AutoModelForCausalLM

    # The default teacher is fixed: its weights are the initial model's at every step.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    stop_ids = eos_ids(tiny_model)
    finishes = set()
    for path in sorted((cli_run / "batches").glob("step_*.arrow")):
        table = read_ipc(path)
        meta = batch_meta(table)
        k, temp = int(meta["opsd.topk"]), float(meta["opsd.temperature"])
        assert meta["opsd.teacher_mode"] == "fixed"
        assert set(table.column("teacher_version").to_pylist()) == {0}
        for row in table.to_pylist():
            ctx, resp = row["teacher_prompt_ids"], row["response_ids"]
            # One unpadded sequence at a time: no batching, no padding, full logits.
            with torch.no_grad():
                logits = model(torch.tensor([ctx + resp])).logits[0].float()
            logp = torch.log_softmax(logits[len(ctx) - 1 : len(ctx) - 1 + len(resp)] / temp, dim=-1)  # [T, V]
            ref_lp, ref_ids = logp.topk(k, dim=-1)
            got_ids = np.array(row["teacher_topk_ids"])
            got_lp = np.array(row["teacher_topk_logprobs"])
            np.testing.assert_allclose(got_lp, ref_lp.numpy(), atol=1e-4)
            # Ids agree except where two logprobs tie within tolerance; then the values must agree.
            mismatch = got_ids != ref_ids.numpy()
            if mismatch.any():
                lp_at_got = np.take_along_axis(logp.numpy(), got_ids, axis=-1)
                np.testing.assert_allclose(lp_at_got[mismatch], got_lp[mismatch], atol=1e-4)
            tok = logp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).numpy()
            np.testing.assert_allclose(np.array(row["teacher_token_logprobs"]), tok, atol=1e-4)
            # The teacher's mass on every stop id, at every response position, and at the last.
            stop = torch.logsumexp(logp[:, stop_ids], dim=-1).numpy()
            np.testing.assert_allclose(np.array(row["teacher_stop_logprobs"]), stop, atol=1e-4)
            finishes.add(row["finish_reason"])
    assert "length" in finishes, finishes  # a truncated row's last position was among those checked


@pytest.mark.parametrize("overrides", [["loss.objective=sampled_token"], ["algo=grpo", "rollout.n=2", "loss.kl_coef=0.01"]],
                         ids=["opsd-sampled-token", "grpo-kl-reference"])
def test_an_objective_that_reads_no_top_k_gets_none_and_the_same_token_logprobs(overrides, cli_run, tiny_model):
    """The scorer skips the top-k when the loss reads only the sampled token's logprob: the batch
    says opsd.targets=token, its top-k columns are null, and the token logprobs are the ones the
    default (top-k) scorer wrote for the same rows."""
    from opsd.objectives import scored_contexts
    from opsd.batch import Sample
    from opsd.workers.scorer import ScorerWorker

    from .conftest import local_config

    cfg = local_config(*overrides)
    assert scored_contexts(cfg)["teacher"] == "token" and scored_contexts(local_config())["teacher"] == "topk"
    saved = read_ipc(sorted((cli_run / "batches").glob("step_*.arrow"))[0])
    rows = saved.to_pylist()
    # The samples as the driver sends them: no teacher targets yet.
    fields = ["sample_id", "prompt_ids", "teacher_prompt_ids", "response_ids", "rollout_logprobs", "loss_mask", "reward",
              "policy_version", "finish_reason"]
    table = from_ipc_bytes(ScorerWorker(cfg, tiny_model).score([Sample(**{k: r[k] for k in fields}) for r in rows]))
    assert batch_meta(table)["opsd.targets"] == "token" and batch_meta(saved)["opsd.targets"] == "topk"
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        assert table.column(name).null_count == table.num_rows
    for a, b in zip(table.column("teacher_token_logprobs").to_pylist(), saved.column("teacher_token_logprobs").to_pylist()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bench_head_loss_is_zero_against_the_students_own_targets_and_not_against_another_context(tiny_model):
    """`opsd bench head`'s loss: the learner's divergence of the student (student prompt +
    response) against targets. Targets that the same model wrote from the student's own context
    are the student's distribution, so the divergence is 0 (a position off by one would not
    be); from another context it is not."""
    from opsd.benchmarks.head import _student_loss
    from opsd.workers.scorer import ScorerWorker

    from .conftest import local_config

    cfg = local_config()
    scorer = ScorerWorker(cfg, tiny_model)
    students, responses = [[5, 17, 40, 3], [8, 2]], [[11, 12, 13], [30, 31, 32, 33, 34]]
    own = scorer.teacher_targets(students, responses)
    assert abs(_student_loss(cfg, scorer.model, scorer.pad_id, students, responses, own)) < 1e-6
    other = scorer.teacher_targets([[60, 61, 62] + s for s in students], responses)
    assert _student_loss(cfg, scorer.model, scorer.pad_id, students, responses, other) > 1e-4


def test_the_stop_probabilities_of_a_step_equal_an_independent_forward(cli_run, tiny_model):
    """Step 1's metrics row: the student's stop probability at the last position of each truncated
    and each finished response is the initial weights' (the learner trains on them in step 1), the
    teacher's is its saved column there; both from a plain fp32 forward and a row-by-row mean."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    row = next(r for r in read_metrics(cli_run) if r["step"] == 1)
    table = read_ipc(cli_run / "batches" / "step_000001.arrow")
    checked = check_stop_probabilities(row, table, model, tiny_model)
    assert checked["truncated"], "the tiny run truncates most of its responses at 64 tokens"
    # The step's repeated 4-gram rate, over the same responses.
    rates = [_repeat_rate(r["response_ids"]) for r in table.to_pylist()]
    rates = [x for x in rates if x is not None]
    assert row["repeated_ngram_rate"] == pytest.approx(sum(rates) / len(rates))


def _repeat_rate(ids: list[int]) -> float | None:
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams) if grams else None
