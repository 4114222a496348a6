#!/usr/bin/env python
"""The teacher's scoring and the learner's loss at Qwen3-1.7B's shape on one CUDA GPU, against
that GPU's limits (docs/BENCHMARKS.md, "On a GPU"; issue 26, item 4).

Needs torch and transformers only (no Ray, vLLM, DeepSpeed, omegaconf or pyarrow) and no network:
the model has Qwen3-1.7B's configuration with random weights, built on the GPU. It runs the code
opsd runs:

- scorer: opsd.scoring.teacher_targets (the scorer actor's forward, top-k extraction and the copy
  of the targets to host memory included) on 32,768 tokens per forward (configs/qwen3-1.7b.yaml's
  scorer.max_tokens_per_forward) in rows of 2,048 and 8,192 tokens, a quarter of each row the
  teacher's context and the rest the response; with the LM head in fp32 (model.fp32_lm_head, the
  default) and in bf16. The decoder alone and the top-k stage alone (head, log-softmax, top-k, copy
  to host, on random hidden states) are timed too.
- learner: the learner's forward (decoder, then opsd.losses.chunked_loss on the response positions,
  the fp32 head, chunks of 1,024) and backward on 8,192 tokens per micro-batch, with and without
  gradient checkpointing, with the head and loss on each model.lm_head_path (module: the fp32 head
  by cast per chunk, before issue 40; fused: opsd.losses.HeadLoss, bf16 tensor-core matmuls with
  fp32 output), and the whole update (that and the optimizer step: DeepSpeed's bf16 engine's fp32
  master weights, gradient clipping and AdamW, emulated with torch's fused AdamW; no DeepSpeed on a
  GPU machine without network). Every weight trainable, then the recipe's LoRA adapters (peft).

Limits, both kinds reported: the spec sheet's dense bf16 FLOP/s and memory bandwidth where the GPU's
name is known (SPECS), and what this script measures on the GPU (an 8192^3 bf16 matmul, a device
copy of 2 GiB). FLOPs counted: 2 per multiply-add of every linear layer; attention 4 T^2 d per layer
halved for the causal mask; the head 2 H V per scored position; a backward twice its forward
(with LoRA once, the frozen weights' gradients not being computed, plus the adapters' own).
Recomputation (gradient checkpointing, the chunked head) is not counted as useful work.

    python scripts/gpu_roofline.py [--json OUT.json] [--tiny] [--parts scorer learner]
        [--head-paths module fused] [--weights full lora] [--lengths 2048 8192] [--checkpointing on off]

--tiny runs a small model on whatever device there is, CPU included (a check of the script, not a
figure; tests/unit/test_gpu_roofline.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opsd.losses import LossSpec, TokenTargets, chunked_loss, fp32_lm_head  # noqa: E402
from opsd.objectives.opsd import OpsdOptions  # noqa: E402
from opsd.scoring import pad_right, targets_from_hidden, teacher_targets  # noqa: E402

# Dense (no sparsity) bf16 tensor-core FLOP/s and memory bandwidth from the vendors' data sheets.
SPECS = {
    "H200": (989e12, 4.8e12),
    "H100 80GB HBM3": (989e12, 3.35e12),  # SXM
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "A100-SXM4-80GB": (312e12, 2.039e12),
    "A100-SXM4-40GB": (312e12, 1.555e12),
    "L40S": (362e12, 0.864e12),
}

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(QWEN3_1_7B, vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def limits(device: torch.device, tiny: bool) -> dict:
    """The spec sheet's peaks (when the GPU is known) and the measured ones."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = next((v for k, v in SPECS.items() if k in name), (None, None))
    n = 1024 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, device, 3 if tiny else 10)
    src = torch.empty(2**(24 if tiny else 30), device=device, dtype=torch.bfloat16)  # 2 GiB on a GPU
    dst = torch.empty_like(src)
    cp = timed(lambda: dst.copy_(src), device, 3 if tiny else 10)
    return {"gpu": name, "spec_flops": spec[0], "spec_bytes_per_s": spec[1],
            "measured_flops": 2 * n**3 / mm, "measured_bytes_per_s": 2 * 2 * 2**(24 if tiny else 30) / cp}


def build_model(shape: dict, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(**shape)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def flops(shape: dict, model, seq_len: int, rows: int, scored: int) -> dict:
    """Forward FLOPs of ``rows`` sequences of ``seq_len`` tokens with ``scored`` head positions."""
    # The model's own linear layers; LoRA's adapters (peft's lora_A / lora_B) are counted apart.
    layer_params = sum(m.weight.numel() for name, m in model.get_decoder().layers.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    attn_width = shape["num_attention_heads"] * shape["head_dim"]
    decoder = rows * (2 * layer_params * seq_len + 2 * seq_len**2 * attn_width * shape["num_hidden_layers"])
    head = 2 * shape["hidden_size"] * shape["vocab_size"] * scored
    return {"decoder": decoder, "head": head, "layer_params": layer_params}


def scorer_rows(shape: dict, seq_len: int, total: int):
    g = torch.Generator().manual_seed(seq_len)
    rows = max(1, total // seq_len)
    ctx = seq_len // 4
    ids = torch.randint(0, shape["vocab_size"], (rows, seq_len), generator=g).tolist()
    return [r[:ctx] for r in ids], [r[ctx:] for r in ids]


def bench_scorer(shape: dict, model, limits_: dict, seq_len: int, total: int, fp32_head: bool,
                 device: torch.device, repeats: int) -> dict:
    contexts, responses = scorer_rows(shape, seq_len, total)
    head = model.get_output_embeddings()
    plain_forward = head.forward
    if fp32_head:
        fp32_lm_head(head)
    try:
        def score():
            return teacher_targets(model, contexts, responses, k=64, temperature=1.0, chunk_size=1024,
                                   max_tokens=total, pad_id=0)

        def decoder_only():
            with torch.no_grad():
                ids, mask = pad_right([c + r for c, r in zip(contexts, responses)], 0)
                model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

        scored = sum(len(r) for r in responses)
        hidden = torch.randn(scored, shape["hidden_size"], device=device, dtype=torch.bfloat16)
        sampled = torch.randint(0, shape["vocab_size"], (scored,), device=device)

        @torch.no_grad()
        def topk_only():  # the head, log-softmax, top-k and the copy to host of each chunk
            for c in range(0, scored, 1024):
                parts = targets_from_hidden(hidden[c : c + 1024], sampled[c : c + 1024], head, k=64,
                                            temperature=1.0, topk=True)
                [x.cpu() for x in parts if x is not None]

        t_all = timed(score, device, repeats)
        t_dec = timed(decoder_only, device, repeats)
        t_top = timed(topk_only, device, repeats)
    finally:
        head.forward = plain_forward
    tokens = len(contexts) * seq_len
    f = flops(shape, model, seq_len, len(contexts), scored)
    chunks = -(-scored // 1024)
    # Least traffic of the top-k stage: the head's bf16 weight read per chunk (the fp32 head without
    # a gradient is a bf16 matmul with fp32 output, opsd.losses.fp32_lm_head) and the [n, V] fp32
    # logits written once and read once.
    topk_bytes = chunks * 2 * shape["hidden_size"] * shape["vocab_size"] + 8 * scored * shape["vocab_size"]
    return {"seq_len": seq_len, "rows": len(contexts), "tokens": tokens, "scored": scored, "fp32_head": fp32_head,
            "seconds": t_all, "decoder_seconds": t_dec, "topk_seconds": t_top,
            "tokens_per_s": tokens / t_all, "decoder_tflops": f["decoder"] / t_dec / 1e12,
            "topk_tflops": f["head"] / t_top / 1e12, "topk_gb_per_s": topk_bytes / t_top / 1e9,
            "flops": f["decoder"] + f["head"],
            "floor_seconds": floor(f["decoder"] + f["head"], topk_bytes, limits_)}


def floor(n_flops: float, n_bytes: float, lim: dict) -> dict:
    """The least time the work could take at the spec and at the measured limits."""
    out = {}
    for kind in ("spec", "measured"):
        peak, bw = lim[f"{kind}_flops"], lim[f"{kind}_bytes_per_s"]
        if peak and bw:
            out[kind] = max(n_flops / peak, n_bytes / bw)
    return out


def loss_targets(n: int, vocab: int, device: torch.device, seed: int) -> TokenTargets:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, 64), generator=g)
    lp = torch.log_softmax(torch.randn(n, 64, generator=g) * 2, dim=-1) + torch.log(torch.tensor(0.9))
    return TokenTargets(sampled_ids=ids[:, 0].to(device), weight=torch.ones(n, device=device),
                        topk_ids=ids.to(device), topk_logprobs=lp.to(device), teacher_logprobs=lp[:, 0].to(device))


# configs/qwen3-1.7b.yaml's model.lora (opsd.config.LoraConfig's defaults too): the adapters the recipe
# trains. Written out so that this script needs no omegaconf; tests/unit/test_gpu_roofline.py checks it.
RECIPE_LORA = dict(r=64, alpha=128, dropout=0.0,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def with_lora(model):
    """The model with the recipe's LoRA adapters (peft), in the model's dtype as DeepSpeed's bf16 engine
    holds them; only the adapters train."""
    from types import SimpleNamespace

    from peft import get_peft_model

    from opsd.lora import peft_config

    dtype = next(model.parameters()).dtype
    return get_peft_model(model, peft_config(SimpleNamespace(**RECIPE_LORA))).to(dtype)


class MasterAdamW:
    """The learner's optimizer step as DeepSpeed's bf16 engine takes it, in torch alone: the bf16
    gradients copied into fp32 ones of fp32 master weights, clipped at the recipe's norm (1.0),
    torch's fused AdamW on the masters (fp32 moments), the result copied back into the bf16
    weights. In fp32 the weights are their own masters."""

    def __init__(self, params: list, lr: float = 2e-4):
        self.params = params
        half = params[0].dtype != torch.float32
        self.masters = [p.detach().float().clone() if half else p for p in params]
        fused = params[0].is_cuda
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=fused, foreach=None if fused else True)

    def step(self) -> None:
        if self.masters[0] is not self.params[0]:
            for m, p in zip(self.masters, self.params):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(self.masters, 1.0, foreach=True)
        self.opt.step()
        if self.masters[0] is not self.params[0]:
            torch._foreach_copy_([p.data for p in self.params], self.masters)
        for p in self.params:
            p.grad = None

    @staticmethod
    def least_bytes(params: list) -> int:
        """What the step reads and writes at least: the gradient (read), the fp32 gradient (written,
        read), the master and both moments (read and written), the weight (written)."""
        return sum(p.numel() * (2 * p.element_size() + 4 * 2 + 3 * 4 * 2) for p in params)


def bench_learner(shape: dict, model, limits_: dict, seq_len: int, total: int, checkpointing: bool,
                  device: torch.device, repeats: int, head_path: str = "module", lora: bool = False) -> dict:
    """The learner's forward + backward, and its whole update (that and the optimizer step), on
    ``total`` tokens in rows of ``seq_len``; ``head_path``: model.lm_head_path (module: the fp32
    head by cast per chunk, the learner before issue 40; fused: opsd.losses.HeadLoss)."""
    contexts, responses = scorer_rows(shape, seq_len, total)
    rows = len(contexts)
    ids = torch.tensor([c + r for c, r in zip(contexts, responses)], device=device)
    mask = torch.ones_like(ids)
    ctx = len(contexts[0])
    sel_rows = torch.arange(rows, device=device).repeat_interleave(seq_len - ctx)
    sel_cols = torch.arange(ctx - 1, seq_len - 1, device=device).repeat(rows)
    targets = loss_targets(len(sel_rows), shape["vocab_size"], device, seq_len)
    spec = LossSpec(chunk_size=1024, options=OpsdOptions(beta=0.5, support="topk"))
    head = fp32_lm_head(model.get_output_embeddings())
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def forward_backward():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        loss, _ = chunked_loss(hidden[sel_rows, sel_cols], head, targets, spec, normalizer=float(len(sel_rows)),
                               head_path=head_path)
        loss.backward()

    def step():
        forward_backward()
        for p in trainable:  # gradients kept allocated, as an accumulating engine keeps them
            p.grad.zero_()

    optimizer = MasterAdamW(trainable)

    def update():
        forward_backward()
        optimizer.step()

    update_seconds = timed(update, device, repeats)  # its warm-up call makes the optimizer's state
    forward_backward()  # ...and this the gradients: the peak below is above weights, gradients and state
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    model.zero_grad(set_to_none=True)
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.eval()
    model.gradient_checkpointing_disable()
    f = flops(shape, model, seq_len, rows, len(sel_rows))
    adapters = sum(p.numel() for p in trainable) if lora else 0
    # A backward is twice its forward where the weights train (activations' and weights' gradients);
    # with LoRA the frozen weights' gradients are not computed: once its forward, and 3x for the
    # adapters' own matmuls (2 FLOPs per multiply-add of each adapter weight per token).
    useful = (2 * (f["decoder"] + f["head"]) + 3 * 2 * adapters * rows * seq_len if lora
              else 3 * (f["decoder"] + f["head"]))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    opt_bytes = MasterAdamW.least_bytes(trainable)
    fb_floor = floor(useful, 2 * weight_bytes + grad_bytes, limits_)
    tokens = rows * seq_len
    return {"seq_len": seq_len, "rows": rows, "tokens": tokens, "loss_positions": len(sel_rows),
            "checkpointing": checkpointing, "head_path": head_path, "lora": lora,
            "trainable_params": sum(p.numel() for p in trainable),
            "seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": useful / seconds / 1e12, "flops": useful,
            "update_seconds": update_seconds, "update_tokens_per_s": tokens / update_seconds,
            "update_tflops": useful / update_seconds / 1e12, "optimizer_seconds": update_seconds - seconds,
            "peak_gib": peak / 2**30, "base_gib": base / 2**30,
            "peak_above_weights_and_grads_gib": (peak - base) / 2**30 if peak else 0.0,
            "weights_gib": weight_bytes / 2**30,
            # weights read twice and gradients written once: a floor far below the FLOP one
            "floor_seconds": fb_floor,
            # ...then the optimizer's traffic, all bytes and no counted FLOPs, after the backward
            "update_floor_seconds": {k: v + opt_bytes / limits_[f"{k}_bytes_per_s"] for k, v in fb_floor.items()}}


def table(res: dict) -> str:
    lim = res["limits"]
    peak = lim["spec_flops"] or lim["measured_flops"]
    lines = [f"GPU {lim['gpu']}: spec {fmt(lim['spec_flops'], 1e12)} TFLOP/s bf16, {fmt(lim['spec_bytes_per_s'], 1e12)} TB/s; "
             f"measured {lim['measured_flops'] / 1e12:.0f} TFLOP/s (bf16 matmul), {lim['measured_bytes_per_s'] / 1e12:.2f} TB/s (copy)",
             "", "| scorer | T | rows | fp32 head | tokens/s | s | decoder s | top-k s | decoder TFLOP/s | top-k TFLOP/s | top-k GB/s | of peak | floor s (spec) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["scorer"]:
        lines.append(f"| | {r['seq_len']} | {r['rows']} | {r['fp32_head']} | {r['tokens_per_s']:,.0f} | {r['seconds']:.3f} | "
                     f"{r['decoder_seconds']:.3f} | {r['topk_seconds']:.3f} | {r['decoder_tflops']:.0f} | {r['topk_tflops']:.0f} | "
                     f"{r['topk_gb_per_s']:.0f} | {r['flops'] / r['seconds'] / peak:.0%} | {fmt(r['floor_seconds'].get('spec'), 1, '.3f')} |")
    lines += ["", "| learner | T | rows | weights | head path | checkpointing | fwd+bwd tokens/s | s | TFLOP/s | of peak "
              "| x floor | update tokens/s | update s | optimizer s | update of peak | update x floor | peak GiB "
              "| above weights+grads+state GiB |",
              "| --- " * 18 + "|"]
    for r in res["learner"]:
        fl, ufl = r["floor_seconds"].get("spec"), r["update_floor_seconds"].get("spec")
        lines.append(f"| | {r['seq_len']} | {r['rows']} | {'LoRA' if r['lora'] else 'full'} | {r['head_path']} | "
                     f"{r['checkpointing']} | {r['tokens_per_s']:,.0f} | {r['seconds']:.3f} | {r['tflops']:.0f} | "
                     f"{r['flops'] / r['seconds'] / peak:.0%} | {fmt(fl and r['seconds'] / fl, 1, '.1f')} | "
                     f"{r['update_tokens_per_s']:,.0f} | {r['update_seconds']:.3f} | {r['optimizer_seconds']:.3f} | "
                     f"{r['flops'] / r['update_seconds'] / peak:.0%} | {fmt(ufl and r['update_seconds'] / ufl, 1, '.1f')} | "
                     f"{r['peak_gib']:.1f} | {r['peak_above_weights_and_grads_gib']:.1f} |")
    return "\n".join(lines)


def fmt(x, scale, spec=".0f") -> str:
    return "n/a" if x is None else format(x / scale, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_roofline.json"))
    p.add_argument("--tiny", action="store_true", help="a small model on any device (CPU too): checks the script")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", choices=("scorer", "learner"), default=["scorer", "learner"])
    p.add_argument("--head-paths", nargs="+", choices=("module", "fused"), default=["module", "fused"],
                   help="the learner's model.lm_head_path, before (module) and after (fused) issue 40, in this call")
    p.add_argument("--weights", nargs="+", choices=("full", "lora"), default=["full", "lora"],
                   help="the learner trains every weight, or the recipe's LoRA adapters (needs peft)")
    p.add_argument("--lengths", type=int, nargs="+", help="row lengths (default 2048 8192; --tiny 128 256)")
    p.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny to check the script on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # opsd's default: the fp32 head is true fp32
    shape = TINY if args.tiny else QWEN3_1_7B
    total = 512 if args.tiny else 32768
    lengths = args.lengths or ((128, 256) if args.tiny else (2048, 8192))
    res = {"torch": torch.__version__, "shape": shape, "limits": limits(device, args.tiny), "scorer": [], "learner": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep(part: str, row: dict) -> None:  # every row on disk at once: a timeout keeps what was measured
        res[part].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(res, indent=1))

    print(json.dumps(res["limits"]), flush=True)
    model = build_model(shape, device)
    model.eval()
    if "scorer" in args.parts:
        for seq_len in lengths:
            for fp32_head in (True, False):
                keep("scorer", bench_scorer(shape, model, res["limits"], seq_len, total, fp32_head, device, args.repeats))
    if "learner" in args.parts:
        for weights in args.weights:  # full first: peft changes the model in place
            if weights == "lora":
                model = with_lora(model)
            for seq_len in lengths:
                for ckpt in args.checkpointing:
                    for path in args.head_paths:
                        keep("learner", bench_learner(shape, model, res["limits"], seq_len, total // 4, ckpt == "on",
                                                      device, args.repeats, path, weights == "lora"))
    res["table"] = table(res)
    print(res["table"])
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
