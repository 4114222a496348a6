"""One collective weight push between real processes, for the tests of workers/transports/broadcast.py:
a sender (learner rank 0's end) and receivers, each in a spawned process, reporting how it
ended. tests/unit/test_weight_sync.py runs it over gloo on CPU, tests/gpu/test_nccl_sync.py over
NCCL on two GPUs.

``case`` makes a member misbehave: ``die`` (receiver 2 exits after joining), ``no_show``
(receiver 2 never joins and the harness aborts the group from outside, as the driver does),
``bad_bucket`` (the sender yields a bucket other than the layout it announced).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

import torch

from opsd.workers.transports import transport
from opsd.workers.transports.base import GroupSpec, WeightSyncError, announce, layout_of
from opsd.workers.transports.broadcast import abort_group

TIMEOUT_S = 120.0  # far above what any case needs: an error that mentions it was a hang

Buckets = list[list[tuple[str, torch.Tensor]]]


def named(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (7, 5), "layer.0.w": (5, 5), "layer.0.b": (5,), "layer.1.w": (3, 5), "norm": (5,)}
    return [(n, torch.randn(s, generator=g)) for n, s in shapes.items()]


def small_buckets() -> Buckets:
    """3 buckets, 85 elements, fp32 and bf16."""
    pairs = named(0)
    return [pairs[:2], [(n, t.to(torch.bfloat16)) for n, t in pairs[2:4]], pairs[4:]]


def large_buckets() -> Buckets:
    """2 buckets of bf16 matrices, 7.3 M elements."""
    g = torch.Generator().manual_seed(0)
    big = [("embed.weight", torch.randn(4096, 1024, generator=g)), ("norm", torch.randn(1024, generator=g))]
    layers = [(f"layers.{i}.w", torch.randn(1024, 1024, generator=g)) for i in range(3)]
    return [[(n, t.to(torch.bfloat16)) for n, t in b] for b in (big, layers)]


BUCKETS = {"small": small_buckets, "large": large_buckets}


def _use(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def _sender(backend, device, buckets, port_q, result_q, world, version, case, finished) -> None:
    # Learner rank 0 lives on after a failed push, and so does the store it hosts, from which the
    # other members read why the group was aborted. The sender is held here until the harness has
    # every result: dropped earlier, its store would vanish under a receiver still polling it, which
    # then reports a lost store instead of the abort reason (the order of the two is a race).
    sender = None
    try:
        _use(device)
        sender = transport(backend).make_sender(device, TIMEOUT_S)
        _send(sender, backend, device, buckets, port_q, result_q, world, version, case)
    except BaseException:
        result_q.put(("sender", "crash", traceback.format_exc()))
    finally:
        finished.wait(TIMEOUT_S)
        del sender


def _send(sender, backend, device, buckets, port_q, result_q, world, version, case) -> None:
    port_q.put(sender.open("g", world))
    try:
        sender.join(GroupSpec("g", backend, "127.0.0.1", 0, world, 0, TIMEOUT_S))
    except WeightSyncError as exc:
        result_q.put(("sender", "error", str(exc)))
        return
    data = [[(n, t.to(device)) for n, t in b] for b in BUCKETS[buckets]()]
    layout = [layout_of(b) for b in data]
    if case == "bad_bucket":  # the learner yields something other than the layout it announced
        data[1] = [(n, t.float()) for n, t in data[1]]
    try:
        sender.send(version, data, layout=layout, groups=["g"])
        result_q.put(("sender", "ok", None))
    except WeightSyncError as exc:
        sender.close("g", f"the sender failed: {exc}")
        result_q.put(("sender", "error", str(exc)))


def _receiver(backend, device, buckets, port, result_q, world, rank, version, case) -> None:
    who = f"receiver{rank}"
    try:
        _use(device)
        receiver = transport(backend).make_receiver(device, TIMEOUT_S)
        if case == "no_show" and rank == 2:
            return  # never joins: the driver sees its actor fail and aborts the group
        try:
            receiver.join(GroupSpec("g", backend, "127.0.0.1", port, world, rank, TIMEOUT_S), rank)
        except WeightSyncError as exc:
            result_q.put((who, "error", str(exc)))
            return
        if case == "die" and rank == 2:
            os._exit(3)
        layout = [layout_of(b) for b in BUCKETS[buckets]()]
        try:
            with receiver.receiving(announce(version, backend, layout)) as got:
                result_q.put((who, "ok", _by_value(got)))
        except WeightSyncError as exc:
            result_q.put((who, "error", str(exc)))
    except BaseException:
        result_q.put((who, "crash", traceback.format_exc()))


def _by_value(pairs) -> list[tuple[str, str, str, tuple, bytes]]:
    """Tensors as plain bytes for the result queue. A torch tensor put on a multiprocessing queue
    travels as a handle to shared memory (CPU) or a CUDA IPC handle, which the parent can only
    open while this process lives; a receiver that has already returned leaves the parent a
    FileNotFoundError. Bytes travel by value; the device they were staged on goes with them."""
    out = []
    for n, t in pairs:
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        out.append((n, t.device.type, str(t.dtype).removeprefix("torch."), tuple(t.shape), flat.numpy().tobytes()))
    return out


def _from_bytes(wire) -> list[tuple[str, torch.Tensor]]:
    return [(n, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape).to(device))
            for n, device, dtype, shape, raw in wire]


def _wait_joined(port: int, members: int) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    deadline = time.monotonic() + TIMEOUT_S
    while store.add("joined", 0) < members:
        assert time.monotonic() < deadline, f"fewer than {members} members joined in {TIMEOUT_S:g}s"
        time.sleep(0.01)


def run_group(case: str = "ok", receiver_versions=(5, 5), *, backend: str = "gloo",
              devices: tuple[str, ...] = ("cpu", "cpu", "cpu"), buckets: str = "small") -> dict:
    """Sender pushes version 5; receiver i expects receiver_versions[i - 1]. Returns
    {"sender" | "receiver<rank>": (status, payload)}: ("ok", staged tensors) or ("error", message)."""
    ctx = mp.get_context("spawn")
    port_q, result_q, finished = ctx.Queue(), ctx.Queue(), ctx.Event()
    world = 1 + len(receiver_versions)
    procs = [ctx.Process(target=_sender, args=(backend, devices[0], buckets, port_q, result_q, world, 5, case, finished))]
    procs[0].start()
    port = port_q.get(timeout=120)
    for rank, v in enumerate(receiver_versions, start=1):
        procs.append(ctx.Process(target=_receiver,
                                 args=(backend, devices[rank], buckets, port, result_q, world, rank, v, case)))
        procs[-1].start()
    if case == "no_show":
        # Abort once everyone else waits in the join barrier, as the driver does when it sees the
        # missing member's actor fail: not after a guess at how long that takes.
        _wait_joined(port, world - 1)
        abort_group("127.0.0.1", port, "receiver 2 died before it joined")
    expected = world - (1 if case in ("die", "no_show") else 0)
    results = {}
    for _ in range(expected):
        who, status, payload = result_q.get(timeout=TIMEOUT_S + 120)
        results[who] = (status, _from_bytes(payload) if status == "ok" and payload is not None else payload)
    finished.set()
    for p in procs:
        p.join(timeout=60)
    assert not any(s == "crash" for s, _ in results.values()), results
    return results
