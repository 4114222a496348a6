"""How the learner splits a batch over its ranks (workers.learner.balanced_shards)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from workers.learner import balanced_shards


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
