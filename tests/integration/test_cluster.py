"""ActorPool (launch/cluster.py) with real Ray actors that die and are restarted by Ray: a restart
is recognised by the actor process's incarnation token, not its pid, and each death is counted,
announced and caught up once, whichever path sees it (issue 41)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from opsd.launch.cluster import ActorPool
from opsd.launch.stopping import ActorLost
from opsd.workers.incarnation import Incarnation

pytestmark = pytest.mark.integration

SAME_PID = 108  # the pid both processes had in the failing run of issue 41
# Ray's error for a call on an actor whose process died (which one depends on how far Ray got).
RAY_CAUSE = re.compile(r"died \((ActorDiedError|ActorUnavailableError): ")


class SamePid:
    """A real actor whose every process says it is pid 108, as a restarted actor does when Ray
    places it on a replacement host with a PID namespace of its own (a pod, tests/integration/
    test_hosts.py). It holds a weights version, as a rollout worker does, starting from 0."""

    def __init__(self, index: int):
        self._incarnation = dataclasses.replace(Incarnation.draw(), pid=SAME_PID)
        self.version = 0

    def pid(self) -> int:
        return SAME_PID

    def incarnation(self) -> Incarnation:
        return self._incarnation

    def get_version(self) -> int:
        return self.version

    def load(self, version: int) -> None:
        self.version = version

    def die(self) -> None:
        os._exit(1)

    def work(self, x: int, marker: str) -> tuple[int, int]:
        """Dies in its first call (the marker tells later processes it happened), then answers
        with the weights version it holds."""
        if not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)
        return x, self.version


def warnings_in(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("opsd: warning: rollout 0 died")]


def pool_at_version(ray, version: int, max_restarts: int = 2) -> tuple[ActorPool, list]:
    """One SamePid actor, ready; its on_restart loads ``version`` and records the call."""
    pool = ActorPool("rollout", SamePid, 1, {"num_cpus": 0}, (), max_restarts=max_restarts, place_timeout=120)
    caught_up: list[str] = []

    def catch_up(actor) -> None:
        ray.get(actor.load.remote(version))
        caught_up.append(ray.get(actor.incarnation.remote()).token)

    pool.on_restart = catch_up
    pool.wait_ready()
    ray.get(pool.actors[0].load.remote(version))
    return pool, caught_up


def test_a_restart_in_a_process_with_the_old_pid_is_counted_announced_and_caught_up_once(
    ray_session, tmp_path, capsys
):
    ray = ray_session
    pool, caught_up = pool_at_version(ray, 7)
    try:
        actor = pool.actors[0]
        before = ray.get(actor.incarnation.remote())
        # The actor dies inside the call; the pool recovers it and retries the call.
        result = pool.map("work", [(5, str(tmp_path / "died"))])
        after = ray.get(actor.incarnation.remote())
        assert ray.get(actor.pid.remote()) == before.pid == after.pid == SAME_PID  # the premise of the issue
        assert after.token != before.token
        assert pool.restarts == 1
        assert caught_up == [after.token]
        assert result == [(5, 7)], "the retried call ran before the restarted actor was caught up"
        lines = warnings_in(capsys.readouterr().out)
        assert len(lines) == 1, lines
        assert RAY_CAUSE.search(lines[0]) and f"as pid {SAME_PID} on node" in lines[0]
        assert f"it was pid {SAME_PID} on node" in lines[0] and "restart 1" in lines[0]

        # The same death seen again, by the check before a push and by another failed call: it
        # was recovered already, so nothing is counted, printed or loaded again.
        pool.check_alive()
        pool.recover(actor, RuntimeError("a call that failed on the old process"))
        assert pool.restarts == 1 and caught_up == [after.token]
        assert warnings_in(capsys.readouterr().out) == []
    finally:
        pool.kill()


def test_a_death_first_seen_by_the_check_is_announced_once_and_the_failed_call_then_counts_nothing(
    ray_session, capsys
):
    ray = ray_session
    pool, caught_up = pool_at_version(ray, 3)
    try:
        actor = pool.actors[0]
        before = ray.get(actor.incarnation.remote())
        # Dies between two of the pool's calls (the test sees the death, the pool does not);
        # Ray restarts it.
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.die.remote())
        # The check before a push finds it (its call fails, or answers from the new process,
        # depending on how far Ray got: one line either way).
        pool.check_alive()
        after = ray.get(actor.incarnation.remote())
        assert after.token != before.token and after.pid == before.pid
        assert pool.restarts == 1 and caught_up == [after.token]
        assert ray.get(actor.get_version.remote()) == 3
        # A call that failed on the old process, seen after the check: the same death.
        pool.recover(actor, RuntimeError("the old process's call failed"))
        assert pool.restarts == 1 and caught_up == [after.token]
        lines = warnings_in(capsys.readouterr().out)
        assert len(lines) == 1 and "restart 1" in lines[0], lines
    finally:
        pool.kill()


def test_a_death_between_two_calls_is_announced_and_the_next_call_redone_after_the_catch_up(
    ray_session, tmp_path, capsys
):
    ray = ray_session
    pool, caught_up = pool_at_version(ray, 9)
    marker = tmp_path / "died"
    marker.touch()  # `work` answers at once
    try:
        actor = pool.actors[0]
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.die.remote())  # the pool does not see this death
        # No call of the pool fails: the next one may well run on the new process, with the
        # initial weights (version 0), before the pool knows. Its probe tells, and the call is redone.
        assert pool.map("work", [(1, str(marker))]) == [(1, 9)]
        assert pool.restarts == 1 and len(caught_up) == 1
        lines = warnings_in(capsys.readouterr().out)
        assert len(lines) == 1 and "restart 1" in lines[0], lines
        assert pool.map("work", [(2, str(marker))]) == [(2, 9)] and pool.restarts == 1  # nothing more to see
    finally:
        pool.kill()


def test_an_actor_that_dies_again_while_it_is_caught_up_is_recovered_again(ray_session, capsys):
    ray = ray_session
    pool = ActorPool("rollout", SamePid, 1, {"num_cpus": 0}, (), max_restarts=2, place_timeout=120)
    hooks: list[str] = []

    def catch_up_dying_once(actor) -> None:
        hooks.append(ray.get(actor.incarnation.remote()).token)
        if len(hooks) == 1:
            ray.get(actor.die.remote())  # raises: the actor died during its catch-up
        ray.get(actor.load.remote(4))

    pool.on_restart = catch_up_dying_once
    pool.wait_ready()
    try:
        actor = pool.actors[0]
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.die.remote())
        pool.recover(actor, RuntimeError("its call failed"))
        assert pool.restarts == 2
        assert len(set(hooks)) == 2 and hooks[-1] == ray.get(actor.incarnation.remote()).token
        assert ray.get(actor.get_version.remote()) == 4
        lines = warnings_in(capsys.readouterr().out)
        assert [("restart 1" in line, "restart 2" in line) for line in lines] == [(True, False), (False, True)], lines
        assert RAY_CAUSE.search(lines[1])  # the second death's cause: the catch-up's call that failed
    finally:
        pool.kill()


def test_an_actor_that_used_up_its_restarts_is_lost_at_once_naming_the_key(ray_session, tmp_path):
    """Ray does not restart an actor past max_restarts: the pool says so with the key to raise,
    instead of waiting cluster.place_timeout_s for a placement that cannot come."""
    ray = ray_session
    pool, caught_up = pool_at_version(ray, 2, max_restarts=1)
    try:
        actor = pool.actors[0]
        assert pool.map("work", [(1, str(tmp_path / "died"))]) == [(1, 2)]  # dies once: restarted
        assert pool.restarts == 1 and pool.actor_restarts == [1] and len(caught_up) == 1
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.die.remote())  # the second death: Ray has no restart left for it
        with pytest.raises(ActorLost) as lost:
            pool.check_alive()
        message = str(lost.value)
        assert "train.max_actor_restarts=1" in message and "will not place it again" in message, message
        assert "place_timeout" not in message  # not the wait for a placement that cannot come
        assert pool.restarts == 1 and len(caught_up) == 1
    finally:
        pool.kill()
