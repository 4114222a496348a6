"""The learner group: W Ray actors forming one DeepSpeed ZeRO data-parallel group.

The group plans the step once (``plan_ranks``: each rank's rows, about equal tokens per rank and
micro-batches of similar length; the whole batch's loss-token count; GRPO's group advantages;
ZeRO-3's per-micro-batch padding) and sends every rank only its own rows as an Arrow IPC slice.
A rank recomputes the student's logits over prompt + response and applies the configured
objective from ``opsd.losses``. The loss is normalised by the number of loss tokens in the whole
global batch, so the update does not depend on how rows fall into micro-batches or ranks.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
import time
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from opsd.batch import batch_meta, contexts_of, from_ipc_bytes, to_ipc_bytes
from opsd.config import Config, actor_threads, samples_per_prompt, serves_adapter
from opsd.diagnostics import LastPositions, stop_probability, stop_sums, stop_token_ids
from opsd.losses import LossSpec, TokenTargets, chunked_loss, fp32_lm_head, grpo_advantages
from opsd.lora import peft_config, saved_name
from opsd.objectives import objective
from opsd.objectives.base import FIELD_SHAPES
from opsd.scoring import pad_right
from opsd.dtypes import torch_dtype
from opsd.workers.deepspeed_compat import check_version, load_checkpoints_as_tensors, optimizer_step_skipped
from opsd.workers.transports import transport
from opsd.workers.transports.base import (
    BucketLayout, GroupSpec, NamedTensors, WeightSender, WeightSyncError, WeightUpdate,
)
from opsd.workers.transports.broadcast import open_store

# How long a rank waits for the others to reach the learner group's rendezvous (torch's own
# default for a process group).
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)


def loss_spec(cfg: Config) -> LossSpec:
    lc = cfg.loss
    return LossSpec(
        algo=cfg.algo, objective=lc.objective, beta=lc.beta, support=lc.support, temperature=lc.temperature,
        token_clip=lc.token_clip, divergence_clip=lc.divergence_clip, divergence_clip_mode=lc.divergence_clip_mode,
        is_clip=lc.is_clip, clip_low=lc.clip_low, clip_high=lc.clip_high, kl_coef=lc.kl_coef,
        old_logprobs=lc.old_logprobs, contrast_tau=lc.contrast_tau, contrast_scale=lc.contrast_scale,
        contrast_threshold=lc.contrast_threshold, chunk_size=lc.chunk_size,
    )


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
        groups = [sid.rsplit("#", 1)[0] for sid in _column(table, "sample_id")]
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        advantages = grpo_advantages(
            torch.tensor(_column(table, "reward"), dtype=torch.float32),
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


def deepspeed_config(cfg: Config) -> dict:
    lc = cfg.learner
    gas = micro_batches_per_rank(cfg)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": lc.micro_batch_size * gas * lc.num_ranks,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lc.lr, "betas": list(lc.betas), "eps": 1e-8, "weight_decay": lc.weight_decay,
                       # torch's AdamW on CPU runs (FINDINGS.md); DeepSpeed's fused or CPU Adam on GPUs.
                       "torch_adam": cfg.cluster.device == "cpu",
                       # ...as its fused CPU kernel: one pass over the state, ~10x faster than the
                       # default per-op update on these machines, the same update to ~3e-8.
                       **({"fused": True} if cfg.cluster.device == "cpu" else {})},
        },
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if lc.warmup_steps > 0:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lc.lr, "warmup_num_steps": lc.warmup_steps,
                       "warmup_type": "linear"},
        }
    if lc.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return ds


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 holds only a partition of it."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


class LearnerRank:
    """One rank of the group. Construct, then call ``setup`` on all ranks at once."""

    def __init__(self, cfg: Config, model_path: str, rank: int, world_size: int):
        self.cfg = cfg
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self._store = None  # rank 0's rendezvous store (master_address)
        self.cpu = cfg.cluster.device == "cpu"
        if self.cpu:
            # Must be set before deepspeed is imported.
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(actor_threads(cfg.learner.num_threads, cfg.learner.num_cpus_per_rank))

    def node_id(self) -> str:
        """The Ray node this actor runs on (the driver logs where each role landed)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def alive(self) -> bool:
        return True

    def master_address(self) -> tuple[str, int]:
        """Rank 0: host the group's rendezvous store and say where it is. The store binds its
        port here and holds it until the group is up; a free port picked, released and bound
        later by the rendezvous could be taken in between by another job on the host (two runs
        on one machine did collide that way, EADDRINUSE)."""
        import ray

        self._store = open_store(self.world_size, RENDEZVOUS_TIMEOUT.total_seconds())
        return ray.util.get_node_ip_address(), self._store.port

    def setup(self, master_addr: str, master_port: int) -> dict:
        os.environ.update(
            RANK=str(self.rank), LOCAL_RANK="0" if self.cpu else str(self._local_gpu()),
            WORLD_SIZE=str(self.world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import torch.distributed as dist

        store = self._store or dist.TCPStore(master_addr, master_port, self.world_size, is_master=False,
                                             timeout=RENDEZVOUS_TIMEOUT)
        # The group on that store; DeepSpeed then adopts the initialized group as it is. A GPU
        # rank is bound to its device, as DeepSpeed's own initialisation would bind it.
        bind = {} if self.cpu or self.world_size == 1 else {"device_id": torch.device("cuda", self._local_gpu())}
        dist.init_process_group("gloo" if self.cpu else "nccl", store=store, rank=self.rank,
                                world_size=self.world_size, **bind)
        import deepspeed
        from transformers import AutoModelForCausalLM

        check_version()
        deepspeed.init_distributed(dist_backend="gloo" if self.cpu else "nccl", auto_mpi_discovery=False)
        torch.manual_seed(self.cfg.train.seed)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, trust_remote_code=self.cfg.model.trust_remote_code
        )
        if self.cfg.model.fp32_lm_head:
            fp32_lm_head(model.get_output_embeddings())  # DeepSpeed casts the weight to bf16; the matmul stays fp32
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = self.cfg.model.lora.enabled
        # model.lora.serve=adapter: pushes carry the adapter alone (opsd/lora.py)
        self.push_adapter = serves_adapter(self.cfg)
        if self.lora:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config(self.cfg.model.lora))
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=PolicyLoss(model, loss_spec(self.cfg)), model_parameters=trainable, config=deepspeed_config(self.cfg)
        )
        self.device = self.engine.device
        self.gas = micro_batches_per_rank(self.cfg)
        self.spec = loss_spec(self.cfg)
        self.objective = objective(self.cfg.algo)
        self.senders: dict[str, WeightSender] = {}  # rank 0: one per transport it has pushed through
        # Weights travel in the serving dtype (the fp32 master copy stays in the optimizer).
        self.push_dtype = torch_dtype(self.cfg.model.dtype)
        self.step = 0
        return {"rank": self.rank, "pid": os.getpid(), "trainable_params": sum(p.numel() for p in trainable),
                "gradient_checkpointing": bool(getattr(self.module, "is_gradient_checkpointing", False))}

    def _local_gpu(self) -> int:
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")
        return 0 if len(ids) == 1 else self.rank % len(ids)

    @property
    def module(self) -> torch.nn.Module:
        """The HF model (a PeftModel with LoRA)."""
        return self.engine.module.policy

    # --- training -----------------------------------------------------------------------

    def _targets(self, table: pa.Table, rows: list[int], advantages: list[float] | None) -> dict:
        """Inputs and flattened per-loss-token targets for the given rows of this rank's table;
        ``advantages`` are per row of that table. What the loss reads is the objective's to say."""
        sub = table.take(pa.array(rows, pa.int64()))
        prompts = _column(sub, "prompt_ids")
        responses = _column(sub, "response_ids")
        masks = _column(sub, "loss_mask")
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
        teacher_stop = _column(sub, "teacher_stop_logprobs") if "teacher_stop_logprobs" in sub.column_names else None
        return {"seqs": seqs, "rows": np.concatenate(sel_rows) if sel_rows else np.zeros(0, int),
                "cols": np.concatenate(sel_cols) if sel_cols else np.zeros(0, int),
                "targets": TokenTargets.from_fields(fields),
                "last": LastPositions.of([len(p) for p in prompts], responses, _column(sub, "finish_reason"),
                                         teacher_stop, counted=[any(m) for m in masks])}

    def _forward_loss(self, inputs: dict, normalizer: float, pad_to: int = 0) -> tuple[torch.Tensor, dict]:
        ids, mask = pad_right(inputs["seqs"], self.pad_id)
        t = inputs["targets"]
        t = TokenTargets.from_fields({k: (v.to(self.device) if v is not None else v) for k, v in t.fields().items()})
        return self.engine(
            ids.to(self.device), mask.to(self.device), torch.as_tensor(inputs["rows"]).to(self.device),
            torch.as_tensor(inputs["cols"]).to(self.device), t, normalizer, pad_to, inputs["last"],
        )

    def _empty_micro_batch(self) -> dict:
        """One pad token with zero weight: keeps every rank's collective calls in step."""
        k = self.cfg.scorer.topk
        fields = {"sampled_ids": torch.zeros(1, dtype=torch.long), "weight": torch.zeros(1)}
        for name in self.objective.fields(self.spec):
            shape, dtype = FIELD_SHAPES.get(name, ((), torch.float32))
            fields[name] = torch.zeros((1, *(k if d == "k" else d for d in shape)), dtype=dtype)
        if "topk_logprobs" in fields:
            fields["topk_logprobs"].fill_(-math.log(k))  # a valid (uniform) distribution: nothing turns NaN
        return {"seqs": [[self.pad_id, self.pad_id]], "rows": np.zeros(1, int), "cols": np.zeros(1, int),
                "targets": TokenTargets.from_fields(fields), "last": LastPositions()}

    @contextmanager
    def _changing_weights(self) -> Iterator[None]:
        """Around anything that changes the weights: every sender is told (receivers reading them
        in place wait, and updates pushed before are refused afterwards: transports/in_place.py)."""
        with ExitStack() as stack:
            for sender in self.senders.values():
                stack.enter_context(sender.changing())
            yield

    def train_step(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        """One optimizer step on this rank's rows (``batch_ipc`` holds only them, in ``plan.rows``'
        order); returns summed statistics."""
        with self._changing_weights():
            return self._train_step(batch_ipc, plan)

    def _train_step(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        t0 = time.perf_counter()
        table = from_ipc_bytes(batch_ipc)
        if table.num_rows != len(plan.rows):
            raise ValueError(f"rank {self.rank}: got {table.num_rows} rows, planned {len(plan.rows)}")
        global_tokens = plan.global_tokens
        advantages = plan.advantages
        mb = self.cfg.learner.micro_batch_size
        local = list(range(table.num_rows))
        chunks = [local[i : i + mb] for i in range(0, len(local), mb)]
        if len(chunks) > self.gas or len(plan.pad_to) != self.gas:
            raise ValueError(f"rank {self.rank}: a plan of {len(chunks)} micro-batches for a DeepSpeed config of {self.gas}")
        pad_to = plan.pad_to
        self.engine.train()
        totals: dict[str, float] = {}
        # DeepSpeed divides each backward by the accumulation steps and averages across ranks;
        # undo both so the update is sum(token losses) / global_tokens.
        scale = self.gas * self.world_size
        ids = _column(table, "sample_id")
        nonfinite: list[str] = []  # the samples of micro-batches whose loss was not finite
        applied = True
        for i in range(self.gas):
            inputs = self._targets(table, chunks[i], advantages) if i < len(chunks) else self._empty_micro_batch()
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

    # --- weights out ----------------------------------------------------------------------

    def _named_for_export(self, adapter: bool = False) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
        """(HF name, parameter, LoRA layer or None). With LoRA the adapters are merged on export;
        with ``adapter`` (a push under model.lora.serve=adapter) the export is the adapter alone,
        under peft's saved names."""
        if adapter:
            for name, p in self.module.named_parameters():
                if (saved := saved_name(name)) is not None:
                    yield saved, p, None
            return
        if not self.lora:
            for name, p in self.module.named_parameters():
                yield name, p, None
            return
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        lora_weights = set()
        for mname, m in self.module.named_modules():
            if isinstance(m, LoraLayer):
                w = m.get_base_layer().weight
                lora_weights.add(id(w))
                yield mname[len(prefix):] + ".weight" if mname.startswith(prefix) else mname + ".weight", w, m
        for name, p in self.module.named_parameters():
            if id(p) in lora_weights or "lora_" in name:
                continue
            yield name[len(prefix):].replace(".base_layer", ""), p, None

    def _bucket_groups(self, adapter: bool = False) -> list[list]:
        """The export entries in buckets of at most sync.bucket_mb (in the push dtype)."""
        limit = self.cfg.sync.bucket_mb * 2**20
        bucket: list = []
        size = 0
        groups: list[list] = []
        for e in self._named_for_export(adapter):
            nbytes = _full_shape(e[1]).numel() * self.push_dtype.itemsize
            if bucket and size + nbytes > limit:
                groups.append(bucket)
                bucket, size = [], 0
            bucket.append(e)
            size += nbytes
        if bucket:
            groups.append(bucket)
        return groups

    def weight_layout(self) -> list[BucketLayout]:
        """What every push sends, bucket by bucket, known without gathering anything."""
        dtype = str(self.push_dtype).removeprefix("torch.")
        return [
            BucketLayout(tuple(name for name, _, _ in g), tuple(tuple(_full_shape(p)) for _, p, _ in g), dtype)
            for g in self._bucket_groups(self.push_adapter)
        ]

    def _full_buckets(self, device: torch.device | str = "cpu", *, copy: bool = True,
                      adapter: bool = False) -> Iterator[NamedTensors]:
        """Full-size tensors on ``device`` in buckets of sync.bucket_mb; ZeRO-3 gathers one bucket
        at a time.

        Every rank must iterate (the gathers are collective); only rank 0 gets tensors. With
        ``copy=False`` a tensor may be the parameter itself (or ZeRO-3's gathered copy of it),
        valid only until the next bucket is asked for: for a consumer that copies each bucket
        out before it asks for the next (a push: into the object store or a broadcast buffer),
        which then saves one copy of the weights.
        """
        import deepspeed

        zero3 = self.cfg.learner.zero_stage == 3
        for group in self._bucket_groups(adapter):
            params = [p for _, p, _ in group]
            if self.lora:
                params += [q for _, _, m in group if m is not None for n, q in m.named_parameters() if "lora_" in n]
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
            out: NamedTensors = []
            with ctx, torch.no_grad():
                if self.rank == 0:
                    for name, p, layer in group:
                        w = p.detach()
                        if layer is not None and not getattr(layer, "merged", False):
                            w = w + layer.get_delta_weight("default")
                        w = w.to(device, self.push_dtype)
                        # A conversion or a LoRA merge already made a new tensor.
                        if copy and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                            w = w.clone()
                        out.append((name, w))
                # Inside the gather: ZeRO-3 frees the full parameters when it ends.
                yield out

    # --- weights out: pushes (rank 0 sends; every rank takes part in ZeRO-3's gathers) -------

    def _sender(self, name: str) -> WeightSender:
        if name not in self.senders:
            sender = transport(name).make_sender(self.device, self.cfg.sync.timeout_s)
            # The weights that keep their memory between pushes: rank 0's own parameters in the
            # push dtype (ZeRO-3 gathers them anew for each push; a LoRA merge or a conversion
            # makes new tensors).
            sender.prepare([] if self.cfg.learner.zero_stage == 3 else [
                p.detach() for _, p, layer in self._named_for_export(self.push_adapter)
                if layer is None and p.dtype == self.push_dtype
            ])
            self.senders[name] = sender
        return self.senders[name]

    def push_weights(self, version: int, transport_name: str, groups: tuple[str, ...] = ()) -> dict | None:
        """Push the current weights as ``version`` through ``transport_name`` (to ``groups``, for a
        collective transport). Rank 0 returns ``{"ok", "update", "error", "num_bytes"}``; the other
        ranks only take part in the gathers and return None.

        With LoRA every merged weight is sent (model.lora.serve=merged): vLLM fuses projections (qkv,
        gate_up) and reloads a fused weight whole, so sending only the adapted q and v would leave k
        undefined; with model.lora.serve=adapter the adapter alone is sent. A failed
        send is reported, not raised: the other ranks still have gathers to finish, and a raise
        would take the whole learner group down over what a retry can fix.
        """
        if self.rank != 0:
            for _ in self._full_buckets(copy=False, adapter=self.push_adapter):
                pass
            return None
        sender = self._sender(transport_name)
        # Every sender copies each bucket out (ray.put, a broadcast) before it asks for the next.
        buckets = self._full_buckets(sender.device, copy=False, adapter=self.push_adapter)
        try:
            update = sender.send(version, buckets, layout=self.weight_layout(), groups=groups)
            return {"ok": True, "update": update, "error": None, "num_bytes": update.num_bytes}
        except Exception as exc:  # a broken group, a full object store, out of memory packing a bucket
            for g in groups:
                sender.close(g, f"the sender failed: {type(exc).__name__}: {exc}")
            for _ in buckets:  # the other ranks are still gathering these
                pass
            return {"ok": False, "update": None, "error": f"{type(exc).__name__}: {exc}", "num_bytes": 0}

    # --- collective transports' groups; rank 0 only -------------------------------------------

    def open_weight_group(self, name: str, world_size: int, transport_name: str) -> tuple[str, int]:
        """Host the rendezvous of a new weight group; returns (host, port) for its members."""
        import ray

        port = self._sender(transport_name).open(name, world_size)
        return ray.util.get_node_ip_address(), port

    def join_weight_group(self, spec: GroupSpec) -> None:
        self._sender(spec.backend).join(spec)

    def close_weight_group(self, name: str, transport_name: str) -> None:
        self._sender(transport_name).close(name)

    def export_hf(self, out_dir: str) -> str | None:
        """HF-format weights (LoRA merged) that transformers and vLLM load directly."""
        state = {}
        for bucket in self._full_buckets():
            state.update(bucket)
        if self.rank != 0:
            return None
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.cfg.model.trust_remote_code)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.to(self.push_dtype).save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)
        return out_dir

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights on rank 0 (for checks)."""
        state = {}
        for bucket in self._full_buckets():
            state.update(bucket)
        return state if self.rank == 0 else None

    # --- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag="learner", client_state={"step": self.step})

    def load_checkpoint(self, ckpt_dir: str) -> int:
        load_checkpoints_as_tensors(self.engine)  # never unpickle what is on disk
        with self._changing_weights():
            _, client = self.engine.load_checkpoint(ckpt_dir, tag="learner")
        self.step = int((client or {}).get("step", 0))
        return self.step


class PolicyLoss(torch.nn.Module):
    """The policy with the loss as its forward: DeepSpeed wraps this module.

    ZeRO-3 hangs its parameter bookkeeping on the forward hooks of the module it wraps, so the
    decoder, the chunked LM head and the loss must all run inside one call of that module; the
    loss needs hidden states rather than full [B, L, V] logits, so the HF model's own forward is
    not the one to wrap.
    """

    def __init__(self, policy: torch.nn.Module, spec: LossSpec):
        super().__init__()
        self.policy = policy
        self.spec = spec
        self.stop_ids = stop_token_ids(policy)

    def forward(self, input_ids, attention_mask, rows, cols, targets: TokenTargets, normalizer: float, pad_to: int = 0,
                last: LastPositions | None = None):
        hidden = self.policy.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        sel = hidden[rows, cols]  # [N, H]: the positions that predict loss tokens
        if pad_to > sel.shape[0]:
            sel, targets = _pad_positions(sel, targets, pad_to)
        loss, stats = chunked_loss(sel, self.policy.get_output_embeddings(), targets, self.spec, normalizer=normalizer)
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


class LearnerGroup:
    """Creates the W rank actors in a placement group and fans calls out to them."""

    def __init__(self, cfg: Config, model_path: str, *, place_timeout: float | None = None):
        """``place_timeout``: how long to wait for the ranks' resources (None: as long as it takes,
        for an autoscaling cluster); past it, ray.exceptions.GetTimeoutError."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        w = cfg.learner.num_ranks
        bundle = {"CPU": cfg.learner.num_cpus_per_rank, **cfg.learner.resources}
        if cfg.learner.num_gpus_per_rank:
            bundle["GPU"] = cfg.learner.num_gpus_per_rank
        self.pg = placement_group([dict(bundle) for _ in range(w)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=place_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise
        cls = ray.remote(LearnerRank)
        self.ranks = [
            cls.options(
                num_cpus=cfg.learner.num_cpus_per_rank,
                num_gpus=cfg.learner.num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                name=None,
            ).remote(cfg, model_path, i, w)
            for i in range(w)
        ]
        # A rank that dies while the group starts must not leave the others waiting in the
        # rendezvous: _wait_all shuts the whole group down and raises its error (a learner death
        # like any other, which the driver recovers from: launch/driver.py, _recover_learner).
        addr, port = self._wait_all([self.ranks[0].master_address.remote()])[0]
        self.info = self._wait_all([r.setup.remote(addr, port) for r in self.ranks])

    def _all(self, method: str, *args) -> list:
        """Call every rank with the same arguments (see :meth:`_all_each`)."""
        return self._all_each(method, [args] * len(self.ranks))

    def _all_each(self, method: str, args_per_rank: list[tuple]) -> list:
        """Call every rank, each with its own arguments (see :meth:`_wait_all`)."""
        return self._wait_all([getattr(r, method).remote(*args) for r, args in zip(self.ranks, args_per_rank)])

    def _wait_all(self, refs: list) -> list:
        """The results of one call per rank. If one fails, the others may wait forever in a
        collective: kill the group and raise the first error instead of hanging."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayError:
                self.shutdown()
                raise
        return ray.get(refs)

    def train_step(self, table: pa.Table) -> dict:
        """One optimizer step on a batch: planned here, each rank sent only its own rows."""
        return self.collect_train(self.submit_train(table))

    def submit_train(self, table: pa.Table) -> list:
        """Start :meth:`train_step` on every rank and return at once (one ref per rank), so that
        the driver can prepare the next batch meanwhile; :meth:`collect_train` waits for it."""
        import ray

        c = self.cfg.learner
        plans = plan_ranks(table, world_size=len(self.ranks), micro_batch_size=c.micro_batch_size,
                           micro_batches=micro_batches_per_rank(self.cfg), grpo=objective(self.cfg.algo).groups,
                           zero3=c.zero_stage == 3)
        parts = [ray.put(to_ipc_bytes(table.take(pa.array(p.rows, pa.int64())))) for p in plans]
        return [r.train_step.remote(part, plan) for r, part, plan in zip(self.ranks, parts, plans)]

    def collect_train(self, refs: list) -> dict:
        """The step's statistics summed over ranks (a rank that failed kills the group first)."""
        per_rank = self._wait_all(refs)
        summed: dict[str, float] = {}
        for stats in per_rank:
            for k, v in stats.items():
                if k in ("global_tokens", "grad_norm", "lr"):
                    summed[k] = v
                elif k == "train_seconds":
                    summed[k] = max(summed.get(k, 0.0), v)
                elif k == "update_skipped":
                    summed[k] = summed.get(k, False) or v
                elif k == "nonfinite_sample_ids":
                    summed[k] = summed.get(k, []) + v
                else:
                    summed[k] = summed.get(k, 0.0) + v
        return summed

    def submit_push(self, version: int, transport_name: str, groups: tuple[str, ...] = ()) -> list:
        """``push_weights`` on every rank without waiting (rank 0's ref first), so that the
        caller can watch the receivers of a collective push meanwhile. A rank that raises leaves
        the others in a collective: the caller must then :meth:`shutdown` the group, as
        :meth:`push` does."""
        return [r.push_weights.remote(version, transport_name, groups) for r in self.ranks]

    def push(self, version: int, transport_name: str) -> WeightUpdate:
        """A store-and-forward push: the update handle, once rank 0 has sent it."""
        sent = self._wait_all(self.submit_push(version, transport_name))[0]
        if not sent["ok"]:
            raise WeightSyncError(f"learner rank 0 could not push weight version {version} through "
                                  f"{transport_name}: {sent['error']}")
        return sent["update"]

    def weight_layout(self) -> list[BucketLayout]:
        import ray

        return ray.get(self.ranks[0].weight_layout.remote())

    def open_weight_group(self, name: str, world_size: int, transport_name: str) -> tuple[str, int]:
        import ray

        return ray.get(self.ranks[0].open_weight_group.remote(name, world_size, transport_name))

    def join_weight_group(self, spec: GroupSpec):
        """Returns at once (an ObjectRef): rank 0 joins while the receivers do."""
        return self.ranks[0].join_weight_group.remote(spec)

    def close_weight_group(self, name: str, transport_name: str) -> None:
        import ray

        if self.ranks:  # after a failure the group is gone, and its weight groups with it
            ray.get(self.ranks[0].close_weight_group.remote(name, transport_name))

    def export_hf(self, out_dir: str) -> str:
        return self._all("export_hf", out_dir)[0]

    def full_state(self) -> dict[str, torch.Tensor]:
        return self._all("full_state")[0]

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self._all("save_checkpoint", ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str) -> int:
        return self._all("load_checkpoint", ckpt_dir)[0]

    def nodes(self) -> list[str]:
        """The Ray node id each rank runs on."""
        import ray

        return ray.get([r.node_id.remote() for r in self.ranks])

    def broken(self) -> bool:
        """Whether a rank has died (a failed call already shut the group down, or one that would)."""
        import ray

        if not self.ranks:
            return True
        try:
            ray.get([r.alive.remote() for r in self.ranks], timeout=60)
        except ray.exceptions.RayError:
            return True
        return False

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self.ranks:
            return
        ranks, self.ranks = self.ranks, []
        for r in ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
