"""The teacher's forward: (context, response) rows -> per-token targets (docs/DESIGN.md, "A step").

Torch only, so that the GPU script (scripts/gpu_roofline.py) and the GPU tests run the very code the
scorer actor runs, on a machine without omegaconf, pyarrow, Ray or vLLM.

For a row the teacher sees ``context + response``; position p predicts token p + 1, so the response's
T tokens are predicted from positions ``len(context) - 1 .. len(context) + T - 2``. At those positions
the logits, divided by the loss temperature, give the teacher's top-k (ids and log-probabilities) and
the sampled token's log-probability. Rows run in padded micro-batches capped by a token budget, and
the vocabulary projection runs a chunk of positions at a time, so no ``[N, V]`` tensor is ever held.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import math

import numpy as np
import torch



class RowTargets(NamedTuple):
    """One row's teacher targets; the top-k pair is None when only the sampled token's
    log-probability is asked for, ``stop_logprobs`` when no stop ids were given (or the forward
    cannot see the whole vocabulary: a vLLM engine's prompt log-probs)."""

    topk_ids: "np.ndarray | None"  # [T, k] int32
    topk_logprobs: "np.ndarray | None"  # [T, k] float32
    token_logprobs: np.ndarray  # [T] float32
    stop_logprobs: "np.ndarray | None" = None  # [T] float32: log of the mass on the stop ids


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (ids [B, L] long, attention_mask [B, L] long from lengths)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x longest row <= max_tokens (longest first, to pad little)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and width * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def targets_from_hidden(
    hidden: torch.Tensor, sampled: torch.Tensor, head, *, k: int, temperature: float, topk: bool,
    stop_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """[n, H] final hidden states -> (top-k ids [n, k], top-k logprobs [n, k], sampled logprob [n],
    log of the mass on ``stop_ids`` [n] or None without them)."""
    logits = head(hidden).float() / temperature  # [n, V]
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    stop = None
    if stop_ids is not None:
        # The collapse diagnostic (opsd/diagnostics.py): does the teacher want to stop here?
        ids = torch.as_tensor(list(stop_ids), dtype=torch.long, device=logits.device)
        stop = torch.logsumexp(logits[:, ids], dim=-1) - lse if len(ids) else torch.full_like(lse, -math.inf)
    if not topk:
        # The sampled token's logprob alone: no [n, V] log-softmax kept, no top-k.
        tok = logits.gather(-1, sampled[:, None]).squeeze(-1) - lse
        return None, None, tok, stop
    logp = logits - lse[:, None]  # [n, V]
    top_lp, top_ids = logp.topk(k, dim=-1)  # [n, k]
    return top_ids, top_lp, logp.gather(-1, sampled[:, None]).squeeze(-1), stop


@torch.no_grad()
def teacher_targets(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    k: int,
    temperature: float,
    chunk_size: int,
    max_tokens: int,
    pad_id: int,
    topk: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> list[RowTargets]:
    """The teacher's targets of each row of a Hugging Face causal LM (``get_decoder`` and
    ``get_output_embeddings``), on the device the model is on; with ``stop_ids``, also the log of
    the teacher's mass on them at every response position."""
    device = next(model.parameters()).device
    out: list = [None] * len(contexts)
    full = [list(c) + list(r) for c, r in zip(contexts, responses)]
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    for group in micro_batches([len(s) for s in full], max_tokens):
        ids, mask = pad_right([full[i] for i in group], pad_id)
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        rows, cols = [], []
        for j, i in enumerate(group):
            start, t = len(contexts[i]) - 1, len(responses[i])
            rows.append(torch.full((t,), j, dtype=torch.long))
            cols.append(torch.arange(start, start + t))
        sel = hidden[torch.cat(rows).to(device), torch.cat(cols).to(device)]  # [N, H]
        sampled = torch.cat([torch.as_tensor(list(responses[i]), dtype=torch.long) for i in group]).to(device)
        parts = [targets_from_hidden(sel[c : c + chunk_size], sampled[c : c + chunk_size], head,
                                     k=k, temperature=temperature, topk=topk, stop_ids=stop_ids)
                 for c in range(0, sel.shape[0], chunk_size)]
        tok_lp = torch.cat([p[2] for p in parts])
        stop_lp = torch.cat([p[3] for p in parts]) if stop_ids is not None else None
        if topk:
            top_ids, top_lp = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        offset = 0
        for i in group:
            sl = slice(offset, offset + len(responses[i]))
            out[i] = RowTargets(
                top_ids[sl].to(torch.int32).cpu().numpy() if topk else None,
                top_lp[sl].cpu().numpy() if topk else None,
                tok_lp[sl].cpu().numpy(),
                stop_lp[sl].cpu().numpy() if stop_lp is not None else None,
            )
            offset += len(responses[i])
    return out
