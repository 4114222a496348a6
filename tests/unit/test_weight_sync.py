"""workers/transports without Ray: buckets, packing, layouts, and the gloo broadcast protocol
between real processes (a sender and two receivers), including members that fail."""

from __future__ import annotations

import pytest
import torch

from tests.collective_group import named, run_group, small_buckets
from opsd.workers.transports.base import (
    BucketLayout, GroupSpec, WeightSyncError, announce, check_layout, iter_buckets, layout_of,
)
from opsd.workers.transports.broadcast import pack, unpack


def test_iter_buckets_respects_the_limit_and_keeps_order():
    pairs = named()
    limit_mb = 26 * 4 / 2**20  # room for 26 fp32 values
    buckets = list(iter_buckets(pairs, limit_mb))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in pairs]
    for b in buckets:
        # A tensor larger than the limit (embed: 35 values) travels alone.
        assert len(b) == 1 or sum(t.numel() for _, t in b) <= 26
    assert [len(b) for b in buckets] == [1, 1, 3]  # 35 | 25 | 5+15+5


def test_pack_unpack_round_trip_is_exact():
    bucket = [(n, t.to(torch.bfloat16)) for n, t in named(1)]
    layout = layout_of(bucket)
    assert layout.dtype == "bfloat16" and layout.numel == 35 + 25 + 5 + 15 + 5
    assert layout.nbytes == 2 * layout.numel
    flat = pack(bucket, "cpu")
    assert flat.shape == (layout.numel,)
    for (n0, t0), (n1, t1) in zip(bucket, unpack(flat, layout)):
        assert n0 == n1 and torch.equal(t0, t1)
    with pytest.raises(WeightSyncError, match="cannot hold"):
        unpack(flat[:-1], layout)


def test_a_bucket_has_one_dtype():
    with pytest.raises(WeightSyncError, match="one dtype"):
        layout_of([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16))])


def test_check_layout_names_the_tensor():
    layout = [BucketLayout(("embed.weight", "norm"), ((7, 5), (5,)), "float32")]
    check_layout(layout, {"embed.weight": (7, 5), "norm": (5,)})
    with pytest.raises(WeightSyncError, match=r"'embed.weight' has shape \(7, 5\).*\(8, 5\)"):
        check_layout(layout, {"embed.weight": (8, 5), "norm": (5,)})
    with pytest.raises(WeightSyncError, match="'norm'.*does not have"):
        check_layout(layout, {"embed.weight": (7, 5)})


def test_collective_update_totals():
    layout = [layout_of(named()[:2]), layout_of(named()[2:])]
    update = announce(4, "gloo", layout)
    assert update.version == 4 and update.num_tensors == 5 and update.num_bytes == 4 * (35 + 25 + 5 + 15 + 5)


def test_group_spec_and_update_survive_vllms_msgpack():
    # RolloutWorker keeps vLLM's engine core in its own process; were it ever moved out, the
    # collective_rpc arguments would travel as msgpack, which turns dataclasses into dicts.
    serial = pytest.importorskip("vllm.v1.serial_utils")
    from opsd.workers.transports.broadcast import spec_from, update_from

    enc, dec = serial.MsgpackEncoder(), serial.MsgpackDecoder()
    spec = GroupSpec("rollout", "nccl", "10.0.0.7", 29400, 5, 3, 600.0)
    update = announce(7, "nccl", [layout_of(named()[:2]), layout_of([(n, t.half()) for n, t in named()[2:]])])
    spec_wire, update_wire, load = dec.decode(enc.encode((spec, update, True)))
    assert isinstance(spec_wire, dict) and isinstance(update_wire, dict)  # what the engine gets
    assert spec_from(spec_wire) == spec and update_from(update_wire) == update and load is True
    assert spec_from(spec) is spec and update_from(update) is update


# --- the gloo protocol between processes (tests/collective_group.py) ---------------------


def test_gloo_broadcast_delivers_every_bucket_bit_exact():
    results = run_group("ok")
    assert results["sender"] == ("ok", None)
    want = [pair for b in small_buckets() for pair in b]
    for rank in (1, 2):
        status, got = results[f"receiver{rank}"]
        assert status == "ok"
        assert [n for n, _ in got] == [n for n, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_receiver_expecting_another_version_stops_the_whole_push():
    results = run_group("ok", receiver_versions=(5, 6))
    assert results["receiver2"][0] == "error" and "told (6, 3, 85)" in results["receiver2"][1]
    # The others learn of it through the abort flag, not by running into the timeout.
    for who in ("sender", "receiver1"):
        status, msg = results[who]
        assert status == "error" and ("aborted" in msg or "broadcast failed" in msg), msg
        assert "waited more than" not in msg


def test_a_dead_receiver_fails_the_push_without_waiting_for_the_timeout():
    results = run_group("die")
    status, msg = results["sender"]
    assert status == "error" and "waited more than" not in msg, msg
    status, msg = results["receiver1"]
    assert status == "error" and "waited more than" not in msg, msg


def test_a_member_that_never_joins_releases_the_others_through_the_driver():
    results = run_group("no_show")
    for who in ("sender", "receiver1"):
        status, msg = results[who]
        assert status == "error" and "joining: the group was aborted: receiver 2 died before it joined" in msg, msg


def test_a_sender_that_breaks_its_layout_releases_the_receivers():
    results = run_group("bad_bucket")
    status, msg = results["sender"]
    assert status == "error" and "bucket 1 of weight version 5 does not match" in msg
    for rank in (1, 2):
        status, msg = results[f"receiver{rank}"]
        assert status == "error" and "aborted: the sender failed: bucket 1" in msg, msg


def test_nccl_without_nccl_is_an_error_not_a_silent_no_op():
    # vLLM's PyNccl disables itself when it finds no NCCL library (as on this CPU machine); its
    # broadcasts would then return without moving a byte.
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; tests/gpu/test_nccl_sync.py covers nccl there")
    from concurrent.futures import ThreadPoolExecutor

    from opsd.workers.transports.broadcast import BroadcastGroup, open_store

    store = open_store(2, 30.0)
    spec = GroupSpec("g", "nccl", "127.0.0.1", store.port, 2, 0, 30.0)

    def join(rank: int) -> str:
        try:
            BroadcastGroup(spec, rank, "cpu", store=store if rank == 0 else None)
        except WeightSyncError as exc:
            return str(exc)
        return "joined"

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(join, [0, 1]))
    # Whichever rank finds out first aborts the group; the other reads its reason.
    assert all("NCCL is not available" in r for r in results), results
