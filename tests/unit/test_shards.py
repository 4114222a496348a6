"""How the learner splits a batch over its ranks (opsd.workers.learner_training.balanced_shards, plan_ranks)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from opsd.workers.learner_training import balanced_shards


def best_split(lengths: list[int], world: int) -> int:
    """Brute force: the smallest possible largest per-rank token count, at most ceil(n/W) rows each."""
    cap = math.ceil(len(lengths) / world)
    best = math.inf
    for owner in itertools.product(range(world), repeat=len(lengths)):
        if max(owner.count(r) for r in range(world)) <= cap:
            best = min(best, max(sum(l for l, o in zip(lengths, owner) if o == r) for r in range(world)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_every_row_once_within_the_row_cap_and_near_the_best_balance(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3])
    lengths = [rng.randint(20, 200) for _ in range(rng.randint(1, 8))]
    shards = balanced_shards(lengths, world)
    assert len(shards) == world
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    assert max(len(s) for s in shards) <= math.ceil(len(lengths) / world)
    for s in shards:  # shortest first within a rank
        assert [lengths[i] for i in s] == sorted(lengths[i] for i in s)
    # Longest-first greedy is within 4/3 of the best split (Graham's bound for LPT).
    worst = max(sum(lengths[i] for i in s) for s in shards)
    assert worst <= 4 / 3 * best_split(lengths, world) + 1e-9


def test_a_long_row_no_longer_lands_with_the_other_long_ones():
    # Index striding (rank::2) would give rank 0 rows 0 and 2, both long: 400 tokens against 40.
    lengths = [200, 20, 200, 20]
    shards = balanced_shards(lengths, 2)
    assert sorted(sum(lengths[i] for i in s) for s in shards) == [220, 220]


def test_fewer_rows_than_ranks_leaves_some_ranks_empty():
    assert balanced_shards([5], 2) == [[0], []]
    assert balanced_shards([], 2) == [[], []]


def _batch(rng: random.Random, groups: int, per_group: int):
    """The columns plan_ranks reads, with rows of random lengths, masks and 0/1 rewards; some
    responses are empty (a row with no loss tokens)."""
    import pyarrow as pa

    rows = []
    for g in range(groups):
        for j in range(per_group):
            n = rng.choice([0, rng.randint(1, 12)])
            rows.append({"sample_id": f"p{g}#{j}", "prompt_ids": [1] * rng.randint(1, 6), "response_ids": [2] * n,
                         "loss_mask": [rng.random() < 0.8 for _ in range(n)], "reward": float(rng.random() < 0.5)})
    return pa.Table.from_pylist(rows), rows


def _advantages(rows: list[dict]) -> list[float]:
    """GRPO's group-normalised advantage, written out: (r - mean) / (sample std + 1e-6), 0 for one sample."""
    by_group: dict[str, list[float]] = {}
    for r in rows:
        by_group.setdefault(r["sample_id"].split("#")[0], []).append(r["reward"])
    out = []
    for r in rows:
        rs = by_group[r["sample_id"].split("#")[0]]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        out.append((r["reward"] - mean) / (std + 1e-6))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_each_rank_is_planned_its_own_rows_with_the_whole_batchs_normaliser_advantages_and_padding(seed):
    from opsd.workers.learner_training import plan_ranks

    rng = random.Random(seed)
    world, mb = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    table, rows = _batch(rng, groups=rng.randint(1, 4), per_group=rng.choice([1, 2, 4]))
    micro = math.ceil(math.ceil(len(rows) / world) / mb)
    plans = plan_ranks(table, world_size=world, micro_batch_size=mb, micro_batches=micro, grpo=True, zero3=True)
    assert len(plans) == world
    assert sorted(i for p in plans for i in p.rows) == list(range(len(rows)))  # every row on exactly one rank
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    assert [p.rows for p in plans] == balanced_shards(lengths, world)
    total = sum(sum(r["loss_mask"]) for r in rows)
    want = _advantages(rows)
    for p in plans:
        assert p.global_tokens == total  # the whole batch's, not the rank's
        assert p.advantages == pytest.approx([want[i] for i in p.rows], abs=1e-5)  # groups may span ranks
    # ZeRO-3: micro-batch i is padded to the most loss tokens any rank has in it, at least one.
    for i in range(micro):
        most = max((sum(sum(rows[j]["loss_mask"]) for j in p.rows[i * mb : (i + 1) * mb]) for p in plans), default=0)
        assert all(p.pad_to[i] == max(most, 1) for p in plans)
    plain = plan_ranks(table, world_size=world, micro_batch_size=mb, micro_batches=micro)
    assert all(p.advantages is None and p.pad_to == [0] * micro for p in plain)


def test_a_batch_larger_than_the_deepspeed_config_is_refused_before_any_rank_runs():
    from opsd.workers.learner_training import plan_ranks

    table, _ = _batch(random.Random(0), groups=5, per_group=2)  # 10 rows: 5 per rank, 3 micro-batches of 2
    with pytest.raises(ValueError, match="needs 3 micro-batches per rank, more than the 2"):
        plan_ranks(table, world_size=2, micro_batch_size=2, micro_batches=2)
    assert len(plan_ranks(table, world_size=2, micro_batch_size=2, micro_batches=3)) == 2


def test_a_rank_reads_only_its_slice_of_the_batch():
    """The slice the group sends a rank holds its rows, in its order, and the batch's metadata."""
    import pyarrow as pa

    from opsd.batch import from_ipc_bytes, to_ipc_bytes
    from opsd.workers.learner_training import plan_ranks

    table, rows = _batch(random.Random(3), groups=3, per_group=2)
    table = table.replace_schema_metadata({b"opsd.teacher_mode": b"fixed"})
    for p in plan_ranks(table, world_size=2, micro_batch_size=2, micro_batches=2):
        part = from_ipc_bytes(to_ipc_bytes(table.take(pa.array(p.rows, pa.int64()))))
        assert part.column("sample_id").to_pylist() == [rows[i]["sample_id"] for i in p.rows]
        assert part.schema.metadata[b"opsd.teacher_mode"] == b"fixed"
        assert len(to_ipc_bytes(part)) < len(to_ipc_bytes(table))
