"""The learner group: W Ray actors forming one DeepSpeed ZeRO data-parallel group.

The group plans the step once (``plan_ranks``: each rank's rows, about equal tokens per rank and
micro-batches of similar length; the whole batch's loss-token count; GRPO's group advantages;
ZeRO-3's per-micro-batch padding) and sends every rank only its own rows as an Arrow IPC slice.

A rank (``LearnerRank``) is a thin actor: it joins the group, builds the DeepSpeed engine and
composes three roles, each in a module of its own (docs/DESIGN.md, "The learner"):

- ``learner_training.Training``: the step and its micro-batches, the objective's inputs, the loss;
- ``learner_export.WeightExport``: the weights in buckets, the transports' senders and groups;
- ``learner_checkpoints.Checkpoints``: DeepSpeed checkpoints and the Hugging Face export.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import pyarrow as pa
import torch

from opsd.batch import to_ipc_bytes
from opsd.config import Config, actor_threads
from opsd.losses import fp32_lm_head
from opsd.lora import peft_config
from opsd.objectives import objective
from opsd.workers.deepspeed_compat import check_version, import_muon_uncompiled, without_shm_comm_op
from opsd.workers.learner_checkpoints import Checkpoints
from opsd.workers.learner_export import WeightExport
from opsd.workers.learner_training import (
    PolicyLoss, RankPlan, Training, loss_spec, micro_batches_per_rank, plan_ranks,
)
from opsd.workers.transports.base import BucketLayout, GroupSpec, WeightSyncError, WeightUpdate
from opsd.workers.transports.broadcast import open_store

# How long a rank waits for the others to reach the learner group's rendezvous (torch's own
# default for a process group).
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)


# A rank that dies in a collective is often seen first through a survivor: its collective fails
# ("Connection closed by peer") a moment before Ray reports the death of the rank itself. How long
# the first failed call waits for the other ranks' calls to show whether one of them died.
DEATH_GRACE_S = 60.0


def rank_failure(refs: list, grace_s: float = DEATH_GRACE_S) -> BaseException | None:
    """None when every rank's call succeeded; else the error to raise for the group.

    A rank's death (an actor error) wins over any other failure seen within ``grace_s`` before
    it: the survivors' failed collectives are only its consequence, and only a death is what the
    driver recovers from (launch/recovery.py, ``learner_died``). The grace is spent only while
    other calls are still running and none has died; calls that all end sooner end it sooner."""
    import ray

    def error_of(ref) -> BaseException | None:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            return exc
        return None

    died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        first = error_of(done[0])
        if first is None:
            continue
        if isinstance(first, died):
            return first
        deadline = time.monotonic() + grace_s
        while pending and (left := deadline - time.monotonic()) > 0:
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if done and isinstance(later := error_of(done[0]), died):
                return later
        return first
    return None


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
        """Join the group, load the model, start the DeepSpeed engine and the rank's roles."""
        self._init_group(master_addr, master_port)
        import deepspeed

        check_version()
        if self.cpu:
            without_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo" if self.cpu else "nccl", auto_mpi_discovery=False)
        torch.manual_seed(self.cfg.train.seed)
        model = self._load_model()
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        trainable = [p for p in model.parameters() if p.requires_grad]
        import_muon_uncompiled()
        self.engine, _, _, _ = deepspeed.initialize(
            model=PolicyLoss(model, loss_spec(self.cfg), self.cfg.model.lm_head_path), model_parameters=trainable,
            config=deepspeed_config(self.cfg),
        )
        self.export = WeightExport(self.cfg, self.engine, self.rank, self.cfg.model.lora.enabled)
        self.training = Training(self.cfg, self.engine, self.rank, self.world_size, pad_id, self.export.changing)
        self.checkpoints = Checkpoints(self.cfg, self.model_path, self.rank, self.engine, self.training, self.export)
        return {"rank": self.rank, "pid": os.getpid(), "trainable_params": sum(p.numel() for p in trainable),
                "gradient_checkpointing": bool(getattr(self.export.module, "is_gradient_checkpointing", False))}

    def _init_group(self, master_addr: str, master_port: int) -> None:
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

    def _load_model(self) -> torch.nn.Module:
        """The policy as the engine trains it: fp32 weights (DeepSpeed casts them), the fp32 head,
        gradient checkpointing and LoRA adapters as configured."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, trust_remote_code=self.cfg.model.trust_remote_code
        )
        if self.cfg.model.fp32_lm_head:
            fp32_lm_head(model.get_output_embeddings())  # DeepSpeed casts the weight to bf16; the matmul stays fp32
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.model.lora.enabled:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config(self.cfg.model.lora))
        return model

    def _local_gpu(self) -> int:
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")
        return 0 if len(ids) == 1 else self.rank % len(ids)

    # --- the roles, as the group calls them ----------------------------------------------------

    def train_step(self, batch_ipc: bytes, plan: RankPlan) -> dict:
        """One optimizer step on this rank's rows (learner_training.Training.train_step)."""
        return self.training.train_step(batch_ipc, plan)

    def weight_layout(self) -> list[BucketLayout]:
        return self.export.weight_layout()

    def push_weights(self, version: int, transport_name: str, groups: tuple[str, ...] = ()) -> dict | None:
        """Push the weights as ``version`` (learner_export.WeightExport.push_weights); rank 0's report."""
        return self.export.push_weights(version, transport_name, groups)

    def open_weight_group(self, name: str, world_size: int, transport_name: str) -> tuple[str, int]:
        return self.export.open_weight_group(name, world_size, transport_name)

    def join_weight_group(self, spec: GroupSpec) -> None:
        self.export.join_weight_group(spec)

    def close_weight_group(self, name: str, transport_name: str) -> None:
        self.export.close_weight_group(name, transport_name)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        return self.export.full_state()

    def export_hf(self, out_dir: str) -> str | None:
        return self.checkpoints.export_hf(out_dir)

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self.checkpoints.save_checkpoint(ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str) -> int:
        return self.checkpoints.load_checkpoint(ckpt_dir)


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
        collective: kill the group and raise the error instead of hanging (:func:`rank_failure`
        says which error)."""
        import ray

        error = rank_failure(refs)
        if error is not None:
            self.shutdown()
            raise error
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
                elif k in ("update_skipped", "no_loss_tokens"):
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
