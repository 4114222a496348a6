"""``object_store``: each bucket becomes one object in Ray's shared-memory store, owned by learner
rank 0; receivers fetch it whenever they are called (store-and-forward, anywhere in the cluster).

A bucket travels as its names, dtypes and numpy views of its tensors. Ray writes numpy arrays into
shared memory out of band (one copy, no pickling of the bytes) and hands them to a receiver on the
same host as zero-copy views, so a push costs one copy into the store and the receiver's own copy
into its weights. Torch tensors put as they are would be pickled instead, which is several times
slower.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch

from opsd.workers.transports.base import (
    BucketLayout, NamedTensors, WeightReceiver, WeightSender, WeightSyncError, WeightUpdate,
)

NAME = "object_store"

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


def put_bucket(bucket: NamedTensors) -> tuple[Any, int]:
    """One bucket into Ray's object store: its ref and its size in bytes."""
    import ray

    names, dtypes, arrays = store_object(bucket)
    return ray.put((names, dtypes, arrays)), sum(a.nbytes for a in arrays)


def fetch(update: WeightUpdate, refs: Sequence[Any]) -> list[NamedTensors]:
    """The buckets behind ``refs``, as tensors that view the store's memory."""
    import ray

    try:
        return [from_store_object(obj) for obj in (ray.get(list(refs)) if refs else [])]
    except Exception as exc:  # Ray raises several types for an object it cannot get
        raise WeightSyncError(f"could not fetch weight version {update.version}: {exc}") from exc


def check_count(update: WeightUpdate, named: NamedTensors) -> NamedTensors:
    if len(named) != update.num_tensors:
        raise WeightSyncError(
            f"weight version {update.version}: received {len(named)} tensors, expected {update.num_tensors}"
        )
    return named


class ObjectStoreSender(WeightSender):
    def send(self, version: int, buckets: Iterable[NamedTensors], *, layout: Sequence[BucketLayout] = (),
             groups: Sequence[str] = ()) -> WeightUpdate:
        handles, n, nbytes = [], 0, 0
        for bucket in buckets:
            ref, size = put_bucket(bucket)
            handles.append(ref)
            n, nbytes = n + len(bucket), nbytes + size
        return WeightUpdate(version, NAME, tuple(handles), n, nbytes)


class ObjectStoreReceiver(WeightReceiver):
    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        """The whole update, as read-only tensors that view the object store's memory."""
        yield check_count(update, [pair for bucket in fetch(update, update.handles) for pair in bucket])
