"""Driver side of a weight push: learner rank 0 -> every rollout worker (and a live / EMA teacher).

``object_store``: the learner puts the buckets into Ray's store, then each receiver fetches and
loads them (:meth:`launch.cluster.ActorPool.broadcast_weights`); a restarted receiver catches up
from the same handle.

``gloo`` / ``nccl``: learner rank 0 and the receivers of one pool form a weight group (formed
again whenever an actor of the pool has been restarted), the receivers are started first and
then the learner broadcasts while gathering. A failed push is reported by every member; the
groups are dropped and the whole push is retried, and receivers already at that version take
part without loading twice. A restarted receiver catches up over a two-member group of its own.
At every point where the driver recovers an actor, the learner is idle and holds exactly the
last pushed weights (training happens between scoring and the push), which is what makes such
a catch-up exact.
"""

from __future__ import annotations

from typing import Any

from opsd.config import Config
from launch.cluster import ActorPool, _actor_errors
from workers.learner import LearnerGroup
from workers.weight_sync import COLLECTIVE, GroupSpec, WeightSyncError, WeightUpdate, collective_update


class WeightSync:
    def __init__(self, cfg: Config, learner: LearnerGroup):
        self.cfg = cfg
        self.learner = learner
        self.transport = cfg.sync.transport
        self.collective = self.transport in COLLECTIVE
        self.layout = learner.weight_layout() if self.collective else None
        self.formed: dict[str, int] = {}  # pool kind -> its restart count when its group was formed
        self.last_update: WeightUpdate | None = None  # object_store: what a restarted receiver loads
        self.version = 0  # the version of the weights the learner last pushed (and holds)

    def push(self, version: int, pools: list[ActorPool]) -> None:
        """The learner's current weights, as ``version``, into every actor of ``pools``."""
        self.version = version  # the learner holds these weights from now on
        if not self.collective:
            self.last_update = self.learner.push_weights(version)
            for pool in pools:
                pool.broadcast_weights(self.last_update, retries=self.cfg.sync.retries)
            return
        import ray

        update = collective_update(version, self.transport, self.layout)
        tries = self.cfg.sync.retries + 1
        for attempt in range(tries):
            try:
                for pool in pools:
                    self._ensure_group(pool)
                receiving = [(pool, i, a.load_weights.remote(update)) for pool in pools for i, a in enumerate(pool.actors)]
                sent = self.learner.push_weights(version, tuple(pool.kind for pool in pools))
                errors = [] if sent["ok"] else [f"learner rank 0: {sent['error']}"]
                for pool, i, ref in receiving:
                    try:
                        ray.get(ref)
                    except _actor_errors() as exc:
                        pool._recover(pool.actors[i], exc)  # restarted, and caught up by catch_up()
                    except ray.exceptions.RayTaskError as exc:
                        errors.append(f"{pool.kind} {i}: {exc.cause if exc.cause is not None else exc}")
            except (WeightSyncError, ray.exceptions.RayTaskError) + _actor_errors() as exc:
                errors = [str(exc)]  # an actor that died while the group formed is recovered on the next try
            if not errors:
                return
            for pool in pools:
                self._drop_group(pool.kind)
        raise WeightSyncError(
            f"weight version {version} did not reach every receiver over sync.transport={self.transport} after "
            f"{tries} tries: {'; '.join(errors)}"
        )

    def catch_up(self, pool: ActorPool, actor: Any) -> None:
        """Bring a restarted actor to the last pushed version (it starts from the initial weights)."""
        import ray

        if self.version == 0:
            return
        if not self.collective:
            ray.get(actor.load_weights.remote(self.last_update))
            return
        name = f"{pool.kind}-catch-up"
        try:
            self._form(name, [actor])
            ref = actor.load_weights.remote(collective_update(self.version, self.transport, self.layout))
            sent = self.learner.push_weights(self.version, (name,))
            ray.get(ref)
            if not sent["ok"]:
                raise WeightSyncError(f"catching up a restarted {pool.kind} actor failed: {sent['error']}")
        finally:
            self.learner.close_weight_group(name)

    # --- weight groups ------------------------------------------------------------------------

    def _ensure_group(self, pool: ActorPool) -> None:
        import ray

        if self.formed.get(pool.kind) == pool.restarts:
            return
        # A member that died since it was last used would leave the others waiting in the
        # rendezvous: bring it back (and up to date) first.
        for actor in pool.actors:
            try:
                ray.get(actor.get_version.remote())
            except _actor_errors() as exc:
                pool._recover(actor, exc)
        self._form(pool.kind, pool.actors)
        self.formed[pool.kind] = pool.restarts

    def _drop_group(self, name: str) -> None:
        self.formed.pop(name, None)
        self.learner.close_weight_group(name)

    def _form(self, name: str, actors: list) -> None:
        """Rendezvous of learner rank 0 (rank 0) and every process of ``actors`` (ranks 1..)."""
        import ray

        # A receiver whose model does not match fails here, before anyone waits for it.
        ray.get([a.check_weight_layout.remote(self.layout) for a in actors])
        sizes = ray.get([a.weight_group_size.remote() for a in actors])
        world = 1 + sum(sizes)
        host, port = self.learner.open_weight_group(name, world)

        def spec(rank: int) -> GroupSpec:
            return GroupSpec(name, self.transport, host, port, world, rank, self.cfg.sync.timeout_s)

        starts = [1 + sum(sizes[:i]) for i in range(len(actors))]
        refs = [a.join_weight_group.remote(spec(r)) for a, r in zip(actors, starts)]
        refs.append(self.learner.join_weight_group(spec(0)))
        ray.get(refs)
