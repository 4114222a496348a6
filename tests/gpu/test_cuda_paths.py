"""The CUDA code paths that CPU runs cannot reach: the chunked loss and the teacher's forward.

Runs on a machine with torch, transformers and a GPU; needs neither ray, vllm nor deepspeed
(scripts/gpu_check.sh). Skipped without CUDA.

Tolerances, and why:
- CUDA float32 vs CPU float64 (TF32 off): loss within 1e-5 relative, gradients within 1e-4
  relative (L2 norm of the difference over the norm): float32 rounding over sums of V terms.
- bfloat16 hidden states and head vs float32: loss within 1e-2 relative, gradients within 3e-2
  relative. bf16 keeps 8 bits of mantissa (~4e-3 relative per logit); the loss upcasts the logits
  to float32 before the softmax, so the error is that of the logits, not of the softmax. On CPU the
  same comparison gives ~3e-5 (loss) and ~4e-3 (gradients).
- Peak memory: chunked (1024 positions) vs unchunked for V = 151,936, T = 8,192 must be more than
  2x smaller; fp32 logits of all positions alone are 4.6 GiB.
- Teacher targets on CUDA vs CPU (float32): log-probabilities within 1e-4 absolute; top-k ids equal
  except where two neighbouring log-probabilities are closer than that (an order swap of near-ties).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def targets_to(t, device):
    from opsd.losses import TokenTargets

    return TokenTargets(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(t).items()})


def report(name: str, data: dict) -> None:
    """Figures go to $OUT (the GPU machine's output folder) when it is set."""
    print(f"{name}: {json.dumps(data)}")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1))


# --- chunked loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("beta,support", [(0.0, "topk"), (0.5, "topk"), (1.0, "topk"), (0.5, "topk_tail")])
def test_chunked_loss_cuda_fp32_equals_cpu_fp64(beta, support):
    from opsd.benchmarks.bench import _loss_inputs, loss_forward_backward

    h, w, t = _loss_inputs(vocab=32000, tokens=1024, hidden=256, k=64, device="cpu", dtype=torch.float64)
    ref_loss, ref_gh, ref_gw = loss_forward_backward(h, w, t, 256, beta=beta, support=support)
    loss, gh, gw = loss_forward_backward(h.float().cuda(), w.float().cuda(), targets_to(t, "cuda"), 256,
                                         beta=beta, support=support)
    assert gh.is_cuda and gw.is_cuda
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel(gh, ref_gh) < 1e-4
    assert rel(gw, ref_gw) < 1e-4


def test_chunked_loss_bf16_close_to_fp32():
    from opsd.benchmarks.bench import _loss_inputs, loss_forward_backward

    h, w, t = _loss_inputs(vocab=151936, tokens=1024, hidden=1024, k=64, device="cuda", dtype=torch.float32)
    loss32, gh32, gw32 = loss_forward_backward(h, w, t, 512)
    loss16, gh16, gw16 = loss_forward_backward(h.bfloat16(), w.bfloat16(), t, 512)
    figures = {"loss_fp32": loss32.item(), "loss_bf16": loss16.item(),
               "loss_rel": abs(loss16.item() - loss32.item()) / abs(loss32.item()),
               "grad_hidden_rel": rel(gh16, gh32), "grad_head_rel": rel(gw16, gw32)}
    report("gpu_loss_bf16_vs_fp32", figures)
    assert figures["loss_rel"] < 1e-2
    assert figures["grad_hidden_rel"] < 3e-2 and figures["grad_head_rel"] < 3e-2


def test_chunked_loss_peak_memory_is_much_smaller():
    from opsd.benchmarks.bench import bench_loss

    lines: list[str] = []
    r = bench_loss(vocab=151936, tokens=8192, chunk=1024, hidden=1024, k=64, device="cuda", dtype="float32",
                   repeats=1, out=lines.append)
    print("\n".join(lines))
    report("gpu_loss_peak_memory", {k: v for k, v in r.items() if k != "machine"})
    assert r["loss_abs_diff"] <= 1e-4 * abs(r["loss_unchunked"])
    assert r["memory_ratio"] > 2, "\n".join(lines)


# --- the teacher's forward ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from opsd.assets.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3"))


def scorer(device: str, model_dir: str):
    pytest.importorskip("omegaconf", reason="opsd.config needs omegaconf (scripts/stage_gpu_pydeps.sh)")
    from opsd.config import REPO_ROOT, load_config
    from opsd.workers.scorer import ScorerWorker

    # A small forward budget so that rows are split over several padded micro-batches.
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml",
                      [f"cluster.device={device}", "scorer.max_tokens_per_forward=256", "model.dtype=float32"])
    return ScorerWorker(cfg, model_dir)


def test_scorer_teacher_targets_cuda_equals_cpu(tiny_model_dir):
    import numpy as np

    gpu, cpu = scorer("cuda", tiny_model_dir), scorer("cpu", tiny_model_dir)
    assert next(gpu.model.parameters()).is_cuda and not next(cpu.model.parameters()).is_cuda
    g = torch.Generator().manual_seed(0)
    contexts, responses = [], []
    for _ in range(9):
        contexts.append(torch.randint(5, 512, (int(torch.randint(8, 60, (1,), generator=g)),), generator=g).tolist())
        responses.append(torch.randint(5, 512, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist())

    got, want = gpu.teacher_targets(contexts, responses), cpu.teacher_targets(contexts, responses)
    k = cpu.k
    swapped = 0
    for (ids_g, lp_g, tok_g, _), (ids_c, lp_c, tok_c, _), r in zip(got, want, responses):
        assert ids_g.shape == ids_c.shape == (len(r), k) and ids_g.dtype == np.int32
        np.testing.assert_allclose(lp_g, lp_c, atol=1e-4, rtol=0)
        np.testing.assert_allclose(tok_g, tok_c, atol=1e-4, rtol=0)
        differ = ids_g != ids_c
        if differ.any():
            # Only near-ties may change order: each differing slot sits next to a close neighbour.
            gaps = np.abs(np.diff(lp_c, axis=1))
            near = np.zeros_like(differ)
            near[:, 1:] |= gaps < 1e-4
            near[:, :-1] |= gaps < 1e-4
            assert not (differ & ~near).any()
            swapped += int(differ.sum())
    total = sum(len(r) for r in responses) * k
    assert swapped <= 0.01 * total


# --- the fp32 LM head on CUDA -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_lm_head_cuda_half_matmul_gives_the_float64_logits(dtype):
    """Without a gradient (the scorer) the fp32 head on CUDA runs a half-precision matmul with fp32
    accumulation and output (opsd.losses._half_mm_to_fp32); with one (the learner) it casts. Both
    must give the float64 logits of the half-precision operands to fp32 summation error and keep
    the [B, T, H] shape; the cast path carries the gradient to the half weight."""
    from opsd.losses import fp32_lm_head

    g = torch.Generator().manual_seed(0)
    vocab, hidden_size = 32000, 2048
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=g) * 0.05)
    head = fp32_lm_head(head.to("cuda", dtype))
    h = (torch.randn(2, 96, hidden_size, generator=g) * 1.5).to("cuda", dtype)
    exact = h.double() @ head.weight.double().T
    scale = exact.abs().max().item()
    assert 10 < scale < 100  # a real model's logit range
    with torch.no_grad():
        fast = head(h)
    with_grad = head(h)
    assert with_grad.requires_grad and not fast.requires_grad
    for logits in (fast, with_grad):
        assert logits.dtype == torch.float32 and logits.shape == (2, 96, vocab)
        # fp32 rounding of a sum of 2,048 exact products: ~1e-6 of the logits' scale
        err = (logits.double() - exact).abs().max().item()
        assert err < 1e-5 * scale, err
    target = torch.randint(0, vocab, (2, 96), generator=g).cuda()
    torch.log_softmax(with_grad, dim=-1).gather(-1, target[..., None]).sum().backward()
    w64 = head.weight.detach().double().requires_grad_(True)
    torch.log_softmax(h.double() @ w64.T, dim=-1).gather(-1, target[..., None]).sum().backward()
    assert head.weight.grad.dtype == dtype
    assert rel(head.weight.grad, w64.grad) < 1e-2
