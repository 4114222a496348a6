"""opsd/objectives/mix.py: the composite objective. Each mode's per-token loss against a brute-force
computation (Python loops in float64 over tokens and the vocabulary, gradients by central
differences of that computation), and the config check of what parents can share a batch."""

from __future__ import annotations

import math

import pytest
import torch

from opsd.config import ConfigError, load_config
from opsd.losses import LossSpec, TokenTargets, chunked_loss
from opsd.objectives import objective, scored_contexts
from opsd.objectives.grpo import GrpoOptions
from opsd.objectives.mix import MixPlan, Parent
from opsd.objectives.opsd import OpsdOptions
from tests.plugins.squared_gap import SquaredGapOptions

PLUGIN = "tests.plugins.squared_gap:OBJECTIVE"
N, V, K = 5, 7, 3
TEMP = 0.8


def case(seed: int):
    """Per-token inputs of N positions over a vocabulary of V, as plain Python lists."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5).tolist()
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    topk_lp, topk_ids = teacher.topk(K, dim=-1)
    sampled = torch.randint(0, V, (N,), generator=g).tolist()
    return {
        "logits": logits, "sampled": sampled, "topk_ids": topk_ids.tolist(), "topk_lp": topk_lp.tolist(),
        "teacher_lp": [teacher[i, sampled[i]].item() for i in range(N)],
        "rollout_lp": (torch.randn(N, generator=g, dtype=torch.float64) * 0.6 - 2.0).tolist(),
        "adv": torch.randn(N, generator=g, dtype=torch.float64).tolist(),
        "reward": [1.0, 0.0, 1.0, 0.0, 0.0],
        "weight": [1.0, 1.0, 0.0, 1.0, 1.0],
    }


def log_softmax(row: list[float], temperature: float) -> list[float]:
    z = [x / temperature for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def jsd_topk(ls_row: list[float], ids: list[int], lt: list[float], beta: float) -> float:
    """The generalized JSD over the teacher's top-k ids, both renormalised there."""
    ps = [math.exp(ls_row[i]) for i in ids]
    pt = [math.exp(x) for x in lt]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    total = 0.0
    for a, b in zip(pt, ps):
        m = beta * a + (1 - beta) * b
        total += beta * a * math.log(a / m) + (1 - beta) * b * math.log(b / m)
    return total


def targets(c: dict, fields: dict) -> tuple[torch.Tensor, torch.nn.Linear, TokenTargets]:
    """The logits as hidden states through an identity head, so hidden.grad is d loss / d logits."""
    hidden = torch.tensor(c["logits"], dtype=torch.float64)
    head = torch.nn.Linear(V, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V, dtype=torch.float64))
    base = {"sampled_ids": torch.tensor(c["sampled"]), "weight": torch.tensor(c["weight"], dtype=torch.float64),
            "advantages": torch.tensor(c["adv"], dtype=torch.float64)}
    return hidden, head, TokenTargets.from_fields({**base, **fields})


def run(c, plan, fields, normalizer=3.0):
    hidden, head, t = targets(c, fields)
    hidden.requires_grad_()
    loss, stats = chunked_loss(hidden, head, t, LossSpec(algo="mix", temperature=TEMP, chunk_size=2, options=plan),
                               normalizer=normalizer)
    loss.backward()
    return loss.item(), hidden.grad, stats


def numeric_grad(f, logits: list[list[float]], h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        for v in range(V):
            up = [row[:] for row in logits]
            down = [row[:] for row in logits]
            up[i][v] += h
            down[i][v] -= h
            grad[i, v] = (f(up) - f(down)) / (2 * h)
    return grad


def tensors(c, *names):
    kinds = {"topk_ids": torch.long}
    return [torch.tensor(c[n], dtype=kinds.get(n, torch.float64)) for n in names]


def test_sum_mode_is_the_weighted_sum_of_the_parents_losses_a_plugin_with_an_option_included():
    c = case(0)
    plan = MixPlan("sum", (Parent("opsd", 0.7, OpsdOptions(beta=0.3)), Parent(PLUGIN, 0.4, SquaredGapOptions(scale=2.0))))
    topk_ids, topk_lp, teacher_lp = tensors(c, "topk_ids", "topk_lp", "teacher_lp")
    got, grad, stats = run(c, plan, {"opsd/topk_ids": topk_ids, "opsd/topk_logprobs": topk_lp,
                                     "opsd/teacher_logprobs": teacher_lp, f"{PLUGIN}/teacher_logprobs": teacher_lp,
                                     "teacher_logprobs": teacher_lp})

    def brute(logits):
        total = 0.0
        for i in range(N):
            ls = log_softmax(logits[i], TEMP)
            opsd = jsd_topk(ls, c["topk_ids"][i], c["topk_lp"][i], 0.3)
            gap = 2.0 * (ls[c["sampled"][i]] - c["teacher_lp"][i]) ** 2
            total += c["weight"][i] * (0.7 * opsd + 0.4 * gap)
        return total / 3.0

    assert got == pytest.approx(brute(c["logits"]), rel=1e-10)
    torch.testing.assert_close(grad, numeric_grad(brute, c["logits"]), rtol=1e-5, atol=1e-8)
    assert set(stats) >= {f"{PLUGIN}/gap_sum", "kl_sampled_sum"}
    row = objective("mix").row(stats, stats["tokens"])
    assert "squared_gap/gap_mean" in row


def test_advantage_mode_trains_the_blended_advantage_in_grpos_clipped_ratio():
    """SDPO: A_t = lambda * A_grpo + (1 - lambda) * (log p_T(y_t) - log p_S(y_t)), the distillation
    part at loss.temperature and held constant; the ratio against the sampler's logprobs."""
    c = case(1)
    grpo = GrpoOptions(clip_low=0.2, clip_high=0.28, old_logprobs="rollout")
    plan = MixPlan("advantage", (Parent("grpo", 0.6, grpo), Parent("opsd", 0.4, OpsdOptions())))
    topk_ids, topk_lp, teacher_lp, rollout_lp = tensors(c, "topk_ids", "topk_lp", "teacher_lp", "rollout_lp")
    got, grad, stats = run(c, plan, {"grpo/rollout_logprobs": rollout_lp, "opsd/topk_ids": topk_ids,
                                     "opsd/topk_logprobs": topk_lp, "opsd/teacher_logprobs": teacher_lp,
                                     "teacher_logprobs": teacher_lp})
    base = [log_softmax(row, TEMP)[s] for row, s in zip(c["logits"], c["sampled"])]
    blended = [0.6 * a + 0.4 * (t - s) for a, t, s in zip(c["adv"], c["teacher_lp"], base)]
    clipped = 0

    def brute(logits):
        total = 0.0
        for i in range(N):
            r = math.exp(log_softmax(logits[i], TEMP)[c["sampled"][i]] - c["rollout_lp"][i])
            a = blended[i]
            total += c["weight"][i] * -min(r * a, min(max(r, 0.8), 1.28) * a)
        return total / 3.0

    for i in range(N):
        r = math.exp(base[i] - c["rollout_lp"][i])
        clipped += c["weight"][i] * (min(max(r, 0.8), 1.28) * blended[i] < r * blended[i])
    assert got == pytest.approx(brute(c["logits"]), rel=1e-10)
    torch.testing.assert_close(grad, numeric_grad(brute, c["logits"]), rtol=1e-5, atol=1e-8)
    assert stats["grpo/clipped_tokens"] == clipped
    assert not any(k.startswith("opsd/") for k in stats)  # one surrogate: the ratio parent's statistics


def test_route_mode_gives_correct_samples_grpos_loss_and_wrong_ones_opsds():
    """SRPO: graded correct -> GRPO (learner's own old log-probs: -A, gradient -A grad log p_S);
    wrong -> OPSD's divergence times its weight."""
    c = case(2)
    plan = MixPlan("route", (Parent("grpo", 1.0, GrpoOptions()), Parent("opsd", 0.5, OpsdOptions(beta=0.0))),
                   correct="grpo")
    topk_ids, topk_lp, teacher_lp, reward = tensors(c, "topk_ids", "topk_lp", "teacher_lp", "reward")
    got, grad, stats = run(c, plan, {"reward": reward, "opsd/topk_ids": topk_ids, "opsd/topk_logprobs": topk_lp,
                                     "opsd/teacher_logprobs": teacher_lp, "teacher_logprobs": teacher_lp})
    base = [log_softmax(row, TEMP)[s] for row, s in zip(c["logits"], c["sampled"])]

    def brute(logits):
        total = 0.0
        for i in range(N):
            ls = log_softmax(logits[i], TEMP)
            if c["reward"][i] == 1.0:
                # ratio exp(lp - stopgrad(lp)) is 1 in value, its gradient that of lp
                loss = -c["adv"][i] * math.exp(ls[c["sampled"][i]] - base[i])
            else:
                ids = c["topk_ids"][i]
                ps = [math.exp(ls[v]) for v in ids]
                pt = [math.exp(x) for x in c["topk_lp"][i]]
                loss = 0.5 * sum(a / sum(pt) * math.log((a / sum(pt)) / (b / sum(ps))) for a, b in zip(pt, ps))
            total += c["weight"][i] * loss
        return total / 3.0

    assert got == pytest.approx(brute(c["logits"]), rel=1e-10)
    torch.testing.assert_close(grad, numeric_grad(brute, c["logits"]), rtol=1e-5, atol=1e-8)
    assert stats["correct_tokens"] == 1.0  # rows 0 and 2 are correct; row 2 has weight 0
    assert objective("mix").row(stats, stats["tokens"])["correct_frac"] == pytest.approx(0.25)


# --- what the composite reads of its parents, and what it refuses -------------------------------------


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["rollout.n=2", *overrides])


def test_the_composite_combines_its_parents_declarations():
    cfg = _cfg("algo=mix", "objectives.mix.parents={opsd: 0.5, grpo: 0.5}", "objectives.opsd.anchor=0.1",
               "objectives.grpo.clip_high=0.28", "loss.temperature=1.0")
    mix = objective("mix")
    assert (mix.responses(cfg), mix.teacher(cfg), mix.targets(cfg)) == ("student", "context", "topk")
    assert scored_contexts(cfg) == {"teacher": "topk", "anchor": "token"}
    assert mix.needs(cfg) >= {"answer"}
    plan = mix.options(cfg)
    assert [(p.algo, p.weight) for p in plan.parents] == [("opsd", 0.5), ("grpo", 0.5)]
    # The learner's padding micro-batches are built from these: GRPO's advantages must be among them.
    fields = mix.fields(LossSpec(algo="mix", options=plan))
    assert fields[0] == "advantages" and {"opsd/topk_ids", "opsd/anchor_logprobs"} <= set(fields)
    assert plan.parents[0].options.anchor == 0.1 and plan.parents[1].options.clip_high == 0.28  # each its own


def test_a_plugin_parent_reads_its_own_option_section():
    cfg = _cfg("algo=mix", 'objectives.mix.parents={opsd: 1.0, "tests.plugins.squared_gap:OBJECTIVE": 0.5}',
               "objectives.squared_gap.scale=3")
    plan = objective("mix").options(cfg)
    assert plan.parents[1].options == SquaredGapOptions(scale=3.0)
    with pytest.raises(ConfigError, match=r"objectives\.squared_gap\.scal'.*no option 'scal'.*\['scale'\]"):
        _cfg("algo=mix", 'objectives.mix.parents={opsd: 1.0, "tests.plugins.squared_gap:OBJECTIVE": 0.5}',
             "objectives.squared_gap.scal=3")


@pytest.mark.parametrize("overrides,message", [
    (["objectives.mix.parents={opsd: 1.0}"], r"objectives\.mix\.parents.*at least two"),
    (["objectives.mix.parents={opsd: 0.5, sft: 0.5}"], r"objectives\.mix\.parents.*student.*reference.*cannot share"),
    (["objectives.mix.parents={opsd: 0.5, grpo: 0.5}", "objectives.grpo.kl_coef=0.1"],
     r"one primary teacher.*kl_coef=0"),
    (["objectives.mix.parents={opsd: 0.5, kd: 0.5}"], r"cannot share a batch"),
    (["objectives.mix.parents={opsd: 0.5, grpo: 0.5}", "objectives.mix.mode=route"], r"objectives\.mix\.correct"),
    (["objectives.mix.parents={opsd: 0.5, squared_gap: 0.5}"], r"'algo' = 'squared_gap'"),
    (["objectives.mix.parents={opsd: 0.5, tests.plugins.squared_gap:OBJECTIVE: 0.5}", "objectives.mix.mode=advantage"],
     r"no per-token advantage"),
    # OPSD's advantage is its sampled-token log-ratio: an anchor or a beta would do nothing there.
    (["objectives.mix.parents={grpo: 0.5, opsd: 0.5}", "objectives.mix.mode=advantage", "objectives.opsd.anchor=0.1"],
     r"'objectives\.opsd\.anchor' = 0\.1 with objectives\.mix\.mode=advantage.*does not read it"),
    (["objectives.mix.parents={grpo: 0.5, opsd: 0.5}", "objectives.mix.mode=advantage", "objectives.opsd.beta=0.0"],
     r"'objectives\.opsd\.beta' = 0\.0 with"),
    (["objectives.mix.parents={opsd: 0.5, grpo: -1}"], r"weight >= 0"),
    (["objectives.mix.parents={opsd: 0.5, grpo: 0.5}", "rollout.n=1"], r"rollout\.n"),
    (["objectives.mix.parents={opsd: 0.5, grpo: 0.5}", "objectives.mix.mode=blend"], r"objectives\.mix\.mode"),
])
def test_parents_that_cannot_share_a_batch_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("algo=mix", *overrides)


def test_the_advantage_blend_takes_opsds_options_its_advantage_reads():
    # objective=sampled_token is what the advantage is; the anchor is fine under sum.
    _cfg("algo=mix", "objectives.mix.parents={grpo: 0.5, opsd: 0.5}", "objectives.mix.mode=advantage",
         "objectives.opsd.objective=sampled_token")
    _cfg("algo=mix", "objectives.mix.parents={grpo: 0.5, opsd: 0.5}", "objectives.opsd.anchor=0.1")
