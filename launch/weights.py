"""The driver's side of a weight push: learner rank 0 -> every rollout worker (and a live or EMA
teacher). :class:`WeightSync` is the one place where a push's path is chosen (docs/DESIGN.md,
"Weight sync"), from the declarations of the transports (opsd.workers.transports):

* **store-and-forward** (object_store, in_place): the learner sends, then each receiver loads
  the update it is handed (:meth:`WeightSync._deliver`); a restarted receiver catches up from the
  same handle, also one restarted while idle, which the check before the loads finds. With ``sync.shared_memory`` and every receiver on learner rank 0's Ray node, the
  primary transport's ``on_one_host`` variant (in_place) carries the push; a receiver that cannot
  read it after all gets the push again through the variant's ``fallback`` (object_store), and so
  do all later pushes. A restarted receiver on another node is caught up through the primary.
* **collective** (gloo, nccl): learner rank 0 and the receivers of one pool form a weight group
  (formed again whenever an actor of the pool has been restarted). The receivers are started
  first, then the learner broadcasts while it gathers, and the driver watches all of them: a
  receiver whose call fails has its group aborted at once, so nobody waits for it until
  sync.timeout_s. A failed push drops the groups and is retried whole; receivers already at that
  version take part without loading twice. A restarted receiver catches up over a two-member
  group of its own.

At every point where the driver recovers an actor, the learner is idle and holds exactly the
last pushed weights (training happens between scoring and the push), which is what makes a
catch-up exact, and what lets a fallback push the learner's current weights under the last
pushed version.
"""

from __future__ import annotations

from typing import Any

from opsd.config import Config
from opsd.launch.cluster import ActorPool, actor_errors
from opsd.workers.learner import LearnerGroup
from opsd.workers.transports import Transport, transport
from opsd.workers.transports.base import GroupSpec, WeightSyncError, WeightUpdate, announce


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc).strip().splitlines()[-1][:500]


class WeightSync:
    def __init__(self, cfg: Config, learner: LearnerGroup):
        self.cfg = cfg
        self.learner = learner
        self.primary: Transport = transport(cfg.sync.transport)
        # The transport a push takes when every receiver shares learner rank 0's host; None once
        # a receiver could not read it (then every push goes through the primary).
        self.one_host: Transport | None = None
        if cfg.sync.shared_memory and self.primary.on_one_host:
            local = transport(self.primary.on_one_host)
            self.one_host = local if cfg.cluster.device in local.devices else None
        elif self.primary.same_host:
            self.one_host, self.primary = self.primary, transport(self.primary.fallback)
        self.layout = learner.weight_layout() if self.primary.collective else None
        self._pushed_bytes: int | None = None
        self.formed: dict[str, int] = {}  # pool kind -> its restart count when its group was formed
        self.stores: dict[str, tuple[str, int]] = {}  # group name -> its store (to abort it)
        self.last_update: WeightUpdate | None = None  # store-and-forward: what a restarted receiver loads
        self.version = 0  # the version of the weights the learner last pushed (and holds)
        self._learner_node: str | None = None
        self._pool_nodes: dict[str, tuple[int, bool]] = {}  # pool kind -> (its restarts, on the learner's node)

    @property
    def collective(self) -> bool:
        """Whether every receiver takes part in a push at the moment the learner sends it."""
        return self.primary.collective

    @property
    def pushed_bytes(self) -> int:
        """What one push moves to each receiver (the learner's layout: the same for every push)."""
        if self._pushed_bytes is None:
            self._pushed_bytes = sum(bucket.nbytes for bucket in self.layout or self.learner.weight_layout())
        return self._pushed_bytes

    @property
    def in_place(self) -> bool:
        """Whether the last push was read out of the learner's memory."""
        return self.last_update is not None and transport(self.last_update.transport).same_host

    def push(self, version: int, pools: list[ActorPool]) -> None:
        """The learner's current weights, as ``version``, into every actor of ``pools``."""
        self.version = version  # the learner holds these weights from now on
        if self.primary.collective:
            self._push_collective(version, pools)
            return
        local = self.one_host is not None and all(map(self._local, pools))
        self.last_update = self.learner.push(version, (self.one_host if local else self.primary).name)
        for pool in pools:
            # A receiver restarted since its last call would take this push as if nothing had
            # happened, uncounted and unannounced (and an EMA teacher would blend it into the
            # initial weights): recover it first. The learner is idle and holds this update, so
            # the catch-up is exact.
            pool.check_alive()
        try:
            for pool in pools:
                self._deliver(pool, self.last_update)
        except WeightSyncError as exc:
            if not self.in_place:
                raise
            # E.g. a receiver in another PID namespace, or restarted on another node before the
            # driver noticed.
            self.last_update = self._leave_one_host(f"an in-place weight push failed ({_cause(exc)})")
            for pool in pools:
                self._deliver(pool, self.last_update)

    def catch_up(self, pool: ActorPool, actor: Any) -> None:
        """Bring a restarted actor to the last pushed version (it starts from the initial weights)."""
        import ray

        if self.version == 0:
            return
        if self.primary.collective:
            self._catch_up_collective(pool, actor)
            return
        update = self.last_update
        if self.in_place and not self._on_learner_node([actor]):
            update = self.learner.push(self.version, self.primary.name)  # through the primary, for this one
        try:
            ray.get(actor.load_weights.remote(update))
        except ray.exceptions.RayTaskError as exc:
            if not transport(update.transport).same_host:
                raise
            update = self._leave_one_host(f"a restarted {pool.kind} actor could not read the weights in place "
                                          f"({_cause(exc)})")
            ray.get(actor.load_weights.remote(update))

    # --- store-and-forward -------------------------------------------------------------------

    def _deliver(self, pool: ActorPool, update: WeightUpdate) -> None:
        """Every actor of ``pool`` loads ``update`` (in parallel). Each load is all-or-nothing; a
        failed one is retried up to sync.retries times, then fails loudly naming the receiver. A
        receiver that died is restarted and caught up by its pool's restart hook instead."""
        import ray

        retries = self.cfg.sync.retries
        refs = {i: a.load_weights.remote(update) for i, a in enumerate(pool.actors)}
        attempts = dict.fromkeys(refs, 0)
        while refs:
            i, ref = next(iter(refs.items()))
            try:
                ray.get(ref)
                del refs[i]
            except actor_errors() as exc:
                pool.recover(pool.actors[i], exc)  # the restart hook brings it to the current version
                del refs[i]
            except (WeightSyncError, ray.exceptions.RayTaskError) as exc:
                attempts[i] += 1
                if attempts[i] > retries:
                    raise WeightSyncError(
                        f"{pool.kind} {i} failed to load weight version {update.version} after "
                        f"{retries + 1} tries: {exc}"
                    ) from exc
                refs[i] = pool.actors[i].load_weights.remote(update)

    def _leave_one_host(self, why: str) -> WeightUpdate:
        """Push through the fallback from now on; returns the current version's update that way."""
        fallback = transport(self.one_host.fallback or self.primary.name)
        print(f"opsd: warning: {why}; pushing through {fallback.name} from now on (sync.shared_memory)", flush=True)
        self.one_host = None
        return self.learner.push(self.version, fallback.name)

    def _local(self, pool: ActorPool) -> bool:
        """Whether every actor of ``pool`` is on learner rank 0's node, asked again only after
        one of them was restarted (asking runs a task on each actor, which waits while it works)."""
        known = self._pool_nodes.get(pool.kind)
        if known is None or known[0] != pool.restarts:
            known = self._pool_nodes[pool.kind] = (pool.restarts, self._on_learner_node(pool.actors))
        return known[1]

    def _on_learner_node(self, actors: list) -> bool:
        """Whether every one of ``actors`` runs on learner rank 0's Ray node (False when one
        cannot say: the push then goes through the primary transport, which handles a dead
        receiver)."""
        import ray

        try:
            if self._learner_node is None:
                self._learner_node = self.learner.nodes()[0]  # a restarted learner gets a new WeightSync
            return all(n == self._learner_node for n in ray.get([a.node_id.remote() for a in actors], timeout=60))
        except ray.exceptions.RayError:
            return False

    # --- collective ----------------------------------------------------------------------------

    def _push_collective(self, version: int, pools: list[ActorPool]) -> None:
        import ray

        tries = self.cfg.sync.retries + 1
        failures: list[str] = []
        for attempt in range(1, tries + 1):
            try:
                for pool in pools:
                    self._ensure_group(pool)
                errors = self._broadcast(version, [(pool.kind, pool.actors, pool) for pool in pools])
            except (WeightSyncError, ray.exceptions.RayTaskError, *actor_errors()) as exc:
                errors = [_cause(exc)]  # e.g. a member that could not join; formed again next try
            if not errors:
                return
            failures += [f"try {attempt}: {e}" for e in errors]
            for pool in pools:
                self._drop_group(pool.kind)
        raise WeightSyncError(
            f"weight version {version} did not reach every receiver over sync.transport={self.primary.name} "
            f"in {tries} tries: {'; '.join(failures)}"
        )

    def _broadcast(self, version: int, targets: list[tuple[str, list, ActorPool]]) -> list[str]:
        """One collective push to (group name, its actors, their pool) targets, watched: the
        errors, in the order they arrived; empty when every member took the push."""
        import ray

        update = announce(version, self.primary.name, self.layout)
        receiving = {a.load_weights.remote(update): (name, a, pool) for name, actors, pool in targets for a in actors}
        learner_refs = self.learner.submit_push(version, self.primary.name, tuple(name for name, _, _ in targets))
        errors: list[str] = []
        dead: list[tuple[ActorPool, Any, BaseException]] = []
        pending = list(receiving) + learner_refs
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            if ref in receiving:
                name, actor, pool = receiving[ref]
                i = pool.actors.index(actor)
                try:
                    ray.get(ref)
                    continue
                except actor_errors() as exc:
                    dead.append((pool, actor, exc))
                    reason = f"{pool.kind} {i} died during the push"
                except ray.exceptions.RayTaskError as exc:
                    reason = f"{pool.kind} {i}: {_cause(exc)}"
                errors.append(reason)
                self._abort(name, reason)  # nobody waits for this member any longer
                continue
            try:
                sent = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self.learner.shutdown()  # a rank failed mid-gather: the others cannot go on
                raise RuntimeError(f"a learner rank failed during the push of weight version {version}") from exc
            if ref is learner_refs[0] and not sent["ok"]:
                errors.append(f"learner rank 0: {sent['error']}")
        # The learner is idle again: a restarted receiver can be caught up now.
        for pool, actor, exc in dead:
            pool.recover(actor, exc)
        return errors

    def _catch_up_collective(self, pool: ActorPool, actor: Any) -> None:
        import ray

        name = f"{pool.kind}-catch-up"
        try:
            self._form(name, [actor])
            errors = self._broadcast(self.version, [(name, [actor], pool)])
            if errors:
                raise WeightSyncError(f"catching up a restarted {pool.kind} actor failed: {'; '.join(errors)}")
        finally:
            self._drop_group(name)
            try:
                ray.get(actor.leave_weight_group.remote())
            except ray.exceptions.RayError:
                pass  # it is formed into its pool's group again before the next push anyway

    def _ensure_group(self, pool: ActorPool) -> None:
        # A member that died or was restarted since the last push would leave the others
        # waiting: bring it back (and up to date) first; the group is then formed again.
        pool.check_alive()
        if self.formed.get(pool.kind) != pool.restarts:
            self._form(pool.kind, pool.actors)
            self.formed[pool.kind] = pool.restarts

    def _abort(self, name: str, reason: str) -> None:
        if name in self.stores:
            self.primary.abort_group(*self.stores[name], reason)

    def _drop_group(self, name: str) -> None:
        self.formed.pop(name, None)
        self.stores.pop(name, None)
        self.learner.close_weight_group(name, self.primary.name)

    def _form(self, name: str, actors: list) -> None:
        """Rendezvous of learner rank 0 (rank 0) and every process of ``actors`` (ranks 1..)."""
        import ray

        # A receiver whose model does not match fails here, before anyone waits for it.
        ray.get([a.check_weight_layout.remote(self.layout) for a in actors])
        sizes = ray.get([a.weight_group_size.remote() for a in actors])
        world = 1 + sum(sizes)
        host, port = self.learner.open_weight_group(name, world, self.primary.name)
        self.stores[name] = (host, port)

        def spec(rank: int) -> GroupSpec:
            return GroupSpec(name, self.primary.name, host, port, world, rank, self.cfg.sync.timeout_s)

        starts = [1 + sum(sizes[:i]) for i in range(len(actors))]
        joining = [a.join_weight_group.remote(spec(r)) for a, r in zip(actors, starts)]
        pending = joining + [self.learner.join_weight_group(spec(0))]
        first_error: BaseException | None = None
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                if first_error is None:
                    first_error = exc
                    who = f"member {joining.index(ref) + 1}" if ref in joining else "learner rank 0"
                    self._abort(name, f"{who} could not join: {_cause(exc)}")
        if first_error is not None:
            raise first_error
