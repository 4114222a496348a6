"""The learner rank's training role: the step and its micro-batches (docs/DESIGN.md, "The learner").

A rank gets its rows of the batch as an Arrow IPC slice and the group's plan for them
(``RankPlan``, made by ``plan_ranks`` in the group), turns them into the flattened per-loss-token inputs the
configured objective reads, and runs the micro-batches through the DeepSpeed engine, whose module is
``PolicyLoss``: the decoder, then ``opsd.losses.chunked_loss`` (the LM head and the loss). The loss
is normalised by the loss tokens of the whole global batch, so the update does not depend on how
rows fall into micro-batches or ranks. Knows nothing of the weights' export or of checkpoints.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from opsd.batch import batch_meta, contexts_of, from_ipc_bytes
from opsd.config import Config, samples_per_prompt
from opsd.diagnostics import LastPositions, counted_rows, stop_probability, stop_sums, stop_token_ids
from opsd.losses import LossSpec, TokenTargets, chunked_loss, grpo_advantages, stat_names
from opsd.objectives import objective
from opsd.objectives.base import field_shape
from opsd.scoring import pad_right
from opsd.workers.deepspeed_compat import optimizer_step_skipped



def loss_spec(cfg: Config) -> LossSpec:
    """The shared loss keys, and the objective's own options as its declaration reads them."""
    return LossSpec(algo=cfg.algo, temperature=cfg.loss.temperature, chunk_size=cfg.loss.chunk_size,
                    options=objective(cfg.algo).options(cfg))


def position_weights(lengths: list[int], *, low: float, center: float, width: float) -> np.ndarray:
    """PW-OPSD's weight of every response token, rows after one another: w = low + (1 - low) *
    sigmoid((f - center) / width), f = (i - 0.5) / T the token's relative position in its row's
    response (i from 1, T its length)."""
    f = np.concatenate([(np.arange(1, t + 1) - 0.5) / t for t in lengths]) if lengths else np.zeros(0)
    return low + (1.0 - low) / (1.0 + np.exp(-(f - center) / width))


class BatchColumns:
    """A batch's columns at the loss positions of some of its rows, as an objective reads them
    (opsd/objectives/base.py): flattened over rows, one entry per loss position. A named context
    that does not apply to a row reads as NaN there."""

    def __init__(self, sub: pa.Table, keep: np.ndarray, lengths: list[int], table: pa.Table):
        self.sub, self.keep, self.lengths = sub, keep, lengths
        self.has_teacher = batch_meta(table)["opsd.teacher_mode"] != "none"
        self.contexts = list(contexts_of(table))

    def column(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.sub.column_names:
            context = f" (the teacher context {name.split(':', 1)[1]!r})" if ":" in name else ""
            raise ValueError(f"the batch has no column {name!r}{context}, which the objective reads")
        col = self.sub.column(name).combine_chunks()
        if col.null_count:  # a named context absent from some rows: NaN per token there
            rows = [np.full((t,) + _trailing(col.type), np.nan) if v is None else np.asarray(v, dtype=np.float64)
                    for v, t in zip(col.to_pylist(), self.lengths)]
            arr = np.concatenate(rows) if rows else np.zeros(0)
        else:
            values = col.flatten()
            if pa.types.is_fixed_size_list(values.type):
                arr = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, values.type.list_size)
            else:
                arr = values.to_numpy(zero_copy_only=False)
        return torch.as_tensor(np.ascontiguousarray(arr[self.keep]), dtype=dtype)


def _trailing(list_type: pa.DataType) -> tuple[int, ...]:
    inner = list_type.value_type
    return (inner.list_size,) if pa.types.is_fixed_size_list(inner) else ()


def column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def balanced_shards(lengths: list[int], world_size: int) -> list[list[int]]:
    """Row indices for each rank: every row once, at most ceil(n / W) rows per rank (so no rank
    needs more micro-batches than the DeepSpeed config has), the longest rows first, each to the
    rank with the fewest tokens so far (ties: the lower rank). Within a rank the rows go shortest
    first, so consecutive micro-batches hold rows of similar length and pad little. The same on
    every rank: it reads only the lengths."""
    cap = math.ceil(len(lengths) / world_size) if lengths else 0
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(world_size) if len(shards[r]) < cap), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += lengths[i]
    return [sorted(s, key=lambda i: (lengths[i], i)) for s in shards]


@dataclass
class RankPlan:
    """What one rank needs besides its rows: ``rows`` index the whole batch (the rank receives
    exactly these rows, in this order, shortest first); ``global_tokens`` is the loss-token count of
    the whole batch (the loss normaliser); ``advantages`` (GRPO) are per row of this rank, computed
    over whole groups, which may span ranks; ``pad_to`` (ZeRO-3) is per micro-batch the most loss
    tokens any rank has in that micro-batch, else zeros."""

    rows: list[int]
    global_tokens: float
    advantages: list[float] | None
    pad_to: list[int]


def plan_ranks(table: pa.Table, *, world_size: int, micro_batch_size: int, micro_batches: int,
               grpo: bool = False, zero3: bool = False) -> list[RankPlan]:
    """Split a batch over the ranks, once, in the group. Raises ValueError when a rank would need
    more micro-batches than the DeepSpeed config was built for, before any rank has started."""
    lengths = (pc.list_value_length(table.column("prompt_ids")).to_numpy()
               + pc.list_value_length(table.column("response_ids")).to_numpy()).tolist()
    shards = balanced_shards(lengths, world_size)
    mb = micro_batch_size
    needed = max((math.ceil(len(s) / mb) for s in shards), default=0)
    if needed > micro_batches:
        raise ValueError(
            f"batch of {table.num_rows} rows needs {needed} micro-batches per rank, more than the {micro_batches} "
            "the DeepSpeed config was built for (train.prompts_per_step x rollout.n)"
        )
    mask = table.column("loss_mask").combine_chunks()
    flat = np.asarray(mask.flatten().to_numpy(zero_copy_only=False), dtype=bool)
    # Loss tokens per row: differences of the running count at the row boundaries.
    offsets = mask.offsets.to_numpy()
    running = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
    per_row = running[offsets[1:] - offsets[0]] - running[offsets[:-1] - offsets[0]]
    advantages = None
    if grpo:
        groups = [sid.rsplit("#", 1)[0] for sid in column(table, "sample_id")]
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        advantages = grpo_advantages(
            torch.tensor(column(table, "reward"), dtype=torch.float32),
            torch.tensor([index[g] for g in groups]),
        ).tolist()
    pad_to = [0] * micro_batches
    if zero3:
        # ZeRO-3 gathers a module's weights on every call, so every rank must call the LM head
        # equally often: pad micro-batch i to the most loss tokens any rank has in it, and to at
        # least one position, so that a micro-batch with no loss tokens still calls the head.
        for shard in shards:
            for i in range(0, len(shard), mb):
                pad_to[i // mb] = max(pad_to[i // mb], int(sum(per_row[j] for j in shard[i : i + mb])))
        pad_to = [max(n, 1) for n in pad_to]
    return [RankPlan(rows=shard, global_tokens=float(flat.sum()),
                     advantages=[advantages[j] for j in shard] if advantages is not None else None, pad_to=pad_to)
            for shard in shards]


def micro_batches_per_rank(cfg: Config) -> int:
    """Fixed for the run, so the DeepSpeed config is too; a short step pads with empty ones."""
    rows = cfg.train.prompts_per_step * samples_per_prompt(cfg)
    per_rank = math.ceil(rows / cfg.learner.num_ranks)
    return max(1, math.ceil(per_rank / cfg.learner.micro_batch_size))


class PolicyLoss(torch.nn.Module):
    """The policy with the loss as its forward: DeepSpeed wraps this module.

    ZeRO-3 hangs its parameter bookkeeping on the forward hooks of the module it wraps, so the
    decoder, the chunked LM head and the loss must all run inside one call of that module; the
    loss needs hidden states rather than full [B, L, V] logits, so the HF model's own forward is
    not the one to wrap.
    """

    def __init__(self, policy: torch.nn.Module, spec: LossSpec, head_path: str = "auto"):
        super().__init__()
        self.policy = policy
        self.spec = spec
        self.head_path = head_path  # model.lm_head_path
        self.stop_ids = stop_token_ids(policy)

    def forward(self, input_ids, attention_mask, rows, cols, targets: TokenTargets, normalizer: float, pad_to: int = 0,
                last: LastPositions | None = None):
        hidden = self.policy.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        sel = hidden[rows, cols]  # [N, H]: the positions that predict loss tokens
        if pad_to > sel.shape[0]:
            sel, targets = _pad_positions(sel, targets, pad_to)
        loss, stats = chunked_loss(sel, self.policy.get_output_embeddings(), targets, self.spec, normalizer=normalizer,
                                   head_path=self.head_path)
        if last is not None:
            # The collapse diagnostic (opsd/diagnostics.py): the student's stop probability at each
            # row's last position; no gradient. Every micro-batch calls the head (ZeRO-3's gathers).
            p = stop_probability(hidden[last.rows.to(hidden.device), last.cols.to(hidden.device)],
                                 self.policy.get_output_embeddings(), self.stop_ids, self.spec.temperature)
            stats = {**stats, **stop_sums(p.cpu().numpy(), last)}
        return loss, stats


def _pad_positions(hidden: torch.Tensor, t: TokenTargets, n: int) -> tuple[torch.Tensor, TokenTargets]:
    """Append zero-weight positions up to ``n`` (valid values, so nothing turns NaN: a uniform
    top-k)."""
    extra = n - hidden.shape[0]
    hidden = torch.cat([hidden, hidden.new_zeros(extra, hidden.shape[1])])
    padded = {}
    for name, v in t.fields().items():
        if v is None:
            padded[name] = v
            continue
        fill = torch.zeros((extra, *v.shape[1:]), dtype=v.dtype, device=v.device)
        if name == "topk_logprobs":
            fill.fill_(-math.log(v.shape[1]))
        padded[name] = torch.cat([v, fill])
    return hidden, TokenTargets.from_fields(padded)


class Training:
    """The step on one rank: micro-batches through the DeepSpeed engine, the optimizer step at the
    accumulation boundary. ``changing_weights`` is entered around the step (the weights' export
    tells its senders: opsd.workers.learner_export.WeightExport.changing)."""

    def __init__(self, cfg: Config, engine: Any, rank: int, world_size: int, pad_id: int,
                 changing_weights: Callable[[], AbstractContextManager]):
        self.cfg, self.engine, self.rank, self.world_size, self.pad_id = cfg, engine, rank, world_size, pad_id
        self.device = engine.device
        self.gas = micro_batches_per_rank(cfg)
        self.spec = loss_spec(cfg)
        self.objective = objective(cfg.algo)
        self._changing_weights = changing_weights
        self.step = 0  # optimizer steps taken (a checkpoint saves and restores it)

    def _targets(self, table: pa.Table, rows: list[int], advantages: list[float] | None) -> dict:
        """Inputs and flattened per-loss-token targets for the given rows of this rank's table;
        ``advantages`` are per row of that table. What the loss reads is the objective's to say."""
        sub = table.take(pa.array(rows, pa.int64()))
        prompts = column(sub, "prompt_ids")
        responses = column(sub, "response_ids")
        masks = column(sub, "loss_mask")
        seqs = [p + r for p, r in zip(prompts, responses)]
        sel_rows, sel_cols, keep_flat = [], [], []
        for j, (p, r, m) in enumerate(zip(prompts, responses, masks)):
            m = np.asarray(m, dtype=bool)
            pos = np.arange(len(p) - 1, len(p) - 1 + len(r))[m]
            sel_rows.append(np.full(len(pos), j))
            sel_cols.append(pos)
            keep_flat.append(m)
        keep = np.concatenate(keep_flat) if keep_flat else np.zeros(0, bool)
        batch = BatchColumns(sub, keep, [len(r) for r in responses], table)
        fields = {"sampled_ids": batch.column("response_ids", torch.long),
                  "weight": torch.ones(int(keep.sum()), dtype=torch.float32),
                  **self.objective.inputs(self.spec, batch)}
        if advantages is not None:
            per_row = [np.full(int(np.sum(m)), advantages[i]) for i, m in zip(rows, keep_flat)]
            fields["advantages"] = torch.as_tensor(np.concatenate(per_row) if per_row else np.zeros(0),
                                                   dtype=torch.float32)
        lc = self.cfg.loss
        if lc.position_weight:
            w = position_weights([len(r) for r in responses], low=lc.position_weight_min,
                                 center=lc.position_weight_center, width=lc.position_weight_width)
            fields["scale"] = torch.as_tensor(w[keep], dtype=torch.float32)
        teacher_stop = column(sub, "teacher_stop_logprobs") if "teacher_stop_logprobs" in sub.column_names else None
        applied = column(sub, "context_applied") if "context_applied" in sub.column_names else None
        return {"seqs": seqs, "rows": np.concatenate(sel_rows) if sel_rows else np.zeros(0, int),
                "cols": np.concatenate(sel_cols) if sel_cols else np.zeros(0, int),
                "targets": TokenTargets.from_fields(fields),
                "last": LastPositions.of([len(p) for p in prompts], responses, column(sub, "finish_reason"),
                                         teacher_stop, counted=counted_rows(masks, applied))}

    def _forward_loss(self, inputs: dict, normalizer: float, pad_to: int = 0) -> tuple[torch.Tensor, dict]:
        ids, mask = pad_right(inputs["seqs"], self.pad_id)
        t = inputs["targets"]
        t = TokenTargets.from_fields({k: (v.to(self.device) if v is not None else v) for k, v in t.fields().items()})
        return self.engine(
            ids.to(self.device), mask.to(self.device), torch.as_tensor(inputs["rows"]).to(self.device),
            torch.as_tensor(inputs["cols"]).to(self.device), t, normalizer, pad_to, inputs["last"],
        )

    def _micro_inputs(self, table: pa.Table, chunks: list[list[int]], i: int, plan: RankPlan) -> dict:
        """Micro-batch ``i`` of the ``self.gas`` every rank runs: its rows, or an empty one past them."""
        return self._targets(table, chunks[i], plan.advantages) if i < len(chunks) else self._empty_micro_batch()

    def _empty_micro_batch(self) -> dict:
        """One pad token with zero weight: keeps every rank's collective calls in step."""
        k = self.cfg.scorer.topk
        fields = {"sampled_ids": torch.zeros(1, dtype=torch.long), "weight": torch.zeros(1)}
        for name in self.objective.fields(self.spec):
            shape, dtype = field_shape(name)
            fields[name] = torch.zeros((1, *(k if d == "k" else d for d in shape)), dtype=dtype)
        if "topk_logprobs" in fields:
            fields["topk_logprobs"].fill_(-math.log(k))  # a valid (uniform) distribution: nothing turns NaN
        return {"seqs": [[self.pad_id, self.pad_id]], "rows": np.zeros(1, int), "cols": np.zeros(1, int),
                "targets": TokenTargets.from_fields(fields), "last": LastPositions()}

    def train_step(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        """One optimizer step on this rank's rows (``batch_ipc`` holds only them, in ``plan.rows``'
        order); returns summed statistics."""
        if plan.global_tokens == 0:
            return self._no_loss_tokens(batch_ipc, plan)
        with self._changing_weights():
            return self._train_step(batch_ipc, plan)

    def _no_loss_tokens(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        """A step where no token counts in the loss (every sample left out: cut at the token limit
        under loss.mask_truncated, or its teacher context did not apply): no backward and no
        update, so neither the weights, the optimizer's moments nor the learning-rate schedule
        move. The count is the whole batch's, so every rank returns here alike.

        The forward still runs, without gradients, for the collapse diagnostic alone: a step whose
        every sample was cut is the most collapsed one, and the stop probabilities at its cut
        samples are what it has to say (opsd/diagnostics.py)."""
        t0 = time.perf_counter()
        table = self._rank_table(batch_ipc, plan)
        chunks = self._micro_batches(table.num_rows, plan)
        stops: dict[str, float] = {}
        self.engine.eval()  # ZeRO-3 gathers and releases its weights for a forward without gradients
        try:
            with torch.no_grad():
                for i in range(self.gas):  # every rank calls the module equally often (ZeRO-3)
                    _, stats = self._forward_loss(self._micro_inputs(table, chunks, i, plan), 1.0, plan.pad_to[i])
                    for k, v in stats.items():
                        if k.startswith("stop_"):  # opsd.diagnostics.stop_sums
                            stops[k] = stops.get(k, 0.0) + float(v)
        finally:
            self.engine.train()
        self.step += 1
        # Nothing entered a loss: the sampled-token gap is missing from the row, not 0.
        names = [n for n in stat_names(self.spec, set(self.objective.fields(self.spec))) if n != "kl_sampled_sum"]
        return {**dict.fromkeys(names, 0.0), **stops, "global_tokens": 0.0, "grad_norm": float("nan"),
                "lr": float(self.engine.get_lr()[0]), "train_seconds": time.perf_counter() - t0,
                "update_skipped": True, "no_loss_tokens": True, "nonfinite_sample_ids": []}

    def _rank_table(self, batch_ipc: bytes, plan: RankPlan) -> pa.Table:
        table = from_ipc_bytes(batch_ipc)
        if table.num_rows != len(plan.rows):
            raise ValueError(f"rank {self.rank}: got {table.num_rows} rows, planned {len(plan.rows)}")
        return table

    def _train_step(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        t0 = time.perf_counter()
        table = self._rank_table(batch_ipc, plan)
        global_tokens = plan.global_tokens
        chunks = self._micro_batches(table.num_rows, plan)
        pad_to = plan.pad_to
        self.engine.train()
        totals: dict[str, float] = {}
        # DeepSpeed divides each backward by the accumulation steps and averages across ranks;
        # undo both so the update is sum(token losses) / global_tokens.
        scale = self.gas * self.world_size
        ids = column(table, "sample_id")
        nonfinite: list[str] = []  # the samples of micro-batches whose loss was not finite
        applied = True
        for i in range(self.gas):
            inputs = self._micro_inputs(table, chunks, i, plan)
            loss, stats = self._forward_loss(inputs, max(global_tokens, 1.0), pad_to[i])
            if not torch.isfinite(loss.detach()).all():
                nonfinite.extend([ids[j] for j in chunks[i]] if i < len(chunks) else ["(padding)"])
            self.engine.backward(loss * scale)
            if i < self.gas - 1:
                self.engine.step()  # between accumulation boundaries: no update
            else:
                applied = self._update()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        totals.update(
            global_tokens=global_tokens,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=float(self.engine.get_lr()[0]),
            train_seconds=time.perf_counter() - t0,
            update_skipped=not applied, nonfinite_sample_ids=nonfinite,
        )
        return totals

    def _micro_batches(self, num_rows: int, plan: RankPlan) -> list[list[int]]:
        """This rank's rows (0 .. num_rows - 1) in micro-batches of learner.micro_batch_size."""
        mb = self.cfg.learner.micro_batch_size
        local = list(range(num_rows))
        chunks = [local[i : i + mb] for i in range(0, len(local), mb)]
        if len(chunks) > self.gas or len(plan.pad_to) != self.gas:
            raise ValueError(f"rank {self.rank}: a plan of {len(chunks)} micro-batches for a DeepSpeed config of {self.gas}")
        return chunks

    def _update(self) -> bool:
        """The optimizer step at the accumulation boundary; False when it was skipped because the
        gradient is not finite (a non-finite update is never applied).

        DeepSpeed itself skips such a step under ZeRO 1-3 and under bf16/fp16 (its overflow
        check), and says so through ``was_step_applied``. In fp32 without ZeRO it hands the step to
        the torch optimizer, which would apply it: there the gradients, already averaged over
        the ranks (so every rank decides alike), are checked here first.
        """
        native = self.cfg.learner.zero_stage > 0 or self.cfg.model.dtype != "float32"
        if native:
            self.engine.step()
            return self.engine.was_step_applied()
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            self.engine.step()
            return True
        with optimizer_step_skipped(self.engine):  # DeepSpeed still zeroes the grads
            self.engine.step()
        return False
