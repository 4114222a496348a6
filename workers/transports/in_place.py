"""``in_place``: on one host, receivers copy learner rank 0's weights straight out of its memory.

The sender is told once which of the learner's weights keep their memory between pushes
(``prepare``); on its first push it moves their storages into shared memory, in place
(shared_memory.py), and from then on a push only says where each tensor lies. A tensor that is not
the learner's own memory (a ZeRO-3 gather, a LoRA merge, a dtype conversion) goes through Ray's
object store in the same update, as ``object_store`` would send it. The receiver copies from both
inside ``receiving``, while the learner cannot change its weights (the header's lock).

Declared ``same_host``: a receiver must run on learner rank 0's host, in its PID namespace. One that
cannot read the learner's memory fails its load with a WeightSyncError, and the driver pushes
through ``object_store`` (the declared fallback) from then on (launch/weights.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Iterable, Iterator, Sequence

import torch

from opsd.workers.transports import object_store
from opsd.workers.transports.base import (
    BucketLayout, NamedTensors, WeightReceiver, WeightSender, WeightSyncError, WeightUpdate,
)
from opsd.workers.transports.shared_memory import SharedReader, SharedWeights, SharedWeightsError

NAME = "in_place"


def _object_store_bytes() -> int | None:
    """The capacity of Ray's object store on this node (it may live in /dev/shm too)."""
    import ray

    try:
        here = ray.get_runtime_context().get_node_id()
        return int(next(n for n in ray.nodes() if n["NodeID"] == here)["Resources"]["object_store_memory"])
    except (StopIteration, KeyError, RuntimeError):  # not in a Ray worker, or the node is unknown
        return None


class InPlaceSender(WeightSender):
    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        super().__init__(device, timeout_s)
        self.stable: list[torch.Tensor] = []
        self.shared: SharedWeights | None = None  # after the first push

    def prepare(self, stable: Sequence[torch.Tensor]) -> None:
        self.stable = list(stable)

    def changing(self) -> AbstractContextManager[None]:
        return self.shared.changing() if self.shared is not None and self.shared.active else nullcontext()

    def _share(self) -> SharedWeights:
        if self.shared is None:
            self.shared = SharedWeights(self.timeout_s)
            why_not = self.shared.share(self.stable, reserve_bytes=_object_store_bytes())
            if why_not is not None:
                print(f"[opsd] learner rank 0: not every weight is pushed in place: {why_not}", flush=True)
        return self.shared

    def send(self, version: int, buckets: Iterable[NamedTensors], *, layout: Sequence[BucketLayout] = (),
             groups: Sequence[str] = ()) -> WeightUpdate:
        shared = self._share()
        handles: list = []
        n, nbytes = 0, 0
        for bucket in buckets:
            located = [shared.locate(name, t) for name, t in bucket]
            in_place = tuple(st for st in located if st is not None)
            if in_place:
                handles.append(in_place)
                nbytes += sum(st.nbytes for st in in_place)
            rest = [pair for pair, st in zip(bucket, located) if st is None]
            if rest:
                ref, size = object_store.put_bucket(rest)
                handles.append(ref)
                nbytes += size
            n += len(bucket)
        if not any(isinstance(h, tuple) for h in handles):
            # Nothing lies in shared memory (it could not be shared): an object_store push.
            return WeightUpdate(version, object_store.NAME, tuple(handles), n, nbytes)
        shared.publish(version)
        return WeightUpdate(version, NAME, tuple(handles), n, nbytes, shared.handle())


class InPlaceReceiver(WeightReceiver):
    """Keeps the sender's memory mapped from one push to the next (``close`` lets it go)."""

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        super().__init__(device, timeout_s)
        self.reader = SharedReader()

    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        """The whole update, as read-only tensors that view the learner's memory or the object
        store's: the caller copies them into its weights inside the block."""
        if update.source is None:
            raise WeightSyncError(f"weight version {update.version} has in-place buckets but no shared segments")
        refs = [h for h in update.handles if not isinstance(h, tuple)]
        in_place = [h for h in update.handles if isinstance(h, tuple)]
        fetched = iter(object_store.fetch(update, refs))
        with ExitStack() as stack:
            try:
                views = iter(stack.enter_context(self.reader.reading(update.source, update.version, in_place)))
            except SharedWeightsError as exc:
                raise WeightSyncError(str(exc)) from exc
            named: NamedTensors = []
            for h in update.handles:
                if isinstance(h, tuple):
                    named.extend(next(views) for _ in h)
                else:
                    named.extend(next(fetched))
            yield object_store.check_count(update, named)

    def close(self) -> None:
        self.reader.close()
