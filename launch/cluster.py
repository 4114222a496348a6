"""Ray wiring: start or attach to Ray, create the actors, and call them with retries.

A rollout worker or scorer that dies is restarted by Ray (``max_restarts``); the call that was in
flight is retried here on the restarted actor after it has been brought back to the current
weights, so a step's prompts are neither lost nor done twice. A restarted actor is told from the
one it replaced by its incarnation's token (workers/incarnation.py), never by its pid.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from opsd.launch.localhead import LocalCluster
from opsd.launch.stopping import ActorLost
from opsd.config import Config
from opsd.workers.incarnation import Incarnation
from opsd.workers.transports.base import StaleWeightsError

# Every actor gets these (a job's runtime_env may not set the same names: Ray refuses to merge).
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "RAY_DEDUP_LOGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def sample_seed(seed: int, step: int, uid: str) -> int:
    """A per-prompt sampling seed that depends only on (run seed, step, prompt): retries and
    resumed runs draw the same samples."""
    digest = hashlib.blake2b(f"{seed}:{step}:{uid}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _torch_threads(actor: Any) -> int:
    import torch

    return torch.get_num_threads()


def torch_threads(actors: list) -> list[int]:
    """The torch threads each actor's process runs (any actor class: Ray's ``__ray_call__``)."""
    import ray

    return ray.get([a.__ray_call__.remote(_torch_threads) for a in actors])


def init_ray(cfg: Config) -> bool:
    """Attach to a running cluster when told to (cluster.address or RAY_ADDRESS, as under
    ``ray job submit``), else start a local one. Returns True when this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": dict(WORKER_ENV)}
    if cfg.cluster.device == "cpu":
        env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    global _LOCAL
    # A cluster of this run's own, even when another one runs on this machine (a `ray start`
    # head, a test's cluster), in a session of its own: a signal to the driver's process group
    # does not reach it, and it ends with the driver however the driver ends (launch/localhead.py).
    local = LocalCluster(num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
    _token_auth_as_ray_init_would()
    try:
        ray.init(address=local.start(), runtime_env=env, log_to_driver=True, configure_logging=True,
                 logging_level="WARNING")
    except BaseException:
        local.stop()
        raise
    _LOCAL = local
    return True


_LOCAL: LocalCluster | None = None


def starts_local_cluster(cfg: Config) -> bool:
    """Whether init_ray(cfg) would start a local cluster of the run's own (no Ray in this process
    yet, no cluster.address, no RAY_ADDRESS)."""
    import ray

    return not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def _token_auth_as_ray_init_would() -> None:
    """Token authentication for the run's own cluster, as ray.init gives a local cluster: on
    unless RAY_AUTH_MODE says otherwise, with the token of ~/.ray/auth_token (made if missing).
    The mode is set in this process's environment, which the cluster's keeper inherits."""
    from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                          ensure_token_if_auth_enabled)

    enable_token_auth_by_default()
    ensure_token_if_auth_enabled()


def local_cluster_session() -> int | None:
    """The session id of the local cluster init_ray started (its keeper leads it), or None."""
    local = _LOCAL
    return local.proc.pid if local is not None and local.proc is not None else None


def shutdown_ray() -> None:
    """ray.shutdown(), and the end of the local cluster init_ray started, if it started one."""
    import ray

    global _LOCAL
    try:
        ray.shutdown()
    finally:
        local, _LOCAL = _LOCAL, None
        if local is not None:
            local.stop()


def round_robin(items: list, n: int) -> list[list]:
    """Split ``items`` over n actors: actor i gets items i, i + n, ..."""
    return [items[i::n] for i in range(n)]


def unshard(per_actor: list[list], total: int) -> list:
    """Inverse of :func:`round_robin`: results back in the items' order."""
    n = len(per_actor)
    return [per_actor[j % n][j // n] for j in range(total)] if total else []


def custom_parts(resources: dict) -> list[str]:
    """['1 opsd_rollout', ...] from a role's custom resources."""
    return [f"{v:g} {k}" for k, v in resources.items()]


def _asks(options: dict) -> str:
    """'1 CPU, 1 opsd_rollout' from actor options."""
    parts = [f"{options[k]:g} {name}" for k, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")) if options.get(k)]
    return ", ".join(parts + custom_parts(options.get("resources", {}))) or "no resources"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class ActorReplaced(Exception):
    """The cause of a restart that no failed call saw: the actor answered from a new process."""


def actor_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError)


@dataclass
class Pending:
    """Calls in flight on an :class:`ActorPool`, one per actor."""

    method: str
    args: list[tuple]
    kwargs: dict
    refs: dict[int, Any]
    probes: dict[int, Any]  # each actor's incarnation, asked for just before its call


class ActorPool:
    """Actors of one kind (rollout or scorer) and fault-tolerant calls on them."""

    def __init__(self, kind: str, cls: type, n: int, options: dict, args: tuple, *, max_restarts: int,
                 place_timeout: float = 600.0):
        """``place_timeout``: how long an actor that died may take to be placed again and answer
        (a lost node that no autoscaler replaces leaves it pending for ever)."""
        import ray

        self.kind = kind
        self.max_restarts = max_restarts
        self.place_timeout = place_timeout
        self.options = options
        remote = ray.remote(cls)
        self.actors = [
            remote.options(max_restarts=max_restarts, max_task_retries=0, **options).remote(*args, i)
            if kind == "rollout" else
            remote.options(max_restarts=max_restarts, max_task_retries=0, **options).remote(*args)
            for i in range(n)
        ]
        self.actor_restarts = [0] * n  # new processes seen per actor: Ray gives each max_restarts
        # The process each actor runs in, once known, by its incarnation's token: a pid can repeat
        # on a replacement host (workers/incarnation.py).
        self.incarnations: list[Incarnation | None] = [None] * n
        self._behind: set[int] = set()  # counted as restarted, not yet brought to the current weights
        self._recovering: set[int] = set()  # recover() is running for these (its on_restart may call it again)
        self.on_restart: Callable[[Any], None] | None = None

    @property
    def restarts(self) -> int:
        """New processes seen, over all of the pool's actors."""
        return sum(self.actor_restarts)

    def wait_ready(self) -> list:
        import ray

        self.incarnations = ray.get([a.incarnation.remote() for a in self.actors])
        return ray.get([a.get_version.remote() for a in self.actors])

    def _known(self, i: int, now: Incarnation) -> bool:
        known = self.incarnations[i]
        return known is not None and known.token == now.token

    def recover(self, actor: Any, error: BaseException) -> bool:
        """Wait for a failed actor to be back; if it runs in a new process, count the restart, say
        so in one line naming the actor and ``error``, and bring it to the current weights
        (``on_restart``). Each new process is counted and caught up once, whichever path saw its
        predecessor die first (a failed call, a weight push, :meth:`check_alive`): the others find
        it known, and return. One that dies again while it is caught up is recovered again.
        Returns whether the actor was a new process (or one not yet caught up)."""
        i = self.actors.index(actor)
        if i in self._recovering:
            # Called from inside this actor's own catch-up (a collective push watches its members):
            # the catch-up fails, and the call that runs it sees to the actor.
            return True
        self._recovering.add(i)
        try:
            while True:
                now = self._wait_back(i, error)
                if not self._known(i, now):
                    self._count_restart(i, now, error)
                elif i not in self._behind:
                    return False  # the process it had: the call failed, the actor did not die
                try:
                    if self.on_restart is not None:
                        self.on_restart(actor)
                except Exception as exc:
                    # Died again while being caught up: the next process is counted and caught
                    # up in turn. Any other failure of the catch-up is the run's to report.
                    if self._known(i, self._wait_back(i, exc)):
                        raise
                    error = exc
                    continue
                self._behind.discard(i)
                return True
        finally:
            self._recovering.discard(i)

    def _wait_back(self, i: int, error: BaseException) -> Incarnation:
        """Actor i's incarnation once it answers again (Ray places a restarted actor again);
        :class:`ActorLost` when it is not back within ``place_timeout``."""
        import ray

        deadline = time.monotonic() + self.place_timeout
        while True:
            try:
                return ray.get(self.actors[i].incarnation.remote(),
                               timeout=min(60.0, max(deadline - time.monotonic(), 1.0)))
            except actor_errors() + (ray.exceptions.GetTimeoutError,) as exc:
                if self._spent(i, exc):
                    raise ActorLost(
                        f"{self.kind} {i} died ({_first_line(error)}) after Ray had restarted it "
                        f"{self.actor_restarts[i]} time(s), all that train.max_actor_restarts={self.max_restarts} "
                        "allows, so Ray will not place it again; raise train.max_actor_restarts, or look for why it "
                        "keeps dying"
                    ) from error
                if time.monotonic() > deadline:
                    raise ActorLost(
                        f"{self.kind} {i} died ({_first_line(error)}) and Ray did not place it again within "
                        f"cluster.place_timeout_s={self.place_timeout:g} s (it asks for {_asks(self.options)}; was "
                        "its node lost?)"
                    ) from error
                time.sleep(1.0)

    def _spent(self, i: int, exc: BaseException) -> bool:
        """Whether actor i is dead for good: a call on it failed as on a dead actor (not one that
        is unreachable for now, or restarting) after the pool saw Ray restart it as often as
        ``max_restarts`` lets Ray. Waiting ``place_timeout`` for it would only delay the error."""
        import ray

        return 0 <= self.max_restarts <= self.actor_restarts[i] and isinstance(exc, ray.exceptions.ActorDiedError)

    def _count_restart(self, i: int, now: Incarnation, error: BaseException) -> None:
        was, self.incarnations[i] = self.incarnations[i], now
        self._behind.add(i)
        self.actor_restarts[i] += 1
        if self.restarts > self.max_restarts * len(self.actors):
            raise ActorLost(
                f"{self.kind} actors failed too often ({self.restarts} restarts, train.max_actor_restarts="
                f"{self.max_restarts} per actor): {_first_line(error)}"
            ) from error
        before = f"; it was {was.where()}" if was is not None else ""
        print(f"opsd: warning: {self.kind} {i} died ({_first_line(error)}); Ray restarted it as {now.where()} "
              f"(restart {self.restarts}{before}), bringing it to the current weights", flush=True)

    def check_alive(self) -> None:
        """Recover every actor that died, or was restarted, since it was last used."""
        for i, actor in enumerate(self.actors):
            self._check(i, actor.incarnation.remote())

    def _check(self, i: int, probe: Any) -> bool:
        """Recover actor i if ``probe`` (its incarnation, asked for) shows a process that died, or
        one the pool does not know or has not caught up; returns whether it was such a process."""
        import ray

        try:
            now = ray.get(probe)
        except actor_errors() as exc:
            return self.recover(self.actors[i], exc)
        if self._known(i, now) and i not in self._behind:
            return False
        return self.recover(self.actors[i], ActorReplaced("a new process answered; no call to the old one had failed"))

    def submit(self, method: str, per_actor_args: list[tuple], **kwargs) -> "Pending":
        """Start ``method`` on actor i with per_actor_args[i]; :meth:`collect` waits for it."""
        # Ray runs an actor's calls from this process in the order they were made: the probe
        # names the process the call runs in, unless it dies in between (then the call fails).
        probes = {i: self.actors[i].incarnation.remote() for i in range(len(per_actor_args))}
        refs = {i: getattr(self.actors[i], method).remote(*a, **kwargs) for i, a in enumerate(per_actor_args)}
        return Pending(method, per_actor_args, kwargs, refs, probes)

    def collect(self, pending: "Pending") -> list:
        """Results in actor order; a call whose actor died is retried on the restarted actor, and
        so is one that a restarted actor took before the pool knew of the restart (it ran before
        the catch-up, and, unguarded by a version, may have used the initial weights)."""
        import ray

        refs, probes = dict(pending.refs), dict(pending.probes)
        results: dict[int, Any] = {}
        while refs:
            i, ref = next(iter(refs.items()))
            probe = probes.pop(i, None)
            if probe is None or not self._check(i, probe):
                try:
                    results[i] = ray.get(ref)
                    del refs[i]
                    continue
                except actor_errors() as exc:
                    self.recover(self.actors[i], exc)
                except ray.exceptions.RayTaskError as exc:
                    if not isinstance(exc.cause, StaleWeightsError):
                        raise
                    # A call queued while the actor restarted reached it before its catch-up push.
                    self.recover(self.actors[i], exc)
            # The restarted actor now holds the newest weights, which may be newer than those
            # the call was made for (rollouts overlapping training); each result carries its
            # version, and the driver decides what is too stale.
            retry = {**pending.kwargs, "expect_version": None} if "expect_version" in pending.kwargs else pending.kwargs
            probes[i] = self.actors[i].incarnation.remote()
            refs[i] = getattr(self.actors[i], pending.method).remote(*pending.args[i], **retry)
        return [results[i] for i in range(len(pending.args))]

    def map(self, method: str, per_actor_args: list[tuple], **kwargs) -> list:
        return self.collect(self.submit(method, per_actor_args, **kwargs))

    def nodes(self) -> list[str]:
        """The Ray node id each actor runs on."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
