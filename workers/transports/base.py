"""The interface every weight transport implements, and what travels through the driver.

A push moves learner rank 0's weights, in buckets of ``sync.bucket_mb``, to every receiving
process (each vLLM worker of each rollout engine, a live or EMA teacher's scorers). Each transport
is one sender class (learner rank 0's end) and one receiver class, declared once in the registry
(``opsd.workers.transports.TRANSPORTS``) as one of two kinds:

* **store-and-forward** (``collective=False``: object_store, in_place). The sender puts the buckets
  somewhere and returns a :class:`WeightUpdate` whose handles say where; the driver hands that
  small object to each receiver, which reads the buckets whenever it is called::

      update = sender.send(version, buckets)            # learner rank 0
      with receiver.receiving(update) as named:         # each receiver, later
          load(named)

* **collective** (``collective=True``: gloo, nccl). Learner rank 0 and the receivers of one pool
  form a group (``open`` / ``join``), and every member takes part in the same calls at the same
  time; the receivers are handed the update first (:func:`announce`: the layout stands where
  the buckets would be)::

      port = sender.open(group, world_size)                 # learner rank 0 hosts the rendezvous
      receiver.join(spec, rank); sender.join(spec)          # every member, concurrently
      with receiver.receiving(update) as named: load(named) # concurrently with:
      sender.send(version, buckets, layout=..., groups=[group])

Every push is all-or-nothing: ``receiving`` yields the whole update only after every bucket has
arrived and been checked (:func:`check_against`), so a receiver that fails keeps its weights and
version, and the driver retries or fails loudly (docs/DESIGN.md, "Weight sync").
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

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
    """What travels through the driver: a version and handles to the buckets, not the tensors.

    ``transport`` names the transport whose receiver reads it (a receiving actor picks its
    receiver by it). ``handles`` are that transport's own, one or more per bucket; ``source`` is
    what every handle of one push needs besides (in_place: where the sender's memory is)."""

    version: int
    transport: str
    handles: tuple = ()
    num_tensors: int = 0
    num_bytes: int = 0
    source: Any = None


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


def announce(version: int, transport: str, layout: Iterable[BucketLayout]) -> WeightUpdate:
    """The update a collective push's receivers are handed before it starts: the layout stands
    where the buckets would be."""
    layout = tuple(layout)
    return WeightUpdate(version, transport, layout, sum(len(b.names) for b in layout), sum(b.nbytes for b in layout))


@dataclass(frozen=True)
class GroupSpec:
    """How one member joins a collective transport's group. Rank 0 is learner rank 0, the only
    sender; a member that runs several processes (a tensor-parallel vLLM engine) takes ``rank``
    onwards. ``backend`` is the transport's name."""

    name: str
    backend: str
    host: str
    port: int
    world_size: int
    rank: int
    timeout_s: float


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


def check_layout(layout: Iterable[BucketLayout], expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Checked when a receiver joins, so that a model mismatch fails before any push starts."""
    for bucket in layout:
        check_against([(n, torch.empty(s, device="meta")) for n, s in zip(bucket.names, bucket.shapes)],
                      expected_shapes)


class WeightSender:
    """Learner rank 0's end of a transport. ``device`` is where the buckets it is given lie."""

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        self.device = torch.device(device)
        self.timeout_s = timeout_s

    def prepare(self, stable: Sequence[torch.Tensor]) -> None:
        """Told once, before the first push: the learner's weights that keep their memory from one
        push to the next (its own parameters in the push dtype). A transport that serves them
        where they lie uses this; the others ignore it."""

    def changing(self) -> AbstractContextManager[None]:
        """Entered by the learner around every change of its weights (an optimizer step, loading a
        checkpoint): a transport whose receivers read the learner's own memory keeps them out."""
        return nullcontext()

    def send(self, version: int, buckets: Iterable[NamedTensors], *, layout: Sequence[BucketLayout] = (),
             groups: Sequence[str] = ()) -> WeightUpdate:
        """Push ``buckets`` (learner rank 0's weights, one bucket at a time: each may be valid only
        until the next is asked for) as ``version``. ``layout`` is what the buckets will be;
        ``groups`` (collective transports) the formed groups that receive them."""
        raise NotImplementedError

    # --- collective transports only ---------------------------------------------------------

    def open(self, group: str, world_size: int) -> int:
        """Host the rendezvous of a (new) group; returns its port."""
        raise WeightSyncError(f"{type(self).__name__} forms no groups (a store-and-forward transport)")

    def join(self, spec: GroupSpec) -> None:
        raise WeightSyncError(f"{type(self).__name__} forms no groups (a store-and-forward transport)")

    def close(self, group: str, reason: str | None = None) -> None:
        """Leave a group; with a ``reason``, first tell its other members to stop waiting."""


class WeightReceiver:
    """A receiving process's end of a transport."""

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        self.device = torch.device(device)
        self.timeout_s = timeout_s

    def receiving(self, update: WeightUpdate) -> AbstractContextManager[NamedTensors]:
        """The whole update, checked, for the caller to load inside the block; afterwards the tensors
        may no longer be valid (they can view memory the receiver does not own)."""
        raise NotImplementedError

    def join(self, spec: GroupSpec, rank: int) -> None:
        raise WeightSyncError(f"{type(self).__name__} joins no groups (a store-and-forward transport)")

    def close(self) -> None:
        """Let go of whatever the receiver holds between pushes (a group, a mapping)."""
