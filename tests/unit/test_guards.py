"""The guards against OPSD's length inflation (issue 36): OPSD's KL anchor to the initial policy
(opsd/objectives/opsd.py) against a brute-force computation, and loss.mask_truncated's rule for
GRPO's groups (a masked sample keeps its place in its group's mean and std: workers/learner.py
plan_ranks)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from opsd.losses import LossSpec, TokenTargets, chunked_loss
from opsd.objectives.opsd import OpsdOptions

N, V, K = 6, 9, 4
TEMP = 1.3


def _log_softmax(row: list[float]) -> list[float]:
    z = [x / TEMP for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    topk_lp, topk_ids = teacher.topk(K, dim=-1)
    sampled = torch.randint(0, V, (N,), generator=g).tolist()
    return {"logits": (torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5).tolist(), "sampled": sampled,
            "topk_ids": topk_ids.tolist(), "topk_lp": topk_lp.tolist(),
            "teacher_lp": [teacher[i, s].item() for i, s in enumerate(sampled)],
            "anchor_lp": (torch.randn(N, generator=g, dtype=torch.float64) * 0.8 - 2.5).tolist(),
            "weight": [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]}


def _run(c: dict, options: OpsdOptions) -> tuple[float, torch.Tensor, dict]:
    hidden = torch.tensor(c["logits"], dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(V, V, bias=False, dtype=torch.float64)  # identity: hidden.grad = d loss / d logits
    with torch.no_grad():
        head.weight.copy_(torch.eye(V, dtype=torch.float64))
    t = TokenTargets(sampled_ids=torch.tensor(c["sampled"]), weight=torch.tensor(c["weight"], dtype=torch.float64),
                     topk_ids=torch.tensor(c["topk_ids"]), topk_logprobs=torch.tensor(c["topk_lp"], dtype=torch.float64),
                     teacher_logprobs=torch.tensor(c["teacher_lp"], dtype=torch.float64),
                     extra={"anchor_logprobs": torch.tensor(c["anchor_lp"], dtype=torch.float64)})
    loss, stats = chunked_loss(hidden, head, t, LossSpec(algo="opsd", temperature=TEMP, chunk_size=4, options=options),
                               normalizer=4.0)
    loss.backward()
    return loss.item(), hidden.grad, stats


def _brute(c: dict, logits: list[list[float]], anchor: float) -> float:
    """Forward KL over the teacher's renormalised top-k, plus anchor * (exp(d) - d - 1), d = log p_ref(y)
    - log p_S(y), summed over weighted tokens / 4."""
    total = 0.0
    for i in range(N):
        ls = _log_softmax(logits[i])
        ps = [math.exp(ls[v]) for v in c["topk_ids"][i]]
        pt = [math.exp(x) for x in c["topk_lp"][i]]
        kl = sum(a / sum(pt) * math.log((a / sum(pt)) / (b / sum(ps))) for a, b in zip(pt, ps))
        d = c["anchor_lp"][i] - ls[c["sampled"][i]]
        total += c["weight"][i] * (kl + anchor * (math.exp(d) - d - 1.0))
    return total / 4.0


def _numeric_grad(f, logits, h=1e-6):
    grad = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        for v in range(V):
            up, down = [r[:] for r in logits], [r[:] for r in logits]
            up[i][v] += h
            down[i][v] -= h
            grad[i, v] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("anchor", [0.0, 0.3, 2.0])
def test_the_anchor_adds_its_weight_times_k3_to_the_initial_policy(anchor):
    c = _case(3)
    got, grad, stats = _run(c, OpsdOptions(beta=0.0, anchor=anchor))
    assert got == pytest.approx(_brute(c, c["logits"], anchor), rel=1e-10)
    torch.testing.assert_close(grad, _numeric_grad(lambda x: _brute(c, x, anchor), c["logits"]), rtol=1e-5, atol=1e-8)
    if anchor:
        want = 0.0
        for i in range(N):
            d = c["anchor_lp"][i] - _log_softmax(c["logits"][i])[c["sampled"][i]]
            want += c["weight"][i] * (math.exp(d) - d - 1.0)
        assert stats["anchor_kl_sum"] == pytest.approx(want, rel=1e-10)
    else:
        assert "anchor_kl_sum" not in stats


def test_the_anchor_is_zero_with_zero_gradient_where_the_student_is_the_initial_policy():
    c = _case(4)
    c["anchor_lp"] = [_log_softmax(row)[s] for row, s in zip(c["logits"], c["sampled"])]
    _, with_anchor, stats = _run(c, OpsdOptions(beta=0.0, anchor=5.0))
    _, without, _ = _run(c, OpsdOptions(beta=0.0))
    assert stats["anchor_kl_sum"] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(with_anchor, without, rtol=1e-10, atol=1e-12)


def test_a_masked_sample_still_counts_in_its_groups_reward_mean_and_std():
    """loss.mask_truncated empties a cut sample's loss mask; GRPO's advantages of its siblings are
    those of the whole group, the cut sample's reward included (DAPO's and TRL's rule)."""
    from opsd.workers.learner import plan_ranks

    rewards = [1.0, 0.0, 0.0, 1.0]  # sample 3 was cut (all-False mask) and graded correct
    masks = [[True] * 3, [True] * 2, [True] * 4, [False] * 5]
    table = pa.Table.from_pylist([{"sample_id": f"p#{j}", "prompt_ids": [1, 1], "response_ids": [2] * len(m),
                                   "loss_mask": m, "reward": r} for j, (r, m) in enumerate(zip(rewards, masks))])
    (plan,) = plan_ranks(table, world_size=1, micro_batch_size=4, micro_batches=1, grpo=True)
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    want = [(r - mean) / (std + 1e-6) for r in rewards]
    assert [plan.advantages[plan.rows.index(j)] for j in range(4)] == pytest.approx(want, abs=1e-6)
    assert plan.global_tokens == 9  # the cut sample's 5 tokens are out of the loss
