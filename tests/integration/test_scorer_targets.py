"""Test 2: the teacher targets in a saved batch equal an independent transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opsd.batch import batch_meta, read_ipc

pytestmark = pytest.mark.integration


def test_saved_targets_match_plain_forward(cli_run, tiny_model):
    from transformers import AutoModelForCausalLM

    # The default teacher is fixed: its weights are the initial model's at every step.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
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
