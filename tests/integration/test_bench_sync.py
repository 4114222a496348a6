"""`opsd bench sync`: every transport pushes the same weights between two actors; the report has a
row per transport and bucket size (never an asserted time)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_bench_sync_reports_every_transport(ray_session):
    from opsd.benchmarks.sync import bench_sync

    lines: list[str] = []
    report = bench_sync(params_m=2, bucket_mb=[0.5, 4], repeats=1, vllm=False, out=lines.append)
    rows = {(r["transport"], r["bucket_mb"]): r for r in report["buckets"]}
    assert set(rows) == {(t, b) for t in ("object_store", "in_place", "gloo") for b in (0.5, 4)}
    for (_, bmb), row in rows.items():
        # The same bucketing for every transport; smaller buckets mean more of them.
        assert row["buckets"] == rows[("object_store", bmb)]["buckets"]
        assert row["push_seconds"] > 0 and row["mb_per_s"] > 0
    assert rows[("gloo", 0.5)]["buckets"] > rows[("gloo", 4)]["buckets"]
    assert set(report["gloo_over_object_store"]) == set(report["in_place_over_object_store"]) == {0.5, 4}
    assert lines[0].startswith("bench sync:") and "object_store and in_place and gloo" in lines[0]
    assert any(line.startswith("  push time object_store / gloo:") for line in lines)
    assert any(line.startswith("  push time object_store / in_place:") for line in lines)
    with pytest.raises(ValueError, match="nccl"):
        bench_sync(params_m=2, transports=["nccl"], vllm=False, out=lines.append)
