"""opsd.losses.HeadLoss on CUDA (issue 40): its tensor-core matmuls against the float64 reference of
tests/unit/test_losses_fused.py, and against the module path at Qwen3-1.7B's head. Skipped without CUDA.

Tolerances, and why:
- bfloat16 operands, fused path (bf16 matmuls with fp32 accumulation and output) vs the float64
  result of the same bf16-rounded operands: loss within 1e-4 relative (the logits are exact
  products summed in fp32); gradients within 2e-2 relative (L2 norm): dlogits are rounded to bf16
  before the two backward matmuls (~4e-3 per element) and grad_hidden is returned in bf16.
- float32 operands (TF32 off): loss within 2e-5 relative, gradients within 1e-4, as on the CPU.
- At Qwen3-1.7B's head (V = 151,936, H = 2,048, 4,096 positions, bf16), fused vs module path:
  loss within 1e-4 relative, gradients within 2e-2 relative, and the fused path's peak memory no
  more than the module path's plus 10 %.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from tests.gpu.test_cuda_paths import report  # figures to $OUT on the GPU machine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old




def to_cuda(t, dtype=None):
    from opsd.losses import TokenTargets

    return TokenTargets.from_fields({k: None if v is None else v.to("cuda", dtype if dtype and v.is_floating_point()
                                                                     else v.dtype)
                                     for k, v in t.fields().items()})


@pytest.mark.parametrize("name", ["divergence_topk_jsd", "divergence_topk_forward_kl", "divergence_topk_tail_reverse_kl",
                                  "divergence_topk_tail_jsd", "sampled_token", "grpo_rollout", "grpo_learner", "sft"])
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.bfloat16, 1e-4, 2e-2), (torch.float32, 2e-5, 1e-4)])
def test_fused_cuda_gradients_equal_the_float64_reference(name, dtype, loss_tol, grad_tol):
    from opsd import losses
    from opsd.losses import LossSpec
    from tests.unit.test_losses_fused import SPECS, fused, make_batch, reference, rel

    spec = dataclasses.replace(SPECS[name], chunk_size=64)
    hidden, weight, t = make_batch(n=300, h=256, v=4099, seed=3)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, t, spec, 250.0)
    loss, gh, gw, _ = fused(hidden.cuda(), weight.cuda(), to_cuda(t, torch.float32), spec, 250.0)
    assert gh.is_cuda and gh.dtype == gw.dtype == dtype
    if dtype == torch.bfloat16:  # the tensor-core path ran, not the cast fallback
        assert losses._HALF_MM_TO_FP32["available"]
    assert abs(loss.item() - ref_loss.item()) <= loss_tol * abs(ref_loss.item())
    assert rel(gh.cpu(), ref_gh) < grad_tol
    assert rel(gw.cpu(), ref_gw) < grad_tol


def run_path(h, w, t, path):
    from opsd.losses import LossSpec, chunked_loss, fp32_lm_head
    from opsd.objectives.opsd import OpsdOptions

    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=w.dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    fp32_lm_head(head)  # the module path as the learner runs it: the fp32 head by cast
    x = h.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss, _ = chunked_loss(x, head, t, LossSpec(chunk_size=1024, options=OpsdOptions(beta=0.5, support="topk")), normalizer=float(len(x)),
                           head_path=path)
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), x.grad, head.weight.grad, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base


def test_fused_against_the_module_path_at_qwen3_1_7b_head():
    from opsd import losses
    from opsd.benchmarks.bench import _loss_inputs
    from tests.unit.test_losses_fused import rel

    h, w, t = _loss_inputs(vocab=151936, tokens=4096, hidden=2048, k=64, device="cuda", dtype=torch.bfloat16)
    figures = {}
    results = {}
    for path in ("module", "fused", "module", "fused"):  # the second of each is timed warm
        results[path] = run_path(h, w, t, path)
    (lm, ghm, gwm, sm, pm), (lf, ghf, gwf, sf, pf) = results["module"], results["fused"]
    figures = {"loss_rel": abs(lf.item() - lm.item()) / abs(lm.item()), "grad_hidden_rel": rel(ghf, ghm),
               "grad_head_rel": rel(gwf, gwm), "module_seconds": sm, "fused_seconds": sf, "speedup": sm / sf,
               "module_peak_mib": pm / 2**20, "fused_peak_mib": pf / 2**20,
               # grad_W accumulated in place by addmm with out_dtype (else a product per chunk is added)
               "addmm_out_dtype": losses._HALF_MM_TO_FP32["addmm"]}
    report("gpu_head_loss_fused_vs_module", figures)
    assert figures["loss_rel"] < 1e-4
    assert figures["grad_hidden_rel"] < 2e-2 and figures["grad_head_rel"] < 2e-2
    assert pf <= 1.1 * pm
