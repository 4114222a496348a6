"""sync.transport=nccl: the collective weight protocol of workers/transports/broadcast.py over vLLM's
PyNccl between two processes on two GPUs (a sender and a receiver), with the harness that
tests/unit/test_weight_sync.py runs over gloo on CPU (tests/collective_group.py).

NCCL refuses two ranks of one communicator on the same GPU, so this needs two GPUs, and vLLM
(for ``PyNcclCommunicator``). Skipped otherwise.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.collective_group import large_buckets, run_group

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (PyNccl)"),
]


def run_pair(receiver_version: int) -> dict:
    return run_group("ok", (receiver_version,), backend="nccl", devices=("cuda:0", "cuda:1"), buckets="large")


def test_nccl_broadcast_is_bit_exact():
    results = run_pair(5)
    assert results["sender"] == ("ok", None)
    status, got = results["receiver1"]
    assert status == "ok"
    want = [pair for b in large_buckets() for pair in b]
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.device.type == "cpu" and a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_nccl_version_mismatch_aborts_both_ends():
    results = run_pair(6)
    assert results["receiver1"][0] == "error" and "told (6," in results["receiver1"][1]
    status, msg = results["sender"]
    assert status == "error" and "aborted" in msg and "waited more than" not in msg, msg
