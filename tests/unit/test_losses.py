"""Tests for opsd/losses.py: formulas against brute-force references written here in numpy."""

from __future__ import annotations

import math
import statistics
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opsd.objectives.contrastive import ContrastiveOptions
from opsd.objectives.grpo import GrpoOptions
from opsd.objectives.opsd import OpsdOptions
from opsd.losses import (
    LossSpec,
    TokenTargets,
    chunked_loss,
    fp32_lm_head,
    grpo_advantages,
    grpo_token_loss,
    sampled_token_loss,
    sft_token_loss,
    skip_first_mask,
    token_divergence,
)

BETAS = [0.0, 0.3, 0.5, 1.0]
SUPPORTS = ["topk", "topk_tail"]
TEMPERATURES = [0.7, 1.0, 1.5]


# ---------------------------------------------------------------- brute-force references


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * math.log(pi / qi)
    return total


def np_div(p_t, p_s, beta):
    if beta == 0.0:
        return np_kl(p_t, p_s)
    if beta == 1.0:
        return np_kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)


def brute_divergence(student_logits, topk_ids, topk_logprobs, beta, support, temperature):
    out = []
    for z, ids, lt in zip(student_logits, topk_ids, topk_logprobs):
        ps_full = np_softmax(np.asarray(z, dtype=np.float64) / temperature)
        ps = [ps_full[i] for i in ids]
        pt = [math.exp(v) for v in lt]
        if support == "topk":
            ps = [v / sum(ps) for v in ps]
            pt = [v / sum(pt) for v in pt]
        else:
            # a tail below 1e-12 is float64 rounding of an empty tail (k = V)
            ps.append(1.0 - sum(ps) if 1.0 - sum(ps) > 1e-12 else 0.0)
            pt.append(1.0 - sum(pt) if 1.0 - sum(pt) > 1e-12 else 0.0)
        out.append(np_div(pt, ps, beta))
    return np.array(out)


def brute_full_divergence(student_logits, teacher_logits, beta, temperature):
    # teacher_logits are already at the teacher's temperature, like the scorer's output
    return np.array(
        [
            np_div(list(np_softmax(t)), list(np_softmax(z / temperature)), beta)
            for z, t in zip(np.asarray(student_logits), np.asarray(teacher_logits))
        ]
    )


def make_case(n, v, k, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=dtype) * scale
    teacher = torch.randn(n, v, generator=g, dtype=dtype) * scale
    teacher_logp = torch.log_softmax(teacher, -1)
    topk_lp, topk_ids = teacher_logp.topk(k, dim=-1)
    # shuffle the k columns so nothing relies on sorted order
    perm = torch.randperm(k, generator=g)
    return student, teacher, topk_ids[:, perm], topk_lp[:, perm]


# ---------------------------------------------------------------- token_divergence


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", [3, 11])  # V = 11: k < V and k = V
def test_token_divergence_matches_brute_force(support, beta, temperature, k):
    student, teacher, ids, lp = make_case(5, 11, k, seed=k * 7 + int(10 * beta))
    got = token_divergence(student, ids, lp, beta=beta, support=support, temperature=temperature)
    want = brute_divergence(student.numpy(), ids.numpy(), lp.numpy(), beta, support, temperature)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    if k == 11:
        full = brute_full_divergence(student.numpy(), teacher.numpy(), beta, temperature)
        np.testing.assert_allclose(got.numpy(), full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_tail_never_exceeds_full_divergence(beta):
    # Coarse-graining (data processing inequality); renormalising over top-k has no such bound,
    # so the topk support must exceed the full divergence on some row for the check to matter.
    topk_exceeds = False
    for seed in range(8):
        temperature = TEMPERATURES[seed % 3]
        student, teacher, ids, lp = make_case(6, 20, 1 + seed % 6, seed=100 + seed, scale=3.0)
        full = brute_full_divergence(student.numpy(), teacher.numpy(), beta, temperature)
        tail = token_divergence(
            student, ids, lp, beta=beta, support="topk_tail", temperature=temperature
        )
        topk = token_divergence(
            student, ids, lp, beta=beta, support="topk", temperature=temperature
        )
        assert (tail.numpy() <= full + 1e-12).all()
        topk_exceeds |= bool((topk.numpy() > full).any())
    assert topk_exceeds


def test_beta_endpoints_are_forward_and_reverse_kl():
    student, teacher, ids, lp = make_case(4, 9, 9, seed=3)
    ls = torch.log_softmax(student, -1)
    lt = torch.log_softmax(teacher, -1)
    forward = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(p_T || p_S)
    reverse = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # KL(p_S || p_T)
    assert not torch.allclose(forward, reverse, rtol=1e-2)
    for support in SUPPORTS:
        got0 = token_divergence(student, ids, lp, beta=0.0, support=support)
        got1 = token_divergence(student, ids, lp, beta=1.0, support=support)
        torch.testing.assert_close(got0, forward, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got1, reverse, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("beta", BETAS)
def test_divergence_nonnegative_and_zero_at_equality(support, beta):
    student, _, ids, lp = make_case(8, 15, 5, seed=11)
    d = token_divergence(student, ids, lp, beta=beta, support=support, temperature=1.5)
    assert (d > 1e-6).all()
    # teacher == student at temperature 1.5
    self_lp = torch.log_softmax(student / 1.5, -1).gather(-1, ids)
    d0 = token_divergence(student, ids, self_lp, beta=beta, support=support, temperature=1.5)
    torch.testing.assert_close(d0, torch.zeros_like(d0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_teacher_probability_and_zero_tail_are_finite(beta):
    # V = 6, teacher puts no mass on tokens 4 and 5 (their tail is 0) and has a -inf among its top-4
    student = torch.tensor([[0.3, -1.0, 2.0, 0.1, 0.5, -0.2]], dtype=torch.float64)
    student = student.requires_grad_()
    inf = math.inf
    t_logits = torch.tensor([[1.0, 0.5, -0.5, -inf, -inf, -inf]], dtype=torch.float64)
    lp = torch.log_softmax(t_logits, -1)[:, :4]
    ids = torch.tensor([[0, 1, 2, 3]])
    for support in SUPPORTS:
        d = token_divergence(student, ids, lp, beta=beta, support=support)
        (grad,) = torch.autograd.grad(d.sum(), student)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all()
        if beta < 1.0:  # reverse KL is infinite here; everything else is a finite number
            want = brute_divergence(
                student.detach().numpy(), ids.numpy(), lp.numpy(), beta, support, 1.0
            )
            np.testing.assert_allclose(d.detach().numpy(), want, rtol=1e-9)
        else:
            assert d.item() > 10.0  # large, as the true value is +inf


def test_bf16_logits_are_computed_in_float32():
    student, _, ids, lp = make_case(4, 40, 5, seed=5, dtype=torch.float32)
    bf = student.to(torch.bfloat16)
    got = token_divergence(bf, ids, lp, beta=0.5, support="topk_tail", temperature=0.7)
    want = token_divergence(bf.float(), ids, lp, beta=0.5, support="topk_tail", temperature=0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_lm_head_gives_the_float64_log_probs_of_the_half_precision_weights(dtype):
    """Logits of 20-40 (a real model's range): a half-precision matmul is off by ~0.1 nats, the
    fp32 head by float32 rounding; the gradient reaches the half-precision weight unchanged."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden_size, n = 300, 64, 12
    make = lambda: torch.nn.Linear(hidden_size, vocab, bias=False).to(dtype)  # noqa: E731
    plain, patched = make(), make()
    with torch.no_grad():
        w = (torch.randn(vocab, hidden_size, generator=g) * 0.6).to(dtype)
        plain.weight.copy_(w)
        patched.weight.copy_(w)
    fp32_lm_head(patched)
    h = (torch.randn(n, hidden_size, generator=g) * 1.2).to(dtype)
    exact_logits = h.double() @ w.double().T
    assert 20 < exact_logits.abs().max() < 60
    exact = torch.log_softmax(exact_logits, dim=-1)
    half = torch.log_softmax(plain(h).double(), dim=-1)
    fp32 = torch.log_softmax(patched(h).double(), dim=-1)
    assert patched(h).dtype == torch.float32
    # what the fp32 head is for: the output rounded to 8 (bf16) or 11 (fp16) significant bits
    assert (half - exact).abs().max() > (3e-2 if dtype == torch.bfloat16 else 2e-3)
    assert (fp32 - exact).abs().max() < 1e-4
    # d/dW of sum(log_softmax[target]) against float64 autograd on the same half-precision values
    target = torch.randint(0, vocab, (n,), generator=g)
    patched.weight.grad = None
    torch.log_softmax(patched(h), dim=-1).gather(-1, target[:, None]).sum().backward()
    w64 = w.double().requires_grad_(True)
    torch.log_softmax(h.double() @ w64.T, dim=-1).gather(-1, target[:, None]).sum().backward()
    assert patched.weight.grad.dtype == dtype
    torch.testing.assert_close(patched.weight.grad.double(), w64.grad, rtol=1e-2, atol=1e-2)
    # float32 weights and inputs are left to the module's own matmul
    f32 = fp32_lm_head(torch.nn.Linear(hidden_size, vocab))
    x = torch.randn(3, hidden_size, generator=g)
    torch.testing.assert_close(f32(x), F.linear(x, f32.weight, f32.bias), rtol=0, atol=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        fp32_lm_head(torch.nn.Embedding(3, 4))


def test_topk_tail_float32_keeps_tiny_tails():
    # One side's tail is ~1e-9, the other's is large, so the tail category dominates the
    # divergence; 1 - sum(top-k) in float32 would round the tiny tail to 0 and be off by nats.
    # What is left (~2e-4 relative) comes from the float32 rounding of the inputs themselves.
    ids = torch.tensor([[0, 1]])
    peaked = torch.tensor([[10.0, -1.0, -12.0, -12.0, -11.0]], dtype=torch.float64)  # tail ~1e-9
    flat = torch.tensor([[1.0, 0.5, 0.0, -0.5, 0.2]], dtype=torch.float64)  # tail ~0.5
    for student, teacher in ((peaked, flat), (flat, peaked)):
        lp = torch.log_softmax(teacher, -1)[:, :2]
        for beta in BETAS:
            d64 = token_divergence(student, ids, lp, beta=beta, support="topk_tail")
            d32 = token_divergence(student.float(), ids, lp.float(), beta=beta, support="topk_tail")
            assert d64.item() > 0.1
            torch.testing.assert_close(d32.double(), d64, rtol=1e-3, atol=0)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_token_divergence_gradcheck(support, beta):
    student, _, ids, lp = make_case(3, 7, 4, seed=21)
    student.requires_grad_()

    def fn(z):
        return token_divergence(z, ids, lp, beta=beta, support=support, temperature=0.7)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


def test_bad_arguments_name_the_value():
    student, _, ids, lp = make_case(2, 5, 2, seed=0)
    with pytest.raises(ValueError, match="support"):
        token_divergence(student, ids, lp, beta=0.5, support="full")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(student, ids, lp, beta=1.5, support="topk")
    with pytest.raises(ValueError, match="algo"):
        LossSpec(algo="ppo")


# ---------------------------------------------------------------- sampled_token_loss


def test_sampled_token_loss_gradient_and_is_clip():
    g = torch.Generator().manual_seed(4)
    n, v = 6, 5
    z = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, v, (n,), generator=g)
    lp_s = torch.log_softmax(z, -1).gather(-1, ids[:, None]).squeeze(-1)
    lp_t = lp_s.detach() + torch.tensor([0.5, -0.3, 1.0, -1.2, 0.2, 0.0], dtype=torch.float64)
    # ratios exp(lp_s - lp_r): 2.0, 0.5, 3.0, 1.0, 1.5, 0.25
    lp_r = lp_s.detach() - torch.tensor([2.0, 0.5, 3.0, 1.0, 1.5, 0.25], dtype=torch.float64).log()
    cap = 1.6
    loss = sampled_token_loss(lp_s, lp_t, lp_r, is_clip=cap)
    (grad,) = torch.autograd.grad(loss.sum(), z, retain_graph=True)

    zn, idn = z.detach().numpy(), ids.numpy()
    adv = (lp_t - lp_s).detach().numpy()
    w = np.minimum([2.0, 0.5, 3.0, 1.0, 1.5, 0.25], cap)
    want_grad = np.zeros((n, v))
    for i in range(n):
        dlogp = -np_softmax(zn[i])  # d log p(y) / dz = onehot(y) - softmax(z)
        dlogp[idn[i]] += 1.0
        want_grad[i] = -adv[i] * w[i] * dlogp
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        loss.detach().numpy(), -adv * w * lp_s.detach().numpy(), rtol=1e-12
    )

    # without rollout logprobs there is no ratio at all
    (grad_plain,) = torch.autograd.grad(sampled_token_loss(lp_s, lp_t).sum(), z)
    want_plain = want_grad / w[:, None]
    np.testing.assert_allclose(grad_plain.numpy(), want_plain, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- GRPO


@pytest.mark.parametrize("scale_std", [True, False])
def test_grpo_advantages_per_group(scale_std):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.7, 0.7, 0.3])
    groups = torch.tensor([7, 3, 7, 3, 3, 9, 42, 42, 7])  # 9: one sample; 42: equal rewards
    got = grpo_advantages(rewards, groups, eps=1e-6, scale_std=scale_std)
    want = []
    for i, gi in enumerate(groups.tolist()):
        members = [rewards[j].item() for j in range(len(groups)) if groups[j].item() == gi]
        mean = sum(members) / len(members)
        adv = rewards[i].item() - mean
        if scale_std:
            std = statistics.stdev(members) if len(members) > 1 else 0.0  # sample std (n - 1)
            adv /= std + 1e-6
        want.append(adv)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-5, atol=1e-6)
    assert got[5] == 0 and got[6] == 0 and got[7] == 0
    if scale_std:  # group 7 = {1, 0, 0.3}: sample std, not population std
        assert got[0].item() == pytest.approx((1 - 1.3 / 3) / statistics.stdev([1, 0, 0.3]), 1e-4)


def test_grpo_token_loss_hand_numbers():
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 1.25], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, 1.0], dtype=torch.float64)
    old = torch.full((6,), -1.0, dtype=torch.float64)
    lp = (old + ratios.log()).requires_grad_()
    loss = grpo_token_loss(lp, old, adv, clip_low=0.2, clip_high=0.28)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    # A>0, r=1.5: min(1.5, 1.28) -> clipped; A>0, r=0.5: min(0.5, 0.8) -> unclipped;
    # A<0, r=1.5: min(-1.5, -1.28) -> unclipped; A<0, r=0.5: min(-0.5, -0.8) -> clipped;
    # r=1.1 inside; A>0, r=1.25 inside the asymmetric upper bound 1.28
    want_loss = [-1.28, -0.5, 1.5, 0.8, -2.2, -1.25]
    want_grad = [0.0, -0.5, 1.5, 0.0, -2.2, -1.25]  # d(-r A)/d lp = -r A where unclipped
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12, atol=1e-15)

    ref = lp.detach() + 0.5  # ref - lp = 0.5
    loss_kl = grpo_token_loss(
        lp, old, adv, clip_low=0.2, clip_high=0.28, ref_logprobs=ref, kl_coef=0.1
    )
    (grad_kl,) = torch.autograd.grad(loss_kl.sum(), lp)
    k3 = math.exp(0.5) - 0.5 - 1.0
    np.testing.assert_allclose((loss_kl - loss).detach().numpy(), [0.1 * k3] * 6, rtol=1e-12)
    # d k3 / d lp = 1 - exp(ref - lp)
    dk3 = 0.1 * (1 - math.exp(0.5))
    np.testing.assert_allclose((grad_kl - grad).numpy(), [dk3] * 6, rtol=1e-10)


# ---------------------------------------------------------------- SFT


def test_sft_token_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    target = torch.tensor([1, 2])
    for temperature in (1.0, 0.5):
        got = sft_token_loss(logits, target, temperature=temperature)
        want = []
        for z, y in zip(logits.tolist(), target.tolist()):
            zs = [v / temperature for v in z]
            want.append(math.log(sum(math.exp(v) for v in zs)) - zs[y])
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


# ---------------------------------------------------------------- skip_first_mask


def test_skip_first_mask_counts_loss_tokens_per_row():
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],  # right-padded
            [0, 0, 1, 1, 1, 1],  # left-padded (or prompt in front)
            [1, 0, 0, 0, 0, 0],  # shorter than n
        ],
        dtype=torch.bool,
    )
    want = torch.tensor(
        [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(skip_first_mask(mask, 2), want)
    assert torch.equal(skip_first_mask(mask, 0), mask)


# ---------------------------------------------------------------- chunked_loss

N, H, V, K = 11, 6, 13, 4

SPECS = {
    "opsd_div_tail": LossSpec(algo="opsd", temperature=0.7, options=OpsdOptions(beta=0.3, support="topk_tail")),
    "opsd_div_topk_clip": LossSpec(algo="opsd", options=OpsdOptions(beta=1.0, support="topk", token_clip=0.4)),
    "opsd_sampled": LossSpec(algo="opsd", temperature=1.5, options=OpsdOptions(objective="sampled_token", is_clip=1.3)),
    "grpo_rollout": LossSpec(algo="grpo", options=GrpoOptions(clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                                                              old_logprobs="rollout")),
    # The learner's own log-probs as the old policy, at a sampling temperature other than 1.
    "grpo_learner": LossSpec(algo="grpo", temperature=0.8, options=GrpoOptions(clip_low=0.2, clip_high=0.28,
                                                                               kl_coef=0.05)),
    "sft": LossSpec(algo="sft"),
}


def make_batch(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    teacher = torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, -1)
    topk_lp, topk_ids = teacher.topk(K, dim=-1)
    sampled = torch.randint(0, V, (n,), generator=g)
    with torch.no_grad():
        lp_now = torch.log_softmax(head(hidden), -1).gather(-1, sampled[:, None]).squeeze(-1)
    weight = torch.ones(n, dtype=torch.float64)
    weight[1] = 0.0
    targets = TokenTargets(
        sampled_ids=sampled,
        weight=weight,
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        teacher_logprobs=teacher.gather(-1, sampled[:, None]).squeeze(-1),
        # ratios in about [0.5, 2] so that both clips bite on some tokens
        rollout_logprobs=lp_now + 0.7 * torch.randn(n, generator=g, dtype=torch.float64),
        advantages=torch.randn(n, generator=g, dtype=torch.float64),
        ref_logprobs=lp_now + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
    )
    return hidden, head, targets


def reference_token_losses(hidden, head, t, spec):
    """Per-token losses from the public per-token functions on full [N, V] logits."""
    logits = head(hidden)
    lp = torch.log_softmax(logits / spec.temperature, -1).gather(-1, t.sampled_ids[:, None])[:, 0]
    if spec.algo == "sft":
        return sft_token_loss(logits, t.sampled_ids, spec.temperature)
    o = spec.options
    if spec.algo == "grpo":
        old = t.rollout_logprobs if o.old_logprobs == "rollout" else lp.detach()
        return grpo_token_loss(
            lp, old, t.advantages, clip_low=o.clip_low,
            clip_high=o.clip_high, ref_logprobs=t.ref_logprobs, kl_coef=o.kl_coef,
        )
    if o.objective == "sampled_token":
        loss = sampled_token_loss(lp, t.teacher_logprobs, t.rollout_logprobs, is_clip=o.is_clip)
    else:
        loss = token_divergence(
            logits, t.topk_ids, t.topk_logprobs, beta=o.beta, support=o.support,
            temperature=spec.temperature,
        )
    return loss if o.token_clip is None else loss.clamp(max=o.token_clip)


def loss_and_grads(hidden, head, targets, spec, normalizer):
    hidden = hidden.clone().requires_grad_()
    head.zero_grad()
    loss, stats = chunked_loss(hidden, head, targets, spec, normalizer=normalizer)
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad.clone(), stats


@pytest.mark.parametrize("name", list(SPECS))
def test_chunked_loss_independent_of_chunk_size_and_matches_reference(name):
    hidden, head, targets = make_batch(seed=1)
    spec = SPECS[name]
    results = [
        loss_and_grads(hidden, head, targets, LossSpec(**{**spec.__dict__, "chunk_size": c}), 7.0)
        for c in (3, 1024)
    ]
    (l3, gh3, gw3, s3), (lf, ghf, gwf, sf) = results
    torch.testing.assert_close(l3, lf, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gh3, ghf, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gw3, gwf, rtol=1e-10, atol=1e-13)
    assert s3.keys() == sf.keys()
    for key in s3:
        assert s3[key] == pytest.approx(sf[key], rel=1e-10, abs=1e-12)

    # the driver computes sum(weight * per-token loss) / normalizer of the per-token functions
    ref = (targets.weight * reference_token_losses(hidden, head, targets, spec)).sum() / 7.0
    torch.testing.assert_close(l3, ref.detach(), rtol=1e-12, atol=1e-14)
    assert s3["tokens"] == N - 1  # weight 0 on one row
    assert s3["loss_sum"] == pytest.approx(7.0 * lf.item(), rel=1e-12)
    if name == "grpo_learner":
        assert s3["clipped_tokens"] == 0  # the ratio is exactly 1
    elif "clipped_tokens" in s3:
        assert 0 < s3["clipped_tokens"] < N - 1  # the spec's clip bites on some tokens, not all
    if spec.algo == "grpo":
        # The sampler against the learner at temperature 1, whatever the loss's temperature.
        lp1 = torch.log_softmax(head(hidden).detach(), -1).gather(-1, targets.sampled_ids[:, None])[:, 0]
        gap = targets.rollout_logprobs - lp1
        assert s3["mismatch_sum"] == pytest.approx((targets.weight * gap.abs()).sum().item(), rel=1e-10)
        ratio = torch.exp(-gap)
        outside = ((ratio < 1 - spec.options.clip_low) | (ratio > 1 + spec.options.clip_high)).double()
        assert s3["rollout_clipped_tokens"] == (targets.weight * outside).sum().item() > 0
    logits = head(hidden).detach() / spec.temperature
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert s3["entropy_sum"] == pytest.approx((targets.weight * entropy).sum().item(), rel=1e-10)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.sampled_ids[:, None])[:, 0]
    gap = (targets.weight * (targets.teacher_logprobs - lp)).sum().item()
    assert s3["kl_sampled_sum"] == pytest.approx(gap, rel=1e-10)


def test_chunked_loss_global_token_mean_over_uneven_micro_batches():
    spec = LossSpec(algo="opsd", chunk_size=2, options=OpsdOptions(beta=0.5, support="topk_tail"))
    hidden, head, targets = make_batch(seed=2)
    targets.weight = torch.ones(N, dtype=torch.float64)
    hidden = hidden.requires_grad_()

    # full batch: gradient of the plain token mean of the per-token losses
    full = token_divergence(head(hidden), targets.topk_ids, targets.topk_logprobs, beta=0.5,
                            support="topk_tail").mean()
    g_hidden, g_weight = torch.autograd.grad(full, (hidden, head.weight))

    def slice_targets(sl):
        return TokenTargets.from_fields({k: None if v is None else v[sl] for k, v in targets.fields().items()})

    def accumulate(normalizer_of):
        hidden.grad = None
        head.zero_grad()
        total = 0.0
        for sl in (slice(0, 2), slice(2, 7), slice(7, N)):  # 2 + 5 + 4 tokens
            loss, stats = chunked_loss(hidden[sl], head, slice_targets(sl), spec,
                                       normalizer=normalizer_of(stats_tokens=sl.stop - sl.start))
            loss.backward()
            total += loss.item()
        return total, hidden.grad.clone(), head.weight.grad.clone()

    total, gh, gw = accumulate(lambda stats_tokens: float(N))
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(gh, g_hidden, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gw, g_weight, rtol=1e-10, atol=1e-13)

    # the per-micro-batch mean, averaged, is a different (biased) objective for uneven sizes
    _, _, gw_naive = accumulate(lambda stats_tokens: 3.0 * stats_tokens)
    assert not torch.allclose(gw_naive, g_weight, rtol=1e-3)


def test_chunked_loss_memory_is_bounded_by_chunk():
    n, chunk = 24, 4
    hidden, lin, targets = make_batch(seed=3, n=n)
    hidden = hidden.requires_grad_()
    calls = []  # (rows, phase) of every head call

    phase = {"now": "forward"}

    def head(h):
        calls.append((h.shape[0], phase["now"]))
        return lin(h)

    saved = []  # weakrefs of every tensor autograd keeps for backward, outside checkpointed chunks

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    spec = LossSpec(algo="opsd", chunk_size=chunk, options=OpsdOptions(support="topk_tail"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_loss(hidden, head, targets, spec, normalizer=float(n))
    kept = [r() for r in saved if r() is not None]
    # no tensor of vocabulary width survives the forward pass (without checkpointing every
    # chunk's [chunk, V] log-softmax would be here)
    assert all(V not in t.shape for t in kept), [tuple(t.shape) for t in kept]

    phase["now"] = "backward"
    loss.backward()
    fwd = [rows for rows, p in calls if p == "forward"]
    bwd = [rows for rows, p in calls if p == "backward"]
    assert fwd == [chunk] * (n // chunk)
    # backward recomputes one chunk's logits at a time, never the whole batch
    assert bwd == [chunk] * (n // chunk)
    assert torch.isfinite(hidden.grad).all() and lin.weight.grad.abs().sum() > 0


def test_chunked_loss_missing_targets_name_the_field():
    hidden, head, targets = make_batch(seed=4)
    targets.topk_ids = None
    with pytest.raises(ValueError, match="topk_ids"):
        chunked_loss(hidden, head, targets, LossSpec(), normalizer=1.0)


# ---------------------------------------------------------------- loss shaping of the successors


def np_terms(p_t, p_s, beta):
    """The per-category terms whose sum np_div is."""
    if beta == 0.0:
        return [a * math.log(a / b) if a > 0 else 0.0 for a, b in zip(p_t, p_s)]
    if beta == 1.0:
        return [b * math.log(b / a) if b > 0 else 0.0 for a, b in zip(p_t, p_s)]
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return [beta * (a * math.log(a / mi) if a > 0 else 0.0) + (1 - beta) * (b * math.log(b / mi) if b > 0 else 0.0)
            for a, b, mi in zip(p_t, p_s, m)]


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_pointwise_divergence_clip_caps_each_category_of_the_sum(support, beta):
    """The OPSD authors' clip: sum_v min(d_v, c), brute force; a capped category carries no
    gradient and the others keep exactly the gradient they have unclipped."""
    from opsd.losses import divergence_from_logprobs

    student, _, ids, lp = make_case(6, 9, 4, seed=21, scale=3.0)
    clip = 0.05
    logp = torch.log_softmax(student, -1)
    want = []
    for z, i, t in zip(student.numpy(), ids.numpy(), lp.numpy()):
        ps_full = np_softmax(z)
        ps, pt = [ps_full[j] for j in i], [math.exp(v) for v in t]
        if support == "topk":
            ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        else:
            ps.append(1.0 - sum(ps))
            pt.append(1.0 - sum(pt))
        want.append(sum(min(d, clip) for d in np_terms(pt, ps, beta)))
    got = divergence_from_logprobs(logp, ids, lp, beta, support, clip=clip)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    assert (got.numpy() < divergence_from_logprobs(logp, ids, lp, beta, support).numpy()).any()  # the cap bites
    # Gradient: by finite differences of the brute-force value (no category sits at the cap).
    x = student.clone().requires_grad_()
    divergence_from_logprobs(torch.log_softmax(x, -1), ids, lp, beta, support, clip=clip).sum().backward()
    eps = 1e-6
    num = torch.zeros_like(student)
    for r in range(student.shape[0]):
        for c in range(student.shape[1]):
            plus, minus = student.clone(), student.clone()
            plus[r, c] += eps
            minus[r, c] -= eps
            f = lambda s: divergence_from_logprobs(torch.log_softmax(s, -1), ids, lp, beta, support, clip=clip).sum()  # noqa: E731
            num[r, c] = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(x.grad.numpy(), num.numpy(), rtol=1e-4, atol=1e-7)


def test_scale_divergence_clip_caps_the_value_and_scales_the_gradient_instead_of_removing_it():
    from opsd.losses import divergence_from_logprobs

    student, _, ids, lp = make_case(8, 9, 4, seed=5, scale=3.0)
    plain = divergence_from_logprobs(torch.log_softmax(student, -1), ids, lp, 0.5, "topk")
    clip = float(plain.median())
    x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
    got = divergence_from_logprobs(torch.log_softmax(x, -1), ids, lp, 0.5, "topk", clip=clip, clip_mode="scale")
    np.testing.assert_allclose(got.detach().numpy(), np.minimum(plain.numpy(), clip), rtol=1e-12)
    got.sum().backward()
    factor = torch.clamp(clip / plain, max=1.0)  # each token's gradient, scaled down to the cap
    (divergence_from_logprobs(torch.log_softmax(y, -1), ids, lp, 0.5, "topk") * factor).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-14)
    over = plain > clip
    assert over.any() and (x.grad[over].abs().sum(-1) > 0).all()  # clipped tokens still learn (token_clip: 0)


def test_position_weights_are_pw_opsds_sigmoid_over_each_rows_own_length():
    from opsd.workers.learner_training import position_weights

    got = position_weights([1, 4, 10], low=0.25, center=0.30, width=0.10)
    want = []
    for t in (1, 4, 10):
        for i in range(1, t + 1):
            f = (i - 0.5) / t
            want.append(0.25 + 0.75 / (1.0 + math.exp(-(f - 0.30) / 0.10)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[1] < got[4] and abs(got[-1] - 1.0) < 0.02  # early tokens weigh less; the last ones ~1


def test_a_loss_scale_multiplies_each_tokens_loss_but_not_the_token_count():
    hidden, head, targets = make_batch(seed=4)
    spec = LossSpec(algo="opsd", options=OpsdOptions(beta=0.5, support="topk"))
    scale = torch.linspace(0.25, 1.0, N, dtype=torch.float64)
    scaled = TokenTargets.from_fields({**targets.fields(), "scale": scale})
    loss, stats = chunked_loss(hidden, head, scaled, spec, normalizer=7.0)
    per_token = reference_token_losses(hidden, head, targets, spec)
    torch.testing.assert_close(loss, (targets.weight * scale * per_token).sum() / 7.0, rtol=1e-12, atol=1e-14)
    assert stats["tokens"] == float(targets.weight.sum())


def test_the_contrast_is_the_correct_teachers_logprob_over_the_mean_of_the_wrong_ones():
    from opsd.objectives.contrastive import contrast

    correct = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    wrong = torch.tensor([[-1.5, -3.0], [-1.0, math.nan], [math.nan, math.nan]], dtype=torch.float64)
    want = [-1.0 - math.log((math.exp(-1.5) + math.exp(-3.0)) / 2), -2.0 - (-1.0), 0.0]
    np.testing.assert_allclose(contrast(correct, wrong).numpy(), want, rtol=1e-12)


def test_modulated_advantages_move_by_the_bounded_credit_and_keep_the_verifiers_sign():
    from opsd.objectives.contrastive import modulated_advantages

    a = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.2, 0.5], dtype=torch.float64)
    e = torch.tensor([0.05, -0.05, 0.05, -0.05, 0.3, -0.3, 0.0001], dtype=torch.float64)
    got, moved = modulated_advantages(a, e, tau=0.02, scale=0.5, threshold=0.02)
    want, want_moved = [], []
    for ai, ei in zip(a.tolist(), e.tolist()):
        r = 0.5 * math.tanh(ei / 0.02)
        x = ai + (r if abs(r) > 0.02 else 0.0)
        m = abs(r) > 0.02 and ai != 0  # where A = 0 nothing can move
        want.append(max(x, 0.0) if ai > 0 else min(x, 0.0) if ai < 0 else 0.0)
        want_moved.append(m)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert moved.tolist() == want_moved == [True, True, True, True, False, True, False]
    assert got[5] == 0.0  # a positive advantage pushed below zero stops at zero


def test_the_contrastive_loss_is_grpos_with_the_modulated_advantages():
    from opsd.objectives.contrastive import modulated_advantages

    hidden, head, targets = make_batch(seed=6)
    credit = torch.linspace(-0.1, 0.1, N, dtype=torch.float64)
    spec = LossSpec(algo="contrastive", options=ContrastiveOptions(clip_low=0.2, clip_high=0.28))
    advantages = targets.advantages.clone()
    advantages[: N // 3] = 0.0  # a group whose samples all got the same grade: nothing to move
    t = TokenTargets.from_fields({**targets.fields(), "contrast": credit, "advantages": advantages})
    loss, stats = chunked_loss(hidden, head, t, spec, normalizer=9.0)
    lp = torch.log_softmax(head(hidden), -1).gather(-1, t.sampled_ids[:, None])[:, 0]
    a, moved = modulated_advantages(t.advantages, credit, tau=0.02, scale=0.5, threshold=0.02)
    want = grpo_token_loss(lp, lp.detach(), a, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, (t.weight * want).sum() / 9.0, rtol=1e-12, atol=1e-14)
    assert stats["moved_tokens"] == float((t.weight * moved).sum())
    assert stats["movable_tokens"] == float((t.weight * (t.advantages != 0)).sum())
    assert stats["contrast_sum"] == pytest.approx(float((t.weight * credit).sum()), rel=1e-12)
