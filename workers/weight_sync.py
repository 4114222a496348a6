"""Moving weights from learner rank 0 to the rollout engines (and a live / EMA teacher).

Two kinds of transport behind one registry, in the shape of a checkpoint engine:

* store-and-forward (``object_store``, Ray shared memory; CPU and debugging): the sender puts every
  bucket somewhere, returns a small handle, and receivers fetch it whenever they are called::

      update = sender.send(version, buckets)      # on learner rank 0
      with receiver.receiving(update) as tensors: # on each rollout worker / scorer, later
          load(tensors)

  On one host the sender may skip the store: tensors that lie in its shared memory
  (``send(..., shared=SharedWeights)``, workers/shared_weights.py) travel as where they lie,
  and the receiver copies them from there inside ``receiving``, while the learner waits.

* collective (``gloo`` over TCP between hosts' memory, ``nccl`` between GPUs): learner rank 0 and
  every receiving process (each vLLM worker of each engine, each scorer) form one process group
  per receiving pool, outside torch.distributed's default group, and every bucket is broadcast
  from rank 0. Receivers allocate from a :class:`BucketLayout` they are given beforehand, so the
  sender and all receivers take part in the same calls at the same time::

      host, port = sender.open(name, world_size)  # learner rank 0 hosts the rendezvous store
      receiver.join(spec, rank); sender.join(spec)         # all members, concurrently
      receiver.receive(update) || sender.send(update, buckets, [name])   # concurrently

  The NCCL group is vLLM's own (``StatelessProcessGroup`` + ``PyNcclCommunicator``, as in
  ``vllm.distributed.weight_transfer``); gloo is torch's ``ProcessGroupGloo``. Both run the same
  protocol here: a header (version, bucket count, element count), then one flat buffer per
  bucket. vLLM's own NCCL engine loads each tensor as it arrives; here a receiver stages the whole
  update on the host first, which is what makes a push all-or-nothing.

A push is all-or-nothing: a receiver first stages every bucket of the update, checks names and
shapes against its own model, and only then loads them; on any failure it keeps its old weights
and version, and the driver retries or fails loudly. In a collective push any member that fails
raises an abort flag in the group's store; the others stop waiting at once instead of running
into the timeout, and the driver forms the group again before it retries.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import torch

from opsd.workers.shared_weights import SharedHandle, SharedReader, SharedWeights, SharedWeightsError

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A push that did not reach a receiver; its old weights and version are kept."""


class StaleWeightsError(RuntimeError):
    """An actor asked to work at one weights version holds another (e.g. it was just restarted)."""


def require_version(actual: int, expected: int | None, who: str) -> None:
    if expected is not None and actual != expected:
        raise StaleWeightsError(f"{who} holds weights version {actual}, the driver expects {expected}")


@dataclass(frozen=True)
class WeightUpdate:
    """What travels through the driver: a version and handles to the buckets, not the tensors."""

    version: int
    transport: str
    handles: tuple = ()  # transport-specific, one per bucket
    num_tensors: int = 0
    num_bytes: int = 0
    # object_store on one host: where the buckets of ``handles`` that are SharedTensor tuples lie
    # in learner rank 0's memory (workers/shared_weights.py)
    shared: SharedHandle | None = None


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[NamedTensors]:
    """Group (name, tensor) pairs into buckets of at most ``bucket_mb`` (a larger tensor goes alone)."""
    limit = int(bucket_mb * 2**20)
    bucket: NamedTensors = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def check_against(named: NamedTensors, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Names and shapes of a staged update must match the receiving model, before any is loaded."""
    for name, t in named:
        if name not in expected_shapes:
            raise WeightSyncError(f"weight update has a tensor '{name}' that the receiving model does not have")
        if tuple(t.shape) != tuple(expected_shapes[name]):
            raise WeightSyncError(
                f"weight update tensor '{name}' has shape {tuple(t.shape)}, the receiver expects "
                f"{tuple(expected_shapes[name])}"
            )


class WeightSender:
    name = ""
    collective = False

    def send(self, version: int, buckets: Iterable[NamedTensors]) -> WeightUpdate:
        raise NotImplementedError


class WeightReceiver:
    name = ""
    collective = False

    def receive(self, update: WeightUpdate) -> NamedTensors:
        raise NotImplementedError

    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        """The whole update, for the caller to load inside the block (after which the tensors may
        no longer be valid: they can view memory the receiver does not own)."""
        yield self.receive(update)


# numpy has no bfloat16: such tensors travel as int16 arrays of the same bytes.
_NUMPY_STAND_IN = {torch.bfloat16: torch.int16}


def _as_numpy(t: torch.Tensor) -> Any:
    """A numpy view of ``t``'s bytes (no copy for a contiguous CPU tensor)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(_NUMPY_STAND_IN.get(t.dtype, t.dtype)).numpy()


def _from_numpy(array: Any, dtype: str) -> torch.Tensor:
    """The tensor a bucket's array stands for, sharing its memory (the object store's, read-only)."""
    import warnings

    with warnings.catch_warnings():
        # Ray hands out read-only views of shared memory. Receivers only read what they are
        # pushed (they copy it into their own weights), so torch's warning does not apply.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    want = getattr(torch, dtype)
    return t.view(want) if t.dtype != want else t


def store_object(bucket: NamedTensors) -> tuple[list[str], list[str], list[Any]]:
    """What one bucket becomes in the object store: names, dtype names and numpy views."""
    return ([name for name, _ in bucket], [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [_as_numpy(t) for _, t in bucket])


def from_store_object(obj: tuple[list[str], list[str], list[Any]]) -> NamedTensors:
    names, dtypes, arrays = obj
    return [(name, _from_numpy(array, dtype)) for name, dtype, array in zip(names, dtypes, arrays)]


class ObjectStoreSender(WeightSender):
    """Each bucket becomes one object in Ray's shared-memory store, owned by the sender.

    A bucket travels as its names, dtypes and numpy views of its tensors. Ray writes numpy
    arrays into shared memory out of band (one copy, no pickling of the bytes) and hands them to
    a receiver on the same host as zero-copy views, so a push costs one copy into the store and
    the receiver's own copy into its weights. Torch tensors put as they are would be pickled
    instead, which is several times slower.

    Given ``shared`` (the sender's :class:`SharedWeights`), a tensor that lies in its shared
    segments is not put at all: the update says where it lies, and a receiver on this host
    copies it from there (one copy per push).
    """

    name = "object_store"

    def send(self, version: int, buckets: Iterable[NamedTensors], shared: SharedWeights | None = None) -> WeightUpdate:
        import ray

        handles: list = []
        n, nbytes = 0, 0
        for bucket in buckets:
            located = [shared.locate(name, t) for name, t in bucket] if shared is not None else [None] * len(bucket)
            in_place = tuple(st for st in located if st is not None)
            if in_place:
                handles.append(in_place)
                nbytes += sum(st.nbytes for st in in_place)
            rest = [pair for pair, st in zip(bucket, located) if st is None]
            if rest:
                names, dtypes, arrays = store_object(rest)
                handles.append(ray.put((names, dtypes, arrays)))
                nbytes += sum(a.nbytes for a in arrays)
            n += len(bucket)
        handle = None
        if any(isinstance(h, tuple) for h in handles):
            shared.publish(version)
            handle = shared.handle()
        return WeightUpdate(version, self.name, tuple(handles), n, nbytes, handle)


class ObjectStoreReceiver(WeightReceiver):
    name = "object_store"

    def __init__(self):
        self.shared = SharedReader()

    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        """The whole update, as read-only tensors that view the object store's memory or the
        learner's own: the caller copies them into its weights inside the block."""
        import ray

        refs = [h for h in update.handles if not isinstance(h, tuple)]
        in_place = [h for h in update.handles if isinstance(h, tuple)]
        if update.shared is None:
            # Pushes through the store from here on (another node, or a restarted learner that
            # could not share): do not keep an earlier learner's memory mapped.
            self.shared.close()
        if in_place and update.shared is None:
            raise WeightSyncError(f"weight version {update.version} has in-place buckets but no shared segments")
        try:
            fetched = iter(ray.get(refs) if refs else ())
        except Exception as exc:
            raise WeightSyncError(f"could not fetch weight version {update.version}: {exc}") from exc
        with ExitStack() as stack:
            views = iter(())
            if in_place:
                try:
                    views = iter(stack.enter_context(self.shared.reading(update.shared, update.version, in_place)))
                except SharedWeightsError as exc:
                    raise WeightSyncError(str(exc)) from exc
            named: NamedTensors = []
            for h in update.handles:
                if isinstance(h, tuple):
                    named.extend(next(views) for _ in h)
                else:
                    named.extend(from_store_object(next(fetched)))
            if len(named) != update.num_tensors:
                raise WeightSyncError(
                    f"weight version {update.version}: received {len(named)} tensors, expected {update.num_tensors}"
                )
            yield named

    def receive(self, update: WeightUpdate) -> NamedTensors:
        """An update that lies only in the object store, as tensors that view its memory (which
        stays valid for as long as they live)."""
        if update.shared is not None:
            raise WeightSyncError(f"weight version {update.version} lies in the learner's memory: read it "
                                  f"inside ObjectStoreReceiver.receiving()")
        with self.receiving(update) as named:
            return named


# --- collective transports: gloo and nccl ---------------------------------------------------

COLLECTIVE = ("gloo", "nccl")
_ABORT_KEY = "abort"


@dataclass(frozen=True)
class BucketLayout:
    """Names, shapes and dtype of one bucket: what a receiver allocates before the bytes arrive."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # a torch dtype name, e.g. "bfloat16"

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * getattr(torch, self.dtype).itemsize


def layout_of(bucket: NamedTensors) -> BucketLayout:
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise WeightSyncError(f"a weight bucket must have one dtype, got {sorted(map(str, dtypes))}")
    return BucketLayout(
        tuple(n for n, _ in bucket), tuple(tuple(t.shape) for _, t in bucket), str(dtypes.pop()).removeprefix("torch.")
    )


def collective_update(version: int, transport: str, layout: Iterable[BucketLayout]) -> WeightUpdate:
    """The handle a collective push's receivers get: the layout stands where the buckets would be."""
    layout = tuple(layout)
    return WeightUpdate(version, transport, layout, sum(len(b.names) for b in layout), sum(b.nbytes for b in layout))


def pack(bucket: NamedTensors, device: torch.device | str) -> torch.Tensor:
    """One bucket as one flat tensor [sum of numels]: one broadcast per bucket, not one per tensor."""
    return torch.cat([t.detach().reshape(-1).to(device) for _, t in bucket])


def unpack(flat: torch.Tensor, layout: BucketLayout) -> NamedTensors:
    """Inverse of :func:`pack`; the tensors are views into ``flat``."""
    if flat.numel() != layout.numel:
        raise WeightSyncError(f"a bucket of {flat.numel()} elements cannot hold {layout.numel} ({layout.names[0]}, ...)")
    sizes = [math.prod(s) for s in layout.shapes]
    return [(n, part.view(shape)) for n, shape, part in zip(layout.names, layout.shapes, flat.split(sizes))]


def check_layout(layout: Iterable[BucketLayout], expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Checked when a receiver joins, so that a model mismatch fails before any push starts."""
    for bucket in layout:
        check_against([(n, torch.empty(s, device="meta")) for n, s in zip(bucket.names, bucket.shapes)],
                      expected_shapes)


@dataclass(frozen=True)
class GroupSpec:
    """How one member joins a broadcast group. Rank 0 is learner rank 0, the only sender; a
    member that runs several processes (a tensor-parallel vLLM engine) takes ``rank`` onwards."""

    name: str
    backend: str  # gloo | nccl
    host: str
    port: int
    world_size: int
    rank: int
    timeout_s: float


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

        if spec.backend not in COLLECTIVE:
            raise ValueError(f"sync.transport={spec.backend!r} is not a collective transport {COLLECTIVE}")
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
                self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timedelta(seconds=spec.timeout_s))
            else:
                self._init_nccl(prefixed, spec)
        except BaseException as exc:
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


class BroadcastSender:
    """Learner rank 0's end of the collective transports: one group per receiving pool."""

    collective = True

    def __init__(self, transport: str, device: torch.device | str):
        self.name = transport
        self.device = _indexed(device)
        # A group's store outlives the group until the next one of that name opens, so that
        # members still waiting read why it was aborted rather than find the store gone.
        self.stores: dict[str, Any] = {}
        self.groups: dict[str, BroadcastGroup] = {}

    def open(self, group: str, world_size: int, timeout_s: float) -> int:
        """Host the rendezvous of a (new) group; returns the store's port."""
        self.close(group, "a new group of this name is being formed")
        self.stores[group] = open_store(world_size, timeout_s)
        return self.stores[group].port

    def join(self, spec: GroupSpec) -> None:
        self.groups[spec.name] = BroadcastGroup(spec, 0, self.device, store=self.stores[spec.name])

    def close(self, group: str, reason: str | None = None) -> None:
        """Leave a group; with a ``reason``, first tell its other members to stop waiting."""
        old = self.groups.pop(group, None)
        if old is not None:
            old.abort(reason)
        elif reason is not None and group in self.stores:
            _raise_abort(self.stores[group], reason)  # members may be waiting to join

    def send(self, update: WeightUpdate, buckets: Iterable[NamedTensors], groups: list[str]) -> None:
        """Broadcast the buckets, which must match ``update``'s layout, to every named group.

        On failure the caller closes the groups with a reason (:meth:`close`), which releases
        their receivers."""
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


class BroadcastReceiver(WeightReceiver):
    """A receiving process's end: stages the whole update on the host, then hands it over."""

    collective = True

    def __init__(self, transport: str, device: torch.device | str = "cpu"):
        self.name = transport
        self.device = _indexed(device)
        self.group: BroadcastGroup | None = None

    def join(self, spec: GroupSpec, rank: int) -> None:
        self.close()
        self.group = BroadcastGroup(spec, rank, self.device)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def receive(self, update: WeightUpdate) -> NamedTensors:
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
        except BaseException as exc:
            if not group.closed:
                group.abort(f"a receiver (rank {group.rank}) failed: {exc}")
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"receiving weight version {update.version} failed: {exc}") from exc


SENDERS: dict[str, Callable[[torch.device | str], Any]] = {
    "object_store": lambda device: ObjectStoreSender(),
    "gloo": lambda device: BroadcastSender("gloo", "cpu"),
    "nccl": lambda device: BroadcastSender("nccl", device),
}
RECEIVERS: dict[str, Callable[[torch.device | str], Any]] = {
    "object_store": lambda device: ObjectStoreReceiver(),
    "gloo": lambda device: BroadcastReceiver("gloo", "cpu"),
    "nccl": lambda device: BroadcastReceiver("nccl", device),
}


def make_sender(transport: str, device: torch.device | str = "cpu") -> WeightSender | BroadcastSender:
    if transport not in SENDERS:
        raise ValueError(f"sync.transport={transport!r}; expected one of {sorted(SENDERS)}")
    return SENDERS[transport](device)


def make_receiver(transport: str, device: torch.device | str = "cpu") -> WeightReceiver | BroadcastReceiver:
    if transport not in RECEIVERS:
        raise ValueError(f"sync.transport={transport!r}; expected one of {sorted(RECEIVERS)}")
    return RECEIVERS[transport](device)


def hf_param_shapes(model_path: str, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the HF model at ``model_path``, built on the meta device.

    vLLM fuses some projections (qkv, gate_up), so a vLLM receiver checks updates against the
    checkpoint layout the learner sends rather than against its own parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


class VllmWeightLoader:
    """vLLM worker extension (``worker_extension_cls``): loads pushed weights in place.

    Method names carry an ``opsd_`` prefix because vLLM workers already define
    ``update_weights`` and friends.
    """

    def opsd_join_group(self, spec: GroupSpec | dict) -> None:
        """Join a collective weight group; each process of a tensor-parallel engine is a member."""
        spec = spec_from(spec)
        if getattr(self, "opsd_receiver", None) is None:
            self.opsd_receiver = make_receiver(spec.backend, self.device)
        self.opsd_receiver.join(spec, spec.rank + self.rank)

    def opsd_leave_group(self) -> None:
        if getattr(self, "opsd_receiver", None) is not None:
            self.opsd_receiver.close()

    def opsd_receive_weights(self, update: WeightUpdate | dict, load: bool) -> int:
        """Take part in a collective push; load it unless this engine holds that version already
        (a retried push reaches every member of the group again)."""
        update = update_from(update)
        receiver = getattr(self, "opsd_receiver", None)
        if receiver is None:
            raise WeightSyncError(f"weight version {update.version}: this engine is in no weight group")
        named = receiver.receive(update)
        return self.opsd_load_weights(named) if load else 0

    def opsd_load_weights(self, named: NamedTensors) -> int:
        self.reload_weights(weights_iterator=iter(named))
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
            # With tied embeddings vLLM reloads the weight through the embedding only; kernels
            # derived from it for the head (the CPU backend's packed GEMM copy) keep the old
            # values unless the head is processed again.
            head.quant_method.process_weights_after_loading(head)
        return len(named)
