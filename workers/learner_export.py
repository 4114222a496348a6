"""The learner rank's weights out: the export in buckets, the transports' senders and their groups
(docs/DESIGN.md, "Weight sync"; "The learner").

The weights leave a rank in the push dtype, bucket by bucket (``sync.bucket_mb``), under their
Hugging Face names; with LoRA the adapters merged in, or (``model.lora.serve=adapter``) the adapter
alone. Under ZeRO-3 every rank takes part in each bucket's gather and only rank 0 gets tensors.
Rank 0 owns one sender per transport it has pushed through, and the collective transports' groups.
Knows nothing of the loss or of checkpoints.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator

import torch

from opsd.config import Config, serves_adapter
from opsd.dtypes import torch_dtype
from opsd.lora import saved_name
from opsd.workers.transports import transport
from opsd.workers.transports.base import BucketLayout, GroupSpec, NamedTensors, WeightSender


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 holds only a partition of it."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class WeightExport:
    """One rank's weights as buckets of full tensors, and rank 0's senders."""

    def __init__(self, cfg: Config, engine: Any, rank: int, lora: bool):
        self.cfg, self.engine, self.rank, self.lora = cfg, engine, rank, lora
        self.device = engine.device
        # model.lora.serve=adapter: pushes carry the adapter alone (opsd/lora.py)
        self.push_adapter = serves_adapter(cfg)
        self.senders: dict[str, WeightSender] = {}  # rank 0: one per transport it has pushed through
        # Weights travel in the serving dtype (the fp32 master copy stays in the optimizer).
        self.push_dtype = torch_dtype(cfg.model.dtype)

    @property
    def module(self) -> torch.nn.Module:
        """The HF model (a PeftModel with LoRA)."""
        return self.engine.module.policy

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around anything that changes the weights: every sender is told (receivers reading them
        in place wait, and updates pushed before are refused afterwards: transports/in_place.py)."""
        with ExitStack() as stack:
            for sender in self.senders.values():
                stack.enter_context(sender.changing())
            yield

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

    def full_buckets(self, device: torch.device | str = "cpu", *, copy: bool = True,
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
            for _ in self.full_buckets(copy=False, adapter=self.push_adapter):
                pass
            return None
        sender = self._sender(transport_name)
        # Every sender copies each bucket out (ray.put, a broadcast) before it asks for the next.
        buckets = self.full_buckets(sender.device, copy=False, adapter=self.push_adapter)
        try:
            update = sender.send(version, buckets, layout=self.weight_layout(), groups=groups)
            return {"ok": True, "update": update, "error": None, "num_bytes": update.num_bytes}
        except Exception as exc:  # a broken group, a full object store, out of memory packing a bucket
            for g in groups:
                sender.close(g, f"the sender failed: {type(exc).__name__}: {exc}")
            for _ in buckets:  # the other ranks are still gathering these
                pass
            return {"ok": False, "update": None, "error": f"{type(exc).__name__}: {exc}", "num_bytes": 0}

    def open_weight_group(self, name: str, world_size: int, transport_name: str) -> tuple[str, int]:
        """Host the rendezvous of a new weight group; returns (host, port) for its members."""
        import ray

        port = self._sender(transport_name).open(name, world_size)
        return ray.util.get_node_ip_address(), port

    def join_weight_group(self, spec: GroupSpec) -> None:
        self._sender(spec.backend).join(spec)

    def close_weight_group(self, name: str, transport_name: str) -> None:
        self._sender(transport_name).close(name)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights on rank 0 (for checks)."""
        state = {}
        for bucket in self.full_buckets():
            state.update(bucket)
        return state if self.rank == 0 else None
