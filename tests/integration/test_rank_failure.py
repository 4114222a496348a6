"""Which error a learner group raises when one rank's call fails (workers/learner.py,
``rank_failure``): a rank's death wins over a survivor's failed collective that Ray reported first,
since only a death is recovered from (CI once saw the survivor's "Connection closed by peer"
first, and a run that should have restarted its learner group ended instead)."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def rank_failure(*args, **kwargs):
    # Imported here, not above: the actors below unpickle this module in their own processes,
    # which then need none of the learner's imports (torch, DeepSpeed).
    from opsd.workers.learner import rank_failure

    return rank_failure(*args, **kwargs)


class Signal:
    """An event the ranks of one test wait on (an async actor: waiting does not block sending)."""

    def __init__(self):
        self.event = asyncio.Event()

    async def send(self):
        self.event.set()

    async def wait(self):
        await self.event.wait()


class Rank:
    def ok(self) -> int:
        return 1

    def fail(self) -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:26499")

    def die_when(self, signal) -> None:
        import ray

        ray.get(signal.wait.remote())
        os._exit(1)

    def wait_for(self, signal) -> None:
        import ray

        ray.get(signal.wait.remote())


@pytest.fixture
def ranks(ray_session):
    ray = ray_session
    made = [ray.remote(num_cpus=0)(Rank).remote() for _ in range(3)]
    signal = ray.remote(num_cpus=0)(Signal).remote()
    yield made, signal
    for actor in [*made, signal]:
        ray.kill(actor)


def test_calls_that_all_succeed_are_no_failure(ranks):
    made, _ = ranks
    assert rank_failure([r.ok.remote() for r in made]) is None


def test_a_rank_that_dies_after_a_survivors_collective_failed_is_the_error_raised(ray_session, ranks):
    ray = ray_session
    (survivor, victim, waiting), signal = ranks
    failed = survivor.fail.remote()
    ray.wait([failed])  # the survivor's failure is in before the death: the order CI saw
    refs = [failed, victim.die_when.remote(signal), waiting.wait_for.remote(signal)]
    with ThreadPoolExecutor(1) as pool:
        found = pool.submit(rank_failure, refs, 3600.0)
        # rank_failure has the survivor's error; the victim dies only now.
        ray.get(signal.send.remote())
        error = found.result(timeout=600)
    assert isinstance(error, ray.exceptions.ActorDiedError), repr(error)


def test_a_failure_without_a_death_is_raised_once_the_grace_is_over(ray_session, ranks):
    ray = ray_session
    (survivor, _, waiting), signal = ranks
    # The other rank stays in its "collective" (waits for a signal nobody sends).
    error = rank_failure([survivor.fail.remote(), waiting.wait_for.remote(signal)], grace_s=1.0)
    assert isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, RuntimeError)
    assert "Connection closed by peer" in str(error)


def test_a_death_seen_first_is_raised_without_waiting_for_the_others(ray_session, ranks):
    ray = ray_session
    (_, victim, waiting), signal = ranks
    dying = victim.die_when.remote(signal)
    ray.get(signal.send.remote())
    ray.wait([dying])
    # The other call never ends: an hour's grace would hang the test if it were spent.
    other = ray.remote(num_cpus=0)(Signal).remote()
    try:
        error = rank_failure([dying, waiting.wait_for.remote(other)], grace_s=3600.0)
    finally:
        ray.kill(other)
    assert isinstance(error, ray.exceptions.ActorDiedError), repr(error)
