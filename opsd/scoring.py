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

from typing import Sequence

import numpy as np
import torch

# (top-k ids [T, k] int32, top-k logprobs [T, k] float32, sampled-token logprob [T] float32); the
# first two are None when only the sampled token's log-probability is asked for.
RowTargets = tuple["np.ndarray | None", "np.ndarray | None", np.ndarray]


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
    hidden: torch.Tensor, sampled: torch.Tensor, head, *, k: int, temperature: float, topk: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """[n, H] final hidden states -> (top-k ids [n, k], top-k logprobs [n, k], sampled logprob [n])."""
    logits = head(hidden).float() / temperature  # [n, V]
    if not topk:
        # The sampled token's logprob alone: no [n, V] log-softmax kept, no top-k.
        tok = logits.gather(-1, sampled[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return None, None, tok
    logp = torch.log_softmax(logits, dim=-1)  # [n, V]
    top_lp, top_ids = logp.topk(k, dim=-1)  # [n, k]
    return top_ids, top_lp, logp.gather(-1, sampled[:, None]).squeeze(-1)


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
) -> list[RowTargets]:
    """The teacher's targets of each row of a Hugging Face causal LM (``get_decoder`` and
    ``get_output_embeddings``), on the device the model is on."""
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
                                     k=k, temperature=temperature, topk=topk)
                 for c in range(0, sel.shape[0], chunk_size)]
        tok_lp = torch.cat([p[2] for p in parts])
        if topk:
            top_ids, top_lp = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        offset = 0
        for i in group:
            sl = slice(offset, offset + len(responses[i]))
            out[i] = (
                top_ids[sl].to(torch.int32).cpu().numpy() if topk else None,
                top_lp[sl].cpu().numpy() if topk else None,
                tok_lp[sl].cpu().numpy(),
            )
            offset += len(responses[i])
    return out
