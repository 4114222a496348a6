"""sync.transport=nccl: the collective weight protocol of workers/weight_sync.py over vLLM's
PyNccl between two processes on two GPUs (a sender and a receiver), as tests/unit/test_weight_sync.py
runs it over gloo on CPU.

NCCL refuses two ranks of one communicator on the same GPU, so this needs two GPUs, and vLLM
(for ``PyNcclCommunicator``). Skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import traceback

import pytest
import torch

from workers.weight_sync import BroadcastReceiver, BroadcastSender, GroupSpec, WeightSyncError, collective_update, layout_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (PyNccl)"),
]

TIMEOUT_S = 120.0


def _buckets(device: str) -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    big = [("embed.weight", torch.randn(4096, 1024, generator=g)), ("norm", torch.randn(1024, generator=g))]
    layers = [(f"layers.{i}.w", torch.randn(1024, 1024, generator=g)) for i in range(3)]
    return [[(n, t.to(device, torch.bfloat16)) for n, t in b] for b in (big, layers)]


def _sender(port_q, result_q, version: int) -> None:
    try:
        torch.cuda.set_device(0)
        sender = BroadcastSender("nccl", "cuda:0")
        port_q.put(sender.open("g", 2, TIMEOUT_S))
        sender.join(GroupSpec("g", "nccl", "127.0.0.1", 0, 2, 0, TIMEOUT_S))
        buckets = _buckets("cuda:0")
        update = collective_update(version, "nccl", [layout_of(b) for b in buckets])
        try:
            sender.send(update, buckets, ["g"])
            result_q.put(("sender", "ok", None))
        except WeightSyncError as exc:
            sender.close("g", f"the sender failed: {exc}")
            result_q.put(("sender", "error", str(exc)))
    except BaseException:
        result_q.put(("sender", "crash", traceback.format_exc()))


def _receiver(port: int, result_q, version: int) -> None:
    try:
        torch.cuda.set_device(1)
        receiver = BroadcastReceiver("nccl", "cuda:1")
        receiver.join(GroupSpec("g", "nccl", "127.0.0.1", port, 2, 1, TIMEOUT_S), 1)
        layout = [layout_of(b) for b in _buckets("cpu")]
        try:
            got = receiver.receive(collective_update(version, "nccl", layout))
            result_q.put(("receiver", "ok", [(n, t.clone()) for n, t in got]))
        except WeightSyncError as exc:
            result_q.put(("receiver", "error", str(exc)))
    except BaseException:
        result_q.put(("receiver", "crash", traceback.format_exc()))


def run_pair(receiver_version: int) -> dict:
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(port_q, result_q, 5))]
    procs[0].start()
    procs.append(ctx.Process(target=_receiver, args=(port_q.get(timeout=120), result_q, receiver_version)))
    procs[1].start()
    results = {}
    for _ in procs:
        who, status, payload = result_q.get(timeout=TIMEOUT_S + 120)
        results[who] = (status, payload)
    for p in procs:
        p.join(timeout=60)
    assert not any(s == "crash" for s, _ in results.values()), results
    return results


def test_nccl_broadcast_is_bit_exact():
    results = run_pair(5)
    assert results["sender"] == ("ok", None)
    status, got = results["receiver"]
    assert status == "ok"
    want = [pair for b in _buckets("cpu") for pair in b]
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.device.type == "cpu" and a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_nccl_version_mismatch_aborts_both_ends():
    results = run_pair(6)
    assert results["receiver"][0] == "error" and "told (6," in results["receiver"][1]
    status, msg = results["sender"]
    assert status == "error" and "aborted" in msg and "waited more than" not in msg, msg
