"""Per-token objectives for OPSD, GRPO and SFT, and the chunked driver the learner calls.

Every objective is a pure function from per-token tensors to a per-token loss ``[N]``; the learner
flattens the batch to the N positions that count and hands them to :func:`chunked_loss`, which
adds the vocabulary projection chunk by chunk so that only one chunk's ``[n, V]`` logits exist at
any time, in the forward pass and in the backward pass.

Divergence conventions (docs/DESIGN.md, "Losses"), with p_T the teacher and p_S the student:

- ``beta = 0``: forward KL(p_T || p_S)
- ``beta = 1``: reverse KL(p_S || p_T)
- ``0 < beta < 1``: generalized JSD with mixture m = beta p_T + (1 - beta) p_S,
  ``JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)``

JSD_beta vanishes as beta -> 0 or 1; the endpoints are the limits of JSD_beta / beta and
JSD_beta / (1 - beta), so the loss scale jumps at the ends (beta = 0.01 is roughly 0.01 x forward
KL).

Global token mean: the OPSD and GRPO losses are a mean over every loss token of the global batch
(all gradient-accumulation micro-batches on all ranks), not a mean of per-sample or per-micro-batch
means. Each call of :func:`chunked_loss` therefore divides its *sum* of weighted token losses by
``normalizer`` = the global number of loss tokens of the optimizer step (sum of ``weight`` over
everything), which the caller computes once before the micro-batches (an all-reduce of the local
counts). Summing the gradients of all micro-batches on all ranks then gives the gradient of the
full-batch token mean. An engine that averages gradients over W ranks and scales each
micro-batch loss by 1 / G accumulation steps (DeepSpeed's ``engine.backward`` does both) needs
``normalizer / (W * G)`` to undo those factors; the caller knows its engine, this module does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

OBJECTIVES = ("divergence", "sampled_token")  # loss.objective: the two forms of OPSD's loss
SUPPORTS = ("topk", "topk_tail")
CLIP_MODES = ("pointwise", "scale")


def fp32_lm_head(head: torch.nn.Module) -> torch.nn.Module:
    """Make ``head`` (the LM head, an ``nn.Linear``) compute its logits as a float32 matmul
    whenever its weight or input is bf16 / fp16; returns ``head``, changed in place.

    A bf16 matmul rounds every logit to 8 significant bits: at logits of 20-40 a step of
    0.125-0.25 nats, which is the size of the differences the divergences measure. Only the
    forward of this module instance changes, so it is still called as a module and its hooks
    (ZeRO-3 gathers the weight in one) still fire; the weight is cast per call, and autograd
    carries its gradient back to the half-precision parameter.
    """
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fp32_lm_head expects the model's nn.Linear LM head, got {type(head).__name__}; "
                        "set model.fp32_lm_head=false for this model")

    def forward(hidden: Tensor) -> Tensor:
        weight, bias = head.weight, head.bias
        if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
            return F.linear(hidden, weight, bias)
        if _half_mm_to_fp32(hidden, weight, bias):
            # The product of two bf16 (or two fp16) numbers is exact in fp32, so a half-precision
            # tensor-core matmul that accumulates and writes fp32 gives the fp32 matmul's logits (up
            # to summation order) without the [V, H] fp32 copy of the weight per call: 4x faster
            # top-k extraction at Qwen3-1.7B's shape on an H200 (docs/BENCHMARKS.md, "On a GPU").
            try:
                flat = torch.mm(hidden.reshape(-1, hidden.shape[-1]), weight.t(), out_dtype=torch.float32)
                return flat.view(*hidden.shape[:-1], weight.shape[0])
            except TypeError:  # a torch whose mm has no out_dtype: cast, from now on
                _HALF_MM_TO_FP32["available"] = False
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())

    head.forward = forward
    return head


_HALF_MM_TO_FP32 = {"available": True, "addmm": True}  # mm's and addmm's out_dtype, until one fails


def _half_mm_to_fp32(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether torch.mm(..., out_dtype=float32) serves this call: CUDA only (torch has no CPU
    kernel for it), both operands of the same half type, no bias, and no gradient wanted (torch
    has no derivative for it: the scorer's forward uses it, the learner's loss keeps the cast)."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return (_HALF_MM_TO_FP32["available"] and weight.is_cuda and hidden.is_cuda and bias is None
            and hidden.dtype == weight.dtype and weight.dtype in (torch.bfloat16, torch.float16) and not wants_grad)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits lose the small probabilities that the divergences live on; float64 stays
    # float64 so that gradcheck and exact tests can run through the same code.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_floor(dtype: torch.dtype) -> float:
    # log of the smallest normal number: a zero probability becomes ~1e-38 (float32), so 0 * log 0
    # contributes ~1e-36 instead of NaN, and every log is finite, which keeps gradients finite.
    return math.log(torch.finfo(dtype).tiny)


def _check_divergence_args(beta: float, support: str, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def student_logprobs(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def divergence_from_logprobs(
    logp: Tensor,  # [N, V] student log-softmax, temperature applied
    topk_ids: Tensor,  # [N, k]
    topk_logprobs: Tensor,  # [N, k] teacher, over the full vocabulary
    beta: float,
    support: str,
    *,
    clip: float | None = None,
    clip_mode: str = "pointwise",
) -> Tensor:  # [N]
    """The per-position divergence of :func:`token_divergence` from the student's log-softmax,
    with the optional per-token divergence clip (``loss.divergence_clip``):

    - ``pointwise`` (the OPSD authors' code, March 2026): each category's term of the sum is
      capped at ``clip`` before the sum, sum_v min(d_v, clip), so a category whose term is over
      the cap carries no gradient and the others keep theirs;
    - ``scale``: the token's divergence D is capped at ``clip`` by scaling, D * min(1, clip / D) with
      the factor held constant, so the token's gradient is scaled down to at most clip's worth
      instead of removed (``loss.token_clip``, which caps D itself, removes it).
    """
    dtype = logp.dtype
    floor = _log_floor(dtype)
    topk_ids = topk_ids.long()
    ls = logp.gather(-1, topk_ids).clamp_min(floor)  # [N, k]
    # -inf (a masked-out token) is a legal teacher logprob; the floor turns it into a tiny mass.
    lt = topk_logprobs.detach().to(dtype).clamp_min(floor)  # [N, k]

    if support == "topk":
        ls = ls - torch.logsumexp(ls, dim=-1, keepdim=True)
        lt = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    else:
        # Student tail as the sum over the complement, not 1 - sum(top-k): the subtraction would
        # round a 1e-9 tail to 0 in float32. Probabilities are <= 1, so the plain sum cannot
        # overflow.
        outside = torch.ones_like(logp, dtype=torch.bool).scatter_(-1, topk_ids, False)  # [N, V]
        tail_s = (logp.exp() * outside).sum(-1, keepdim=True)  # [N, 1]
        # Float64 for the teacher's 1 - sum: the large logprobs sit near 0 where float32 is exact,
        # so the error is in the summation, and float64 keeps tails down to ~1e-16.
        tail_t = 1.0 - lt.double().exp().sum(-1, keepdim=True)  # [N, 1]
        # clamp_min also zeroes the gradient of a vanished tail instead of producing inf * 0.
        ls = torch.cat([ls, tail_s.clamp_min(torch.finfo(dtype).tiny).log()], dim=-1)  # [N, k+1]
        lt_tail = tail_t.clamp_min(torch.finfo(dtype).tiny).log().to(dtype)
        lt = torch.cat([lt, lt_tail], dim=-1)  # [N, k+1]

    ps, pt = ls.exp(), lt.exp()
    pointwise = clip is not None and clip_mode == "pointwise"
    if beta == 0.0:
        terms = [pt * (lt - ls)]  # [N, k(+1)] each
    elif beta == 1.0:
        terms = [ps * (ls - lt)]
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log m
        terms = [beta * (pt * (lt - lm)), (1.0 - beta) * (ps * (ls - lm))]
    if pointwise:
        terms = [sum(terms).clamp(max=clip)]
    divergence = sum(t.sum(-1) for t in terms)
    if clip is not None and clip_mode == "scale":
        factor = (clip / divergence.detach().clamp_min(torch.finfo(dtype).tiny)).clamp(max=1.0)
        divergence = divergence * factor
    return divergence


def token_divergence(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float,
    support: str,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position divergence between student and teacher on the teacher's top-k support.

    Args:
        student_logits: ``[N, V]`` raw logits; divided by ``temperature`` here.
        topk_ids: ``[N, k]`` the teacher's top-k token ids at each position, distinct per row.
        topk_logprobs: ``[N, k]`` the teacher's log-probabilities of those ids over the full
            vocabulary, temperature already applied (so their probabilities sum to <= 1);
            ``-inf`` is allowed. Not differentiated.
        beta: 0 forward KL(p_T || p_S), 1 reverse KL(p_S || p_T), in between generalized JSD.
        support: ``"topk"`` renormalises both distributions over the k ids; ``"topk_tail"`` adds a
            (k+1)-th category holding each distribution's remaining mass. The tail variant is a
            coarse-graining of the vocabulary, so it never exceeds the full-vocabulary divergence
            and equals it when k = V.

    Returns:
        ``[N]`` divergence per position, float32 (float64 for float64 logits), differentiable
        w.r.t. ``student_logits``. Probabilities are floored at the dtype's smallest normal
        number, so zero masses add ~0 and the result stays finite where reverse KL would be
        infinite (a teacher probability of 0 under a positive student probability).
    """
    _check_divergence_args(beta, support, temperature)
    if student_logits.dim() != 2 or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"expected student_logits [N, V] and topk_ids/topk_logprobs [N, k]; got "
            f"{tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}"
        )
    logp = student_logprobs(student_logits, temperature)
    return divergence_from_logprobs(logp, topk_ids, topk_logprobs, beta, support)


def sampled_token_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    rollout_logprobs: Tensor | None = None,
    *,
    is_clip: float | None = None,
) -> Tensor:
    """Policy-gradient surrogate on the sampled tokens, with the teacher as the reward.

    With ``lp_S = student_logprobs``, ``lp_T = teacher_logprobs`` and ``lp_R = rollout_logprobs``
    (all ``[N]``, log-probabilities of the sampled token):

        A    = stopgrad(lp_T - lp_S)
        w    = stopgrad(min(exp(lp_S - lp_R), is_clip))   (w = 1 without rollout_logprobs;
                                                           no cap when is_clip is None)
        loss = -w * A * lp_S

    so ``grad loss = -w * A * grad lp_S``: the per-token reverse-KL policy gradient, corrected by a
    truncated importance ratio when the tokens came from an older (or numerically different)
    behaviour policy. The loss value itself is a surrogate; read the gap from ``A``.
    """
    adv = (teacher_logprobs - student_logprobs).detach()
    loss = -adv * student_logprobs
    if rollout_logprobs is not None:
        ratio = torch.exp(student_logprobs - rollout_logprobs).detach()
        if is_clip is not None:
            ratio = ratio.clamp(max=is_clip)
        loss = loss * ratio
    return loss


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, scale_std: bool = True
) -> Tensor:
    """Group-normalised advantages ``(r - mean_g) / (std_g + eps)``.

    Args:
        rewards: ``[B]`` one scalar reward per sample.
        group_ids: ``[B]`` integer group key per sample (samples of the same prompt share one);
            values need not be contiguous or sorted.
        scale_std: divide by the group std; ``False`` only centres.

    ``std_g`` is the sample standard deviation (Bessel-corrected, n - 1), as torch.std and the
    common GRPO implementations compute it. A group of one sample gets std 0 and advantage 0;
    a group whose rewards are all equal gets advantage 0.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    r = rewards.to(_compute_dtype(rewards.dtype))
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] dense group index
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inv, torch.ones_like(r))  # [G]
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inv, r) / count  # [G]
    centred = r - mean[inv]  # [B]
    if not scale_std:
        return centred
    sq = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inv, centred.square())  # [G]
    std = (sq / (count - 1).clamp_min(1)).sqrt()  # [G]
    return centred / (std[inv] + eps)


def grpo_terms(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    ref_logprobs: Tensor | None,
    kl_coef: float,
) -> tuple[Tensor, Tensor]:  # loss [N], clipped [N] bool
    ratio = torch.exp(student_logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    # A token is clipped when the min picks the flat branch, i.e. it carries no policy gradient.
    was_clipped = clipped < unclipped
    if ref_logprobs is not None and kl_coef != 0.0:
        loss = loss + kl_coef * k3(ref_logprobs, student_logprobs)
    return loss, was_clipped


def k3(ref_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """The k3 estimator of KL(p_S || p_ref) per sampled token: exp(d) - d - 1, d = lp_ref - lp_S
    (>= 0, 0 where the two agree); GRPO's KL penalty and OPSD's anchor."""
    d = ref_logprobs - student_logprobs
    return torch.exp(d) - d - 1.0


def grpo_token_loss(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """PPO-clipped GRPO surrogate per token, all inputs ``[N]``.

        r    = exp(lp - lp_old)
        loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
               + kl_coef * (exp(lp_ref - lp) - (lp_ref - lp) - 1)     (k3, when ref_logprobs given)
    """
    loss, _ = grpo_terms(
        student_logprobs, old_logprobs, advantages, clip_low, clip_high, ref_logprobs, kl_coef
    )
    return loss


def sft_token_loss(student_logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy ``-log softmax(logits / temperature)[target]`` per position, ``[N, V] -> [N]``.
    """
    logp = student_logprobs(student_logits, temperature)
    return -logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)


def skip_first_mask(loss_mask: Tensor, n: int) -> Tensor:
    """Drop the first ``n`` counted tokens of each row of a ``[B, T]`` bool mask.

    "First n response positions" is taken as the first n positions where the mask is True, so the
    result is the same whether rows are left-padded, right-padded or carry the prompt in front.
    """
    if n < 0:
        raise ValueError(f"skip_first_mask: n must be >= 0, got {n}")
    mask = loss_mask.bool()
    if n == 0:
        return mask.clone()
    rank = mask.long().cumsum(dim=-1)  # [B, T] 1-based index of each counted token
    return mask & (rank > n)


@dataclass(frozen=True)
class LossSpec:
    """What the learner's loss needs: the objective, the keys the shared machinery reads for every
    objective, and the objective's own options as the config check made them (an instance of its
    ``Options`` dataclass, opsd/objectives/), handed over whole rather than copied field by field."""

    algo: str = "opsd"  # the objective (opsd.objectives.OBJECTIVES): opsd | grpo | sft | kd | contrastive | mix | ...
    temperature: float = 1.0
    chunk_size: int = 1024  # positions per chunk
    options: Any = None

    def __post_init__(self) -> None:
        from opsd.objectives import objective
        from opsd.registry import RegistryError

        try:
            obj = objective(self.algo)
        except RegistryError as exc:
            raise ValueError(f"loss.algo: {exc}") from None
        if not self.temperature > 0.0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1, got {self.chunk_size}")
        if obj.Options is not None and self.options is None:
            # The learner must never fall back to defaults silently: the options come from the config.
            object.__setattr__(self, "options", obj.Options())


@dataclass
class TokenTargets:
    """One row per loss position, already flattened and masked by the learner."""

    sampled_ids: Tensor  # [N] long, the response token at each position
    weight: Tensor  # [N] float, 1.0 for loss tokens (0 allowed): what the statistics count
    topk_ids: Tensor | None = None  # [N, k]
    topk_logprobs: Tensor | None = None  # [N, k]
    teacher_logprobs: Tensor | None = None  # [N]
    rollout_logprobs: Tensor | None = None  # [N]
    advantages: Tensor | None = None  # [N]
    ref_logprobs: Tensor | None = None  # [N]
    # [N] a factor on each token's loss that the statistics do not count (loss.position_weight)
    scale: Tensor | None = None
    # [N, ...] inputs of an objective's own (by name), e.g. the contrastive credit
    extra: dict[str, Tensor] = field(default_factory=dict)

    def fields(self) -> dict[str, Tensor | None]:
        """Every per-position tensor by name, the extra ones included."""
        found = {name: getattr(self, name) for name in _TARGET_FIELDS}
        return {**found, **self.extra}

    @classmethod
    def from_fields(cls, fields: dict[str, Tensor | None]) -> "TokenTargets":
        own = {k: v for k, v in fields.items() if k in _TARGET_FIELDS}
        return cls(**own, extra={k: v for k, v in fields.items() if k not in _TARGET_FIELDS and v is not None})


_TARGET_FIELDS = (
    "sampled_ids",
    "weight",
    "topk_ids",
    "topk_logprobs",
    "teacher_logprobs",
    "rollout_logprobs",
    "advantages",
    "ref_logprobs",
    "scale",
)


def stat_names(spec: LossSpec, present: set[str]) -> list[str]:
    """The statistics chunked_loss returns for ``spec`` given the per-token inputs ``present``."""
    from opsd.objectives import objective

    names = ["loss_sum", "tokens", "entropy_sum"]
    if "teacher_logprobs" in present:
        names.append("kl_sampled_sum")
    return names + objective(spec.algo).stat_names(spec, present)


def _weighted_loss(spec: LossSpec, logits: Tensor, t: dict[str, Tensor | None]) -> tuple[Tensor, dict]:
    """The chunk's sum of weight * loss from its logits ``[n, V]``, and what its statistics read."""
    from opsd.objectives import objective

    logp = student_logprobs(logits, spec.temperature)  # [n, V]
    lp_sampled = logp.gather(-1, t["sampled_ids"].long().unsqueeze(-1)).squeeze(-1)  # [n]
    loss, parts = objective(spec.algo).loss(spec, logits, logp, lp_sampled, t)
    w = t["weight"].to(loss.dtype)  # [n]
    scaled = loss if t.get("scale") is None else loss * t["scale"].to(loss.dtype)
    loss_sum = (w * scaled).sum()
    return loss_sum, {"logp": logp, "lp_sampled": lp_sampled, "parts": parts, "w": w}


@torch.no_grad()
def _chunk_stats(names: list[str], loss_sum: Tensor, seen: dict, t: dict[str, Tensor | None]) -> Tensor:
    logp, w = seen["logp"], seen["w"]
    values = {
        "loss_sum": loss_sum.detach(),
        "tokens": w.sum(),
        "entropy_sum": (w * -(logp.exp() * logp).sum(-1)).sum(),
    }
    if "kl_sampled_sum" in names:
        gap = t["teacher_logprobs"].to(w.dtype) - seen["lp_sampled"]
        values["kl_sampled_sum"] = (w * gap).sum()
    for name, per_token in seen["parts"].items():
        values[name] = (w * per_token.to(w.dtype)).sum()
    return torch.stack([values[k] for k in names])


def _chunk_loss(
    head: Callable[[Tensor], Tensor],
    spec: LossSpec,
    names: list[str],
    hidden: Tensor,  # [n, H]
    t: dict[str, Tensor | None],  # TokenTargets fields sliced to the chunk
) -> tuple[Tensor, Tensor]:  # (sum of weight * loss, stats [len(names)])
    loss_sum, seen = _weighted_loss(spec, head(hidden), t)
    return loss_sum, _chunk_stats(names, loss_sum, seen, t)


# model.lm_head_path: how chunked_loss computes the LM head and its derivative.
HEAD_PATHS = ("auto", "fused", "module")


def resolve_head_path(path: str, head: object, hidden: Tensor) -> str:
    """"fused" (HeadLoss) or "module" (the head module per chunk under activation checkpointing,
    the path before issue 40; with model.fp32_lm_head it casts the weight to fp32 per call).

    ``auto`` takes the fused path on CUDA, where its bf16 tensor-core matmuls with fp32 output
    replace the module path's fp32 copies of the weight and fp32 matmuls; on CPU it keeps the
    module path, which has no tensor cores to gain and no mm with fp32 output (docs/DESIGN.md,
    "Losses"). The fused path needs the head's weight: an ``nn.Linear`` without a bias.
    """
    if path not in HEAD_PATHS:
        raise ValueError(f"head path must be one of {HEAD_PATHS}, got {path!r}")
    usable = isinstance(head, torch.nn.Linear) and head.bias is None
    if path == "fused" and not usable:
        raise ValueError(f"the fused head path needs an nn.Linear LM head without bias, got {type(head).__name__}")
    if path == "auto":
        return "fused" if usable and hidden.is_cuda else "module"
    return path


def _tensor_cores(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the head's matmuls run as half-precision matmuls with fp32 accumulation and output:
    CUDA, both operands bf16 (or both fp16), and a torch whose mm takes out_dtype."""
    return (_HALF_MM_TO_FP32["available"] and hidden.is_cuda and weight.is_cuda and hidden.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16))


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b of two half-precision CUDA matrices, accumulated and written in fp32 (the products of
    two bf16 numbers are exact in fp32, so this is the fp32 matmul of the operands up to summation
    order). torch 2.11's CUDA mm takes out_dtype (the scorer runs it: docs/BENCHMARKS.md); one that
    does not gets the cast, once, and says so through _HALF_MM_TO_FP32."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:
        _HALF_MM_TO_FP32["available"] = False
        return a.float() @ b.float()


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place, for half-precision a and b on CUDA, accumulated in fp32 into the fp32
    acc (addmm with out_dtype: no [V, H] product per chunk besides the sum); a torch without it
    adds a product made by _mm_fp32, and says so through _HALF_MM_TO_FP32."""
    if _HALF_MM_TO_FP32["addmm"]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError, RuntimeError):
            _HALF_MM_TO_FP32["addmm"] = False
    acc += _mm_fp32(a, b)


class HeadLoss(torch.autograd.Function):
    """The LM head and the loss as one function of (hidden ``[N, H]``, weight ``[V, H]``), a chunk
    of positions at a time, so that no ``[N, V]`` tensor is ever held whole.

    Forward, per chunk: logits ``[n, V]`` in fp32 (CUDA bf16/fp16: a tensor-core matmul with fp32
    output; otherwise the operands in the compute dtype, cast once per call, not per chunk), then
    ``run(logits, chunk_fields)`` -> (sum of weight * loss, stats), the objective's loss in fp32.
    Saved for the backward: only the inputs themselves (hidden, weight, the targets), no copy.

    Backward, per chunk: the logits recomputed, dlogits by autograd through the objective's loss
    on that chunk alone, then grad_hidden = dlogits @ W and grad_W += dlogits^T @ hidden. On CUDA
    in bf16 both are tensor-core matmuls of dlogits rounded to bf16 with fp32 accumulation and
    output (as a bf16 head's own backward rounds them); grad_W is summed over chunks in fp32 and
    cast to the weight's dtype once. A weight that needs no gradient (LoRA) skips its matmul.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, run: Callable, chunk: int, *fields: Tensor | None):
        ctx.run, ctx.chunk = run, chunk
        ctx.save_for_backward(hidden, weight, *fields)
        w = _head_operand(hidden, weight)
        total, stats = hidden.new_zeros((), dtype=_compute_dtype(weight.dtype)), []
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            loss_sum, chunk_stats = run(_head_logits(hidden[sl], w), [None if f is None else f[sl] for f in fields])
            total, stats = total + loss_sum, stats + [chunk_stats]
        stats = torch.stack(stats).sum(0)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_stats: Tensor):
        hidden, weight, *fields = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cores = _tensor_cores(hidden, weight)
        w = _head_operand(hidden, weight)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if cores else w.dtype, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]
            with torch.enable_grad():
                logits = _head_logits(h, w).detach().requires_grad_(True)  # [n, V]
                loss_sum = ctx.run(logits, [None if f is None else f[sl] for f in fields], stats=False)
                (dlogits,) = torch.autograd.grad(loss_sum, logits, grad_outputs=grad_total)  # [n, V] fp32
            if cores:
                dlogits = dlogits.to(weight.dtype)
                if want_h:
                    grad_h[sl] = _mm_fp32(dlogits, weight)
                if want_w:
                    _addmm_fp32_(grad_w, dlogits.t(), h)
            else:
                if want_h:
                    grad_h[sl] = dlogits @ w
                if want_w:
                    grad_w.addmm_(dlogits.t(), h.to(w.dtype))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, *([None] * len(fields)))


def _head_operand(hidden: Tensor, weight: Tensor) -> Tensor:
    """The weight as the head's matmuls take it: itself on tensor cores, else in the compute
    dtype (one cast per forward or backward, where the module path casts once per chunk)."""
    return weight if _tensor_cores(hidden, weight) else weight.to(_compute_dtype(weight.dtype))


def _head_logits(h: Tensor, w: Tensor) -> Tensor:  # [n, V] in the compute dtype
    if w.dtype in (torch.bfloat16, torch.float16):
        return _mm_fp32(h, w.t())
    return h.to(w.dtype) @ w.t()


def _fused_loss(head: torch.nn.Linear, hidden: Tensor, fields: dict[str, Tensor | None], spec: LossSpec,
                names: list[str]) -> tuple[Tensor, Tensor]:
    """HeadLoss inside one call of the head module, so that the module's hooks still fire (ZeRO-3
    gathers the weight in its forward hook and again before its backward)."""
    keys = list(fields)

    def run(logits: Tensor, chunk_fields: list, stats: bool = True):
        t = dict(zip(keys, chunk_fields))
        loss_sum, seen = _weighted_loss(spec, logits, t)
        return (loss_sum, _chunk_stats(names, loss_sum, seen, t)) if stats else loss_sum

    own = head.__dict__.get("forward")  # fp32_lm_head's, if it was applied
    head.forward = lambda h: HeadLoss.apply(h, head.weight, run, spec.chunk_size, *fields.values())
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def chunked_loss(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: TokenTargets,
    spec: LossSpec,
    *,
    normalizer: float,
    head_path: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    """Weighted token-loss sum of one micro-batch, divided by the global token count.

    Args:
        hidden: ``[N, H]`` final hidden states at the N loss positions.
        head: maps ``[n, H]`` to ``[n, V]`` logits (the lm_head); called once per chunk in the
            forward pass and once more per chunk when the backward pass recomputes it.
        targets: per-position targets; which fields are needed depends on ``spec``.
        spec: the objective; ``spec.chunk_size`` positions are projected at a time.
        normalizer: number of loss tokens (sum of weights) of the whole optimizer step across
            micro-batches and ranks; see the module docstring.
        head_path: ``HEAD_PATHS``, see :func:`resolve_head_path`: the fused :class:`HeadLoss`
            or the head module per chunk.

    Returns:
        ``(loss, stats)``: ``loss = sum_i weight_i * loss_i / normalizer`` (a scalar with grad),
        and ``stats`` holding weighted *sums* over this micro-batch so the caller can add them up
        across micro-batches and ranks before dividing by the total ``tokens``:
        ``loss_sum``, ``tokens`` (sum of weights), ``entropy_sum`` (student entropy at the spec's
        temperature), ``kl_sampled_sum`` (sum of teacher - student logprob of the sampled token,
        when teacher logprobs are given; on-policy, minus its mean estimates KL(p_S || p_T)),
        ``clipped_tokens`` (grpo: ratio clipped; opsd: loss capped by token_clip); for grpo with
        rollout logprobs also ``mismatch_sum`` (sum of |rollout - learner| sampled-token logprob,
        both at temperature 1) and ``rollout_clipped_tokens`` (tokens whose ratio against the
        rollout logprobs lies outside the clip range, whichever old policy the loss uses).

    Either path keeps nothing of width V between the forward and the backward pass (the module
    path runs each chunk under non-reentrant activation checkpointing; HeadLoss recomputes each
    chunk's logits); peak memory is O(chunk_size x V), not O(N x V).
    """
    from opsd.objectives import objective

    if not normalizer > 0:
        raise ValueError(f"chunked_loss: normalizer must be > 0, got {normalizer}")
    n_pos = hidden.shape[0]
    fields = targets.fields()
    for name, value in fields.items():
        if value is not None and value.shape[0] != n_pos:
            raise ValueError(
                f"TokenTargets.{name} has {value.shape[0]} rows, hidden has {n_pos} positions"
            )
    missing = [name for name in objective(spec.algo).fields(spec) if fields.get(name) is None]
    if missing:
        raise ValueError(
            f"loss algo={spec.algo!r} with options {spec.options} needs TokenTargets fields "
            f"{missing}, which are None"
        )
    names = stat_names(spec, {k for k, v in fields.items() if v is not None})
    if n_pos == 0:
        # Still part of the graph, so an engine that expects every rank to call backward can.
        return hidden.sum() * 0.0, {k: 0.0 for k in names}
    if resolve_head_path(head_path, head, hidden) == "fused":
        total, stats = _fused_loss(head, hidden, fields, spec, names)
        return total / normalizer, dict(zip(names, stats.tolist()))
    keys = list(fields)

    def run(h: Tensor, *chunk_fields: Tensor | None) -> tuple[Tensor, Tensor]:
        return _chunk_loss(head, spec, names, h, dict(zip(keys, chunk_fields)))

    total = None
    chunk_stats = []
    for start in range(0, n_pos, spec.chunk_size):
        sl = slice(start, start + spec.chunk_size)
        args = [hidden[sl]] + [None if v is None else v[sl] for v in fields.values()]
        if torch.is_grad_enabled():
            loss_sum, stats = checkpoint(run, *args, use_reentrant=False)
        else:
            loss_sum, stats = run(*args)
        total = loss_sum if total is None else total + loss_sum
        chunk_stats.append(stats)
    sums = torch.stack(chunk_stats).sum(0).tolist()  # one host sync for the whole micro-batch
    return total / normalizer, dict(zip(names, sums))
