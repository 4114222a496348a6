"""``gloo`` and ``nccl``: collective transports. Learner rank 0 and every receiving process of one
pool (each vLLM worker of each engine, each scorer) form one process group per pool, outside
torch.distributed's default group, and every bucket is broadcast from rank 0 (base.py shows the
calls). Receivers allocate from the :class:`BucketLayout` of the update they are handed
beforehand, so the sender and all receivers take part in the same calls at the same time.

The NCCL group is vLLM's own (``StatelessProcessGroup`` + ``PyNcclCommunicator``, as in
``vllm.distributed.weight_transfer``); gloo is torch's ``ProcessGroupGloo``. Both run the same
protocol: a header (version, bucket count, element count), then one flat buffer per bucket. vLLM's
own NCCL engine loads each tensor as it arrives; here a receiver stages the whole update on the
host first, which is what makes a push all-or-nothing.

In a push any member that fails raises an abort flag in the group's store (which learner rank 0
hosts); the others stop waiting at once instead of running into ``sync.timeout_s``, and the driver
forms the group again before it retries. The driver can raise the flag from outside too
(:func:`abort_group`), for a member that died before it could.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from opsd.workers.transports.base import (
    BucketLayout, GroupSpec, NamedTensors, WeightReceiver, WeightSender, WeightSyncError, WeightUpdate, announce,
    layout_of,
)

_ABORT_KEY = "abort"


def pack(bucket: NamedTensors, device: torch.device | str) -> torch.Tensor:
    """One bucket as one flat tensor [sum of numels]: one broadcast per bucket, not one per tensor."""
    return torch.cat([t.detach().reshape(-1).to(device) for _, t in bucket])


def unpack(flat: torch.Tensor, layout: BucketLayout) -> NamedTensors:
    """Inverse of :func:`pack`; the tensors are views into ``flat``."""
    if flat.numel() != layout.numel:
        raise WeightSyncError(f"a bucket of {flat.numel()} elements cannot hold {layout.numel} ({layout.names[0]}, ...)")
    sizes = [math.prod(s) for s in layout.shapes]
    return [(n, part.view(shape)) for n, shape, part in zip(layout.names, layout.shapes, flat.split(sizes))]


def spec_from(obj: GroupSpec | dict) -> GroupSpec:
    """A GroupSpec, also from the dict that vLLM's msgpack makes of it on the way into an engine
    process (``collective_rpc`` arguments travel as msgpack when the engine has its own process)."""
    return obj if isinstance(obj, GroupSpec) else GroupSpec(**obj)


def update_from(obj: WeightUpdate | dict) -> WeightUpdate:
    """A collective WeightUpdate, also from its msgpack form (see :func:`spec_from`)."""
    if isinstance(obj, WeightUpdate):
        return obj
    layout = tuple(
        b if isinstance(b, BucketLayout) else
        BucketLayout(tuple(b["names"]), tuple(tuple(shape) for shape in b["shapes"]), b["dtype"])
        for b in obj["handles"]
    )
    return WeightUpdate(obj["version"], obj["transport"], layout, obj["num_tensors"], obj["num_bytes"])


def open_store(world_size: int, timeout_s: float) -> Any:
    """The rendezvous store of a new group, hosted by the sender on a free port (``store.port``)."""
    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def _raise_abort(store: Any, reason: str) -> None:
    """Set the group's abort flag unless it is set already: the first reason is the one kept."""
    try:
        store.compare_set(_ABORT_KEY, "", reason)
    except RuntimeError:
        pass  # the store is gone: the members find that out by themselves


def abort_group(host: str, port: int, reason: str, timeout_s: float = 30.0) -> None:
    """From outside a group (the driver): stop its members waiting, e.g. for one that died
    before it could join or while it was receiving."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except RuntimeError:
        return  # no store, no one waiting on it
    _raise_abort(store, reason)


def _abort_reason(store: Any) -> str | None:
    """Why the group was aborted, or None when it was not (or its store is gone)."""
    try:
        if store.check([_ABORT_KEY]):
            return store.get(_ABORT_KEY).decode(errors="replace")
    except RuntimeError:
        pass
    return None


def _poll(store: Any, done: Callable[[], bool], *, timeout_s: float, what: str, on_abort: Callable[[], None]) -> None:
    """Wait for ``done()`` while watching the group's abort flag and the deadline."""
    deadline = time.monotonic() + timeout_s
    pause = 1e-4
    while not done():
        try:
            aborted = store.check([_ABORT_KEY])
        except RuntimeError as exc:  # the sender, which hosts the store, is gone
            on_abort()
            raise WeightSyncError(f"{what}: lost the group's store: {exc}") from exc
        if aborted:
            reason = store.get(_ABORT_KEY).decode(errors="replace")
            on_abort()
            raise WeightSyncError(f"{what}: the group was aborted: {reason}")
        if time.monotonic() > deadline:
            _raise_abort(store, f"{what}: timed out after sync.timeout_s={timeout_s:g}s")
            on_abort()
            raise WeightSyncError(f"{what}: waited more than sync.timeout_s={timeout_s:g}s")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)


def gloo_devices(store_host: str, store_port: int) -> list:
    """The network devices a gloo member listens and connects on. By default the local address
    that routes to the group's store (learner rank 0's node): the one the other members can reach
    it at. Gloo's own default is the address the host name resolves to, which in a container or
    a network namespace is often loopback or an address of another network, and the members
    then cannot connect. ``GLOO_SOCKET_IFNAME`` (torch's variable, comma-separated interfaces)
    overrides it."""
    import torch.distributed as dist

    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    if interfaces:
        return [dist.ProcessGroupGloo.create_device(interface=i) for i in interfaces]
    with socket.socket(socket.AF_INET6 if ":" in store_host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((store_host, store_port))  # UDP: no packet is sent, the route is looked up
        local = probe.getsockname()[0]
    return [dist.ProcessGroupGloo.create_device(hostname=local)]


def _indexed(device: torch.device | str) -> torch.device:
    """PyNccl compares devices exactly: a bare ``cuda`` must name its GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class BroadcastGroup:
    """One process group for weight broadcasts from rank 0, apart from any default group
    (DeepSpeed's on the learner, vLLM's tensor-parallel one in an engine).

    Every wait polls the group's store for an abort flag, so when one member fails the others
    give up at once; ``timeout_s`` bounds every wait (NCCL has no timeout of its own here).
    Joining starts with a barrier on the store, so a member that never arrives, or fails to
    join, stops the others there rather than inside gloo's or NCCL's own set-up.
    """

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str, store: Any = None):
        import torch.distributed as dist

        if spec.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group '{spec.name}': backend {spec.backend!r} is neither gloo nor nccl")
        self.name, self.backend, self.rank, self.timeout_s = spec.name, spec.backend, rank, spec.timeout_s
        self.pg = self.comm = self.stream = None
        if store is None:
            store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False,
                                  timeout=timedelta(seconds=spec.timeout_s))
        self.store = store
        try:
            self.device = _indexed(device)
            store.add("joined", 1)
            _poll(store, lambda: store.add("joined", 0) >= spec.world_size, timeout_s=spec.timeout_s,
                  what=f"weight group '{spec.name}' rank {rank} joining", on_abort=lambda: None)
            prefixed = dist.PrefixStore(f"opsd/{spec.name}", store)
            if spec.backend == "gloo":
                options = dist.ProcessGroupGloo._Options()
                options._timeout = timedelta(seconds=spec.timeout_s)
                options._devices = gloo_devices(spec.host, spec.port)
                self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, options)
            else:
                self._init_nccl(prefixed, spec)
        except BaseException as exc:  # whatever stopped it joining (an interrupt too): the others are told, then it is raised
            _raise_abort(store, f"rank {rank} could not join: {exc}")
            self.close()
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"weight group '{spec.name}': rank {rank} could not join: {exc}") from exc

    def _init_nccl(self, prefixed: Any, spec: GroupSpec) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.nccl import unpinned_nccl_env

        # vLLM pins NCCL settings in its own processes; a communicator shared with processes
        # outside vLLM (the learner) is created without them, as vLLM's weight transfer does.
        with unpinned_nccl_env():
            self.comm = PyNcclCommunicator(
                StatelessProcessGroup(rank=self.rank, world_size=spec.world_size, store=prefixed), device=self.device
            )
        if not self.comm.available or self.comm.disabled:
            # PyNccl turns itself off quietly (no NCCL library, VLLM_DISABLE_PYNCCL); its
            # broadcasts would then leave the receive buffers as they were.
            self.comm = None
            raise WeightSyncError(f"weight group '{spec.name}': NCCL is not available on {self.device}")
        # A stream of its own: a broadcast that waits on a slow member must not hold up the
        # engine's compute stream.
        self.stream = torch.cuda.Stream(self.device)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """From rank 0 into ``tensor`` on every other member (in place)."""
        what = f"weight group '{self.name}' rank {self.rank}"
        if self.pg is not None:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            work = self.pg.broadcast([tensor], opts)
            _poll(self.store, work.is_completed, timeout_s=self.timeout_s, what=what, on_abort=self.close)
            try:
                work.wait()
            except RuntimeError as exc:
                # A member that aborts writes its reason to the store before it drops its
                # connections, so a broadcast broken by that drop finds the reason there: report
                # the cause, not the closed connection it led to.
                reason = _abort_reason(self.store)
                if reason is not None:
                    self.close()
                    raise WeightSyncError(f"{what}: the group was aborted: {reason}") from exc
                self.abort(f"rank {self.rank}: {exc}")
                raise WeightSyncError(f"{what}: broadcast failed: {exc}") from exc
        elif self.comm is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # tensor is ready
            self.comm.broadcast(tensor, src=0, stream=self.stream)
            # If the broadcast is aborted, its kernel may still write into tensor: keep the
            # memory away from the caching allocator until the stream is done with it.
            tensor.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
            _poll(self.store, done.query, timeout_s=self.timeout_s, what=what, on_abort=self.close)
        else:
            raise WeightSyncError(f"{what}: the group is closed")

    def abort(self, reason: str | None) -> None:
        """Tell the other members to stop waiting, and drop this member's connections."""
        if reason is not None:
            _raise_abort(self.store, reason)
        self.close()

    def close(self) -> None:
        if self.pg is not None:
            self.pg.abort()
            self.pg = None
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None

    @property
    def closed(self) -> bool:
        return self.pg is None and self.comm is None



def _header(update: WeightUpdate, device: torch.device) -> torch.Tensor:
    total = sum(b.numel for b in update.handles)
    return torch.tensor([update.version, len(update.handles), total], dtype=torch.int64, device=device)


class BroadcastSender(WeightSender):
    """Learner rank 0's end: one group per receiving pool, each hosted by a store of its own."""

    backend = ""

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        super().__init__(_indexed(device if self.backend == "nccl" else "cpu"), timeout_s)
        # A group's store outlives the group until the next one of that name opens, so that
        # members still waiting read why it was aborted rather than find the store gone.
        self.stores: dict[str, Any] = {}
        self.groups: dict[str, BroadcastGroup] = {}

    def open(self, group: str, world_size: int) -> int:
        self.close(group, "a new group of this name is being formed")
        self.stores[group] = open_store(world_size, self.timeout_s)
        return self.stores[group].port

    def join(self, spec: GroupSpec) -> None:
        self.groups[spec.name] = BroadcastGroup(spec, 0, self.device, store=self.stores[spec.name])

    def close(self, group: str, reason: str | None = None) -> None:
        old = self.groups.pop(group, None)
        if old is not None:
            old.abort(reason)
        elif reason is not None and group in self.stores:
            _raise_abort(self.stores[group], reason)  # members may be waiting to join

    def send(self, version: int, buckets: Iterable[NamedTensors], *, layout: Sequence[BucketLayout] = (),
             groups: Sequence[str] = ()) -> WeightUpdate:
        """Broadcast the buckets, which must match ``layout``, to every named group. On failure the
        caller closes the groups with a reason (:meth:`close`), which releases their receivers."""
        update = announce(version, self.backend, layout)
        missing = [g for g in groups if g not in self.groups or self.groups[g].closed]
        if missing:
            raise WeightSyncError(f"weight groups {missing} are not formed (or were aborted); form them again")
        targets = [self.groups[g] for g in groups]
        header = _header(update, self.device)
        for g in targets:
            g.broadcast(header)
        sent = 0
        for bucket in buckets:
            if sent >= len(update.handles) or layout_of(bucket) != update.handles[sent]:
                raise WeightSyncError(
                    f"bucket {sent} of weight version {update.version} does not match the layout the receivers hold"
                )
            flat = pack(bucket, self.device)
            for g in targets:
                g.broadcast(flat)
            sent += 1
        if sent != len(update.handles):
            raise WeightSyncError(f"weight version {update.version}: sent {sent} buckets, the layout has {len(update.handles)}")
        return update


class BroadcastReceiver(WeightReceiver):
    """A receiving process's end: stages the whole update on the host, then hands it over."""

    backend = ""

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        super().__init__(_indexed(device if self.backend == "nccl" else "cpu"), timeout_s)
        self.group: BroadcastGroup | None = None

    def join(self, spec: GroupSpec, rank: int) -> None:
        self.close()
        self.group = BroadcastGroup(spec, rank, self.device)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        yield self._receive(update)

    def _receive(self, update: WeightUpdate) -> NamedTensors:
        group = self.group
        if group is None or group.closed:
            raise WeightSyncError(f"weight version {update.version}: this receiver is in no formed weight group")
        try:
            header = torch.zeros(3, dtype=torch.int64, device=self.device)
            group.broadcast(header)
            expected = _header(update, self.device)
            if not torch.equal(header, expected):
                raise WeightSyncError(
                    f"the sender is pushing (version, buckets, elements) = {tuple(header.tolist())}, this receiver "
                    f"was told {tuple(expected.tolist())}"
                )
            staged: NamedTensors = []
            for layout in update.handles:
                flat = torch.empty(layout.numel, dtype=getattr(torch, layout.dtype), device=self.device)
                group.broadcast(flat)
                staged.extend(unpack(flat.to("cpu"), layout))
            return staged
        except BaseException as exc:  # whatever stopped the receive: the group is aborted, then it is raised
            if not group.closed:
                group.abort(f"a receiver (rank {group.rank}) failed: {exc}")
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"receiving weight version {update.version} failed: {exc}") from exc


class GlooSender(BroadcastSender):
    backend = "gloo"  # between hosts' memory over TCP


class GlooReceiver(BroadcastReceiver):
    backend = "gloo"


class NcclSender(BroadcastSender):
    backend = "nccl"  # between GPUs


class NcclReceiver(BroadcastReceiver):
    backend = "nccl"
