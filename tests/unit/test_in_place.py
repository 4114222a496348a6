"""In-place pushes on one host (workers/transports/in_place.py, shared_memory.py): what a receiver reads is the sender's
weights, bit for bit, at the version it was told, and never while the sender changes them.

A receiver opens the sender's segments through /proc/<pid>/fd, and flock conflicts between two
opens of a file also within one process, so these run sender and receiver in the test process;
tests/integration/test_weight_sync.py does it across processes with a learner and vLLM."""

from __future__ import annotations

import dataclasses
import fcntl

import pytest
import torch

from tests.memory_maps import mapping_of
from opsd.workers.transports import Receivers
from opsd.workers.transports.base import WeightSyncError, WeightUpdate, iter_buckets
from opsd.workers.transports.in_place import InPlaceReceiver, InPlaceSender
from opsd.workers.transports.shared_memory import SharedWeights, SharedWeightsError


def _flat_weights(seed: int = 0) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Views of one flat buffer, as ZeRO 1/2 holds a learner's weights, in two dtypes' worth."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(3000, generator=g).to(torch.bfloat16)
    shapes = [("a.weight", (30, 40)), ("b.bias", (7,)), ("c.weight", (41, 43)), ("d.scale", ())]
    named, at = [], 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        named.append((name, flat[at: at + n].view(shape)))
        at += n
    return flat, named


def _send(shared: SharedWeights, version: int, buckets) -> WeightUpdate:
    """An in_place push of weights that ``shared`` holds in shared memory already."""
    sender = InPlaceSender("cpu", shared.timeout_s)
    sender.shared = shared
    return sender.send(version, buckets)


def _copies(receiver: InPlaceReceiver | Receivers, update) -> list[tuple[str, torch.Tensor]]:
    with receiver.receiving(update) as named:
        return [(n, t.clone()) for n, t in named]


def test_an_in_place_push_reads_the_senders_own_memory_bit_for_bit():
    flat, named = _flat_weights()
    before = [(n, t.clone()) for n, t in named]
    shared = SharedWeights(timeout_s=5)
    assert shared.share(t for _, t in named) is None
    # Sharing moves the pages, not the tensors: the views keep their values and their buffer.
    assert flat.untyped_storage().is_shared()
    assert all(torch.equal(t, b) for (_, t), (_, b) in zip(named, before))
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for _, t in named)

    update = _send(shared, 3, iter_buckets(named, bucket_mb=0.004))
    assert update.source is not None and len(update.source.segments) == 1
    assert len(update.handles) >= 2 and all(isinstance(h, tuple) for h in update.handles)
    assert update.num_tensors == len(named) and update.num_bytes == sum(t.numel() * 2 for _, t in named)
    receiver = InPlaceReceiver()
    with receiver.receiving(update) as got:
        assert [(n, t.dtype, tuple(t.shape)) for n, t in got] == [(n, t.dtype, tuple(t.shape)) for n, t in named]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, named))
        # Views of a read-only shared mapping of the sender's segment: nothing was copied.
        assert all(mapping_of(t.data_ptr()).split()[1] == "r--s" for _, t in got)
        assert "/dev/shm/torch_" in mapping_of(got[0][1].data_ptr())


def test_an_update_is_refused_once_the_sender_has_changed_its_weights():
    _, named = _flat_weights()
    shared = SharedWeights(timeout_s=5)
    shared.share(t for _, t in named)
    receiver = InPlaceReceiver()
    v1 = _send(shared, 1, [named])
    assert torch.equal(_copies(receiver, v1)[0][1], named[0][1])

    with shared.changing():  # an optimizer step
        for _, t in named:
            t.add_(1.0)
    with pytest.raises(WeightSyncError, match="version 1 is gone.*no pushed version"):
        _copies(receiver, v1)
    v2 = _send(shared, 2, [named])
    got = _copies(receiver, v2)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, named))
    with pytest.raises(WeightSyncError, match="version 1 is gone.*they hold version 2"):
        _copies(receiver, v1)


def test_the_sender_cannot_change_its_weights_while_a_receiver_copies_them_nor_the_reverse():
    _, named = _flat_weights()
    shared = SharedWeights(timeout_s=0.2)
    shared.share(t for _, t in named)
    update = _send(shared, 1, [named])
    receiver = InPlaceReceiver()
    with receiver.receiving(update):
        with pytest.raises(SharedWeightsError, match="waiting for receivers to finish copying"):
            with shared.changing():
                pytest.fail("the weights changed under a receiver")
    with shared.changing():
        with pytest.raises(WeightSyncError, match="waiting for learner rank 0 to finish its step"):
            _copies(receiver, update)
    # Neither wait left a lock behind.
    fcntl.flock(shared._header_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(shared._header_fd, fcntl.LOCK_UN)


def test_a_receiver_that_cannot_reach_the_sender_says_what_to_do():
    _, named = _flat_weights()
    shared = SharedWeights(timeout_s=5)
    shared.share(t for _, t in named)
    update = _send(shared, 1, [named])
    gone = dataclasses.replace(update, source=dataclasses.replace(update.source, pid=2**22 + 1))
    with pytest.raises(WeightSyncError, match="sync.shared_memory=false"):
        _copies(InPlaceReceiver(), gone)
    # Another process's descriptor of that number is not the header: told apart by its token.
    forged = dataclasses.replace(update, source=dataclasses.replace(update.source, token=b"x" * 16))
    with pytest.raises(WeightSyncError, match="not learner rank 0's weight header"):
        _copies(InPlaceReceiver(), forged)


def test_weights_are_not_shared_off_the_cpu_in_too_many_storages_or_without_room(monkeypatch):
    import opsd.workers.transports.shared_memory as sw

    shared = SharedWeights(timeout_s=5)
    monkeypatch.setattr(sw, "MAX_SEGMENTS", 2)
    assert "more than 2 storages" in shared.share([torch.zeros(3), torch.zeros(3), torch.zeros(3)])
    assert not shared.active
    assert "is on meta" in shared.share([torch.zeros(3, device="meta")])
    # An empty weight has no memory to share (torch reports fd -1 for it): it is not located.
    assert shared.share([torch.empty(0)]) is None and not shared.active
    assert shared.locate("empty", torch.empty(0)) is None
    # Room is left in /dev/shm for Ray's object store, which lives there too.
    assert "kept for Ray's object store" in shared.share([torch.zeros(3)], reserve_bytes=2**62)
    assert not shared.active


_DIES_WHILE_COPYING = """
import os, sys
from opsd.workers.transports.shared_memory import Segment, SharedHandle, SharedReader, SharedTensor
pid, header_fd, fd, nbytes, version = map(int, sys.argv[1:6])
handle = SharedHandle(pid, bytes.fromhex(sys.argv[6]), Segment(header_fd, 24), (Segment(fd, nbytes),), 5.0)
with SharedReader().reading(handle, version, [(SharedTensor("a.weight", 0, 0, (30, 40), "bfloat16"),)]) as named:
    assert named[0][1].shape == (30, 40)
    print("copying", flush=True)
    os._exit(3)  # killed mid-copy: the lock goes with the process
"""


def test_a_receiver_that_dies_while_it_copies_does_not_hold_up_the_learner():
    import subprocess
    import sys
    from pathlib import Path

    _, named = _flat_weights()
    shared = SharedWeights(timeout_s=0.5)
    shared.share(t for _, t in named)
    update = _send(shared, 4, [named])
    h = update.source
    args = [str(x) for x in (h.pid, h.header.fd, h.segments[0].fd, h.segments[0].nbytes, 4)] + [h.token.hex()]
    done = subprocess.run([sys.executable, "-c", _DIES_WHILE_COPYING, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 3 and "copying" in done.stdout, done.stderr
    with shared.changing():  # the dead receiver's shared lock is gone: no wait, no timeout
        named[0][1].add_(1.0)


def test_a_receiver_keeps_the_senders_memory_mapped_only_while_pushes_come_in_place():
    import os

    _, named = _flat_weights()
    shared = SharedWeights(timeout_s=5)
    shared.share(t for _, t in named)
    receiver = Receivers()  # a receiving actor's ends, one per transport
    fds = len(os.listdir("/proc/self/fd"))
    for version in (1, 2, 3):
        _copies(receiver, _send(shared, version, [named]))
        # Mapped once, then reused, however many pushes: the header's fd (for its lock) and
        # the descriptor Python's mmap keeps for each of its two mappings.
        assert len(os.listdir("/proc/self/fd")) == fds + 3
    # A push through the store (e.g. a restarted learner that could not share) drops the mapping.
    with receiver.receiving(WeightUpdate(4, "object_store")) as got:
        assert got == []
    assert len(os.listdir("/proc/self/fd")) == fds
