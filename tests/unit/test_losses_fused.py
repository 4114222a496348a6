"""opsd.losses.HeadLoss (the fused LM head + loss, issue 40) against an independent float64
reference, against the module path, and its memory.

The reference materialises the full [N, V] logits in float64 and differentiates the per-token
losses written out here from their definitions (docs/DESIGN.md, "Losses") by autograd through
torch.log_softmax: it shares no code with opsd.losses but the objectives' registry.

Tolerances, and why:
- float64 operands: loss within 1e-11 relative, gradients within 1e-9 relative (L2 norm of the
  difference over the norm): the same numbers summed in another order.
- float32 operands (CPU): loss within 2e-5 relative, gradients within 1e-4 relative: float32
  rounding of logits that are sums of H products, and of sums over V terms in the softmax.
- bfloat16 operands (CPU: the weight is cast to fp32 once per call): compared with the float64
  result of the same bf16-rounded operands, loss within 2e-5 relative (the logits are exact fp32
  products); gradients within 1e-2 relative: grad_hidden is returned in bf16 (8 bits, ~4e-3 per
  element) and grad_W is summed in fp32 and rounded to bf16 once.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from opsd.losses import HEAD_PATHS, HeadLoss, LossSpec, TokenTargets, chunked_loss, resolve_head_path
from opsd.objectives.grpo import GrpoOptions
from opsd.objectives.opsd import OpsdOptions

N, H, V, K = 37, 16, 97, 5

SPECS = {
    "divergence_topk_jsd": LossSpec(algo="opsd", temperature=0.8, options=OpsdOptions(beta=0.5, support="topk")),
    "divergence_topk_forward_kl": LossSpec(algo="opsd", options=OpsdOptions(beta=0.0, support="topk")),
    "divergence_topk_tail_reverse_kl": LossSpec(algo="opsd", temperature=1.3,
                                                options=OpsdOptions(beta=1.0, support="topk_tail")),
    "divergence_topk_tail_jsd": LossSpec(algo="opsd", options=OpsdOptions(beta=0.3, support="topk_tail")),
    "sampled_token": LossSpec(algo="opsd", temperature=0.9, options=OpsdOptions(objective="sampled_token", is_clip=1.5)),
    "grpo_rollout": LossSpec(algo="grpo", options=GrpoOptions(clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                                                              old_logprobs="rollout")),
    "grpo_learner": LossSpec(algo="grpo", options=GrpoOptions(kl_coef=0.05)),
    "sft": LossSpec(algo="sft"),
}


def opsd_spec(chunk_size: int, **options) -> LossSpec:
    return LossSpec(algo="opsd", chunk_size=chunk_size, options=OpsdOptions(**options))


def make_batch(n: int = N, seed: int = 0, h: int = H, v: int = V):
    """float64 hidden [n, h], head weight [v, h] (logits of a few units, as a model's), and every
    target field an objective may read; one zero weight and a position scale."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(h))
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    topk_lp, topk_ids = teacher.topk(K, dim=-1)
    sampled = torch.randint(0, v, (n,), generator=g)
    lp_now = torch.log_softmax(hidden @ weight.T, -1).gather(-1, sampled[:, None]).squeeze(-1)
    w = torch.ones(n, dtype=torch.float64)
    w[2] = 0.0
    targets = TokenTargets(
        sampled_ids=sampled, weight=w, topk_ids=topk_ids, topk_logprobs=topk_lp,
        teacher_logprobs=teacher.gather(-1, sampled[:, None]).squeeze(-1),
        rollout_logprobs=lp_now + 0.5 * torch.randn(n, generator=g, dtype=torch.float64),
        advantages=torch.randn(n, generator=g, dtype=torch.float64),
        ref_logprobs=lp_now + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
        scale=0.5 + torch.rand(n, generator=g, dtype=torch.float64),
    )
    return hidden, weight, targets


def reference_per_token(logits: torch.Tensor, t: TokenTargets, spec: LossSpec) -> torch.Tensor:
    """Each objective's per-token loss from its definition, on full float64 logits [N, V]."""
    logp = torch.log_softmax(logits / spec.temperature, -1)
    lp = logp.gather(-1, t.sampled_ids[:, None]).squeeze(-1)
    o = spec.options
    if spec.algo == "sft":
        return -lp
    if spec.algo == "grpo":
        old = t.rollout_logprobs if o.old_logprobs == "rollout" else lp.detach()
        ratio = torch.exp(lp - old)
        surrogate = torch.minimum(ratio * t.advantages,
                                  ratio.clamp(1 - o.clip_low, 1 + o.clip_high) * t.advantages)
        d = t.ref_logprobs - lp
        return -surrogate + o.kl_coef * (torch.exp(d) - d - 1)
    if o.objective == "sampled_token":
        weight = torch.exp(lp - t.rollout_logprobs).clamp(max=o.is_clip).detach()
        return -weight * (t.teacher_logprobs - lp).detach() * lp
    ls, lt = logp.gather(-1, t.topk_ids), t.topk_logprobs
    if o.support == "topk":
        ls, lt = torch.log_softmax(ls, -1), torch.log_softmax(lt, -1)
    else:
        outside = logp.masked_fill(torch.zeros_like(logp, dtype=torch.bool).scatter(-1, t.topk_ids, True), -math.inf)
        ls = torch.cat([ls, torch.logsumexp(outside, -1, keepdim=True)], -1)
        lt = torch.cat([lt, torch.log1p(-lt.exp().sum(-1, keepdim=True))], -1)
    ps, pt = ls.exp(), lt.exp()
    if o.beta == 0.0:
        return (pt * (lt - ls)).sum(-1)
    if o.beta == 1.0:
        return (ps * (ls - lt)).sum(-1)
    lm = torch.log(o.beta * pt + (1 - o.beta) * ps)
    return o.beta * (pt * (lt - lm)).sum(-1) + (1 - o.beta) * (ps * (ls - lm)).sum(-1)


def reference(hidden, weight, t, spec, normalizer):
    """(loss, grad hidden, grad weight) in float64 with the whole [N, V] logits."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    t64 = TokenTargets.from_fields({k: None if v is None else (v.double() if v.is_floating_point() else v)
                                    for k, v in t.fields().items()})
    per_token = reference_per_token(h @ w.T, t64, spec)
    loss = (t64.weight * t64.scale * per_token).sum() / normalizer
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused(hidden, weight, t, spec, normalizer, path="fused"):
    h = hidden.detach().clone().requires_grad_(True)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
    loss, stats = chunked_loss(h, head, t, spec, normalizer=normalizer, head_path=path)
    loss.backward()
    return loss.detach(), h.grad, head.weight.grad, stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def cast_targets(t: TokenTargets, dtype: torch.dtype) -> TokenTargets:
    return TokenTargets.from_fields({k: None if v is None else (v.to(dtype) if v.is_floating_point() else v)
                                     for k, v in t.fields().items()})


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.float64, 1e-11, 1e-9), (torch.float32, 2e-5, 1e-4),
                                                     (torch.bfloat16, 2e-5, 1e-2)])
def test_fused_gradients_equal_the_float64_reference(name, dtype, loss_tol, grad_tol):
    spec = dataclasses.replace(SPECS[name], chunk_size=8)  # 37 positions: 5 chunks, the last short
    hidden, weight, t = make_batch()
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # the reference gets the same rounded operands
    targets = t if dtype == torch.float64 else cast_targets(t, torch.float32)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, t, spec, 11.0)
    loss, gh, gw, stats = fused(hidden, weight, targets, spec, 11.0)
    assert gh.dtype == gw.dtype == dtype and gh.shape == hidden.shape and gw.shape == weight.shape
    assert abs(loss.item() - ref_loss.item()) <= loss_tol * abs(ref_loss.item())
    assert rel(gh, ref_gh) < grad_tol
    assert rel(gw, ref_gw) < grad_tol
    assert stats["tokens"] == N - 1


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_and_module_paths_give_the_same_loss_gradients_and_statistics(name):
    spec = dataclasses.replace(SPECS[name], chunk_size=8)
    hidden, weight, t = make_batch(seed=1)
    l1, gh1, gw1, s1 = fused(hidden, weight, t, spec, 5.0, path="fused")
    l2, gh2, gw2, s2 = fused(hidden, weight, t, spec, 5.0, path="module")
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh1, gh2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw1, gw2, rtol=1e-10, atol=1e-14)
    assert s1.keys() == s2.keys()
    for key in s1:
        assert s1[key] == pytest.approx(s2[key], rel=1e-10, abs=1e-12), key


def test_head_loss_gradcheck():
    """torch's numerical gradient of HeadLoss itself, float64, chunks of 3 over 7 positions."""
    hidden, weight, t = make_batch(n=7, h=4, v=11)
    spec = opsd_spec(3, beta=0.4, support="topk_tail")
    fields = t.fields()
    keys = list(fields)
    from opsd.losses import _weighted_loss  # noqa: PLC2701 - the per-chunk loss HeadLoss is given

    def run(logits, chunk_fields, stats=True):
        loss_sum, _ = _weighted_loss(spec, logits, dict(zip(keys, chunk_fields)))
        return (loss_sum, loss_sum.detach().reshape(1)) if stats else loss_sum

    def f(h, w):
        return HeadLoss.apply(h, w, run, spec.chunk_size, *fields.values())[0]

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(True), weight.requires_grad_(True)))


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    """LoRA leaves the head frozen: its weight-gradient matmul is skipped, not computed and dropped."""
    hidden, weight, t = make_batch()
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    head.weight.requires_grad_(False)
    h = hidden.clone().requires_grad_(True)
    loss, _ = chunked_loss(h, head, t, SPECS["divergence_topk_jsd"], normalizer=3.0, head_path="fused")
    loss.backward()
    _, ref_gh, _ = reference(hidden, weight, t, SPECS["divergence_topk_jsd"], 3.0)
    assert head.weight.grad is None
    assert rel(h.grad, ref_gh) < 1e-9


def saved_bytes_beyond_inputs(n: int, path: str) -> tuple[int, int]:
    """(bytes autograd saves for the backward that are not storage of the inputs, the largest
    such tensor's element count), for chunked_loss over n positions with V = 2,003 and chunks of
    16. Deterministic: counts what the saved_tensors_hooks see, not what an allocator reports."""
    hidden, weight, t = make_batch(n=n, v=2003, seed=n)
    head = torch.nn.Linear(H, 2003, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    h = hidden.clone().requires_grad_(True)
    inputs = {x.untyped_storage().data_ptr() for x in [h, head.weight, *[v for v in t.fields().values() if v is not None]]}
    extra: dict[int, int] = {}
    largest = [0]

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in inputs:
            extra[ptr] = x.untyped_storage().nbytes()
            largest[0] = max(largest[0], x.numel())
        return x

    spec = opsd_spec(16, beta=0.5, support="topk_tail")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        if path == "unchunked":
            loss = (t.weight * reference_per_token(head(h), t, spec)).sum()
        else:
            loss, _ = chunked_loss(h, head, t, spec, normalizer=1.0, head_path=path)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    return sum(extra.values()), largest[0]


def test_fused_loss_saves_nothing_that_grows_with_the_positions():
    """The fused function keeps only its inputs for the backward (they are alive anyway), at 64
    positions as at 512, where the whole-logits reference keeps several [N, V] tensors."""
    for n in (64, 512):
        assert saved_bytes_beyond_inputs(n, "fused") == (0, 0)
    small, _ = saved_bytes_beyond_inputs(64, "unchunked")
    large, largest = saved_bytes_beyond_inputs(512, "unchunked")
    assert largest >= 512 * 2003 and large >= 8 * small  # the check can see [N, V] tensors


def test_head_paths_resolve_by_device_and_head():
    head = torch.nn.Linear(4, 9, bias=False)
    cpu = torch.zeros(2, 4)
    assert resolve_head_path("auto", head, cpu) == "module"  # CPU: the path that is fastest there
    assert resolve_head_path("fused", head, cpu) == "fused"
    assert resolve_head_path("module", head, cpu) == "module"
    assert resolve_head_path("auto", torch.nn.Linear(4, 9), cpu) == "module"  # a bias: no fused path
    with pytest.raises(ValueError, match="without bias"):
        resolve_head_path("fused", torch.nn.Linear(4, 9), cpu)
    with pytest.raises(ValueError, match=str(HEAD_PATHS).replace("(", r"\(").replace(")", r"\)")):
        resolve_head_path("cast", head, cpu)


def test_the_fused_path_calls_the_head_module_once_so_its_hooks_fire():
    """ZeRO-3 gathers the head's weight in the module's forward hook: the fused path must run
    inside one call of the module (and leave the module's forward as it found it)."""
    hidden, weight, t = make_batch()
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    calls = []
    head.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    loss, _ = chunked_loss(hidden.clone().requires_grad_(True), head, t, LossSpec(chunk_size=8), normalizer=1.0,
                           head_path="fused")
    loss.backward()
    assert calls == [N]
    assert "forward" not in head.__dict__
    torch.testing.assert_close(head(hidden), hidden @ weight.T)


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages that torch ops create while it is on, deterministically on the
    CPU: each op's outputs are counted once per storage and uncounted when the last tensor on that
    storage dies (its finalizer). Storages that existed before (the inputs) are not counted."""

    def __init__(self, before: list[torch.Tensor]):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in before}
        self.refs: dict[int, int] = {}  # storage -> live tensors on it
        self.now = self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr in self.outside:
                    continue
                if ptr not in self.refs:
                    self.refs[ptr] = 0
                    self.now += nbytes
                    self.peak = max(self.peak, self.now)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr, nbytes)
        return out


def peak_bytes(n: int, path: str, v: int = 2003, chunk: int = 16) -> int:
    hidden, weight, t = make_batch(n=n, v=v, seed=n)
    head = torch.nn.Linear(H, v, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    h = hidden.clone().requires_grad_(True)
    spec = opsd_spec(chunk, beta=0.5, support="topk_tail")
    with LiveBytes([h, head.weight, *[x for x in t.fields().values() if x is not None]]) as live:
        if path == "unchunked":
            loss = (t.weight * reference_per_token(head(h), t, spec)).sum()
        else:
            loss, _ = chunked_loss(h, head, t, spec, normalizer=1.0, head_path=path)
        loss.backward()
    return live.peak


@pytest.mark.parametrize("path", ["fused", "module"])
def test_peak_memory_of_forward_and_backward_is_flat_in_the_positions(path):
    """From 64 to 512 positions the chunked paths' peak grows by the [N, H] and [N, k] tensors
    (the hidden states' gradient, per-position sums), far less than one [16, V] chunk of float64
    logits per 8 positions; the whole-logits reference grows by several [N, V] tensors."""
    grow = peak_bytes(512, path) - peak_bytes(64, path)
    one_chunk = 16 * 2003 * 8
    assert grow < 0.5 * one_chunk, (grow, one_chunk)
    full_grow = peak_bytes(512, "unchunked") - peak_bytes(64, "unchunked")
    assert full_grow > 2 * (512 - 64) * 2003 * 8  # the measure sees [N, V] tensors where they exist
