"""A run's actors: the rollout workers (vLLM), the scorers (the teacher), the learner group (DeepSpeed
ZeRO) and the weight sync between them; how they start, where they landed, how many threads each
runs, and how they go."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opsd.config import Config, ConfigError, notes, scorer_actors, uses_scorer
from opsd.teachers import teacher_config
from opsd.launch.cluster import ActorPool, torch_threads
from opsd.launch.teachers import TeacherPools
from opsd.launch.resources import capacity_shortfall
from opsd.launch.weights import WeightSync
from opsd.workers.learner import LearnerGroup
from opsd.workers.rollout import EngineScorerWorker, RolloutWorker
from opsd.workers.scorer import ScorerWorker


def say(msg: str) -> None:
    print(f"opsd: {msg}", flush=True)


@dataclass
class Actors:
    rollouts: ActorPool
    # None when the objective scores nothing (GRPO without its KL term, SFT), or when the rollout
    # engines score the live teacher themselves (scorer.on_rollout_engines)
    scorers: ActorPool | None
    learner: LearnerGroup
    weights: WeightSync
    scores_on_rollouts: bool = False
    # Several teachers (teachers:): name -> its scorer pool; ``scorers`` is then None.
    teacher_pools: dict[str, ActorPool] = field(default_factory=dict)
    teacher_models: dict[str, str | None] = field(default_factory=dict)  # name -> teachers.<name>.model

    @property
    def scoring(self) -> ActorPool | TeacherPools | None:
        """What scores the teacher (the ``score`` method of a pool's actors), if anything: the
        pools of several teachers, each taking the samples routed to it."""
        if self.teacher_pools:
            return TeacherPools(self.teacher_pools, self.teacher_models)
        return self.rollouts if self.scores_on_rollouts else self.scorers

    def scorer_pools(self) -> dict[str, ActorPool]:
        """Every scorer pool, by role name: "scorer", or "scorer:<name>" for each of several teachers."""
        if self.teacher_pools:
            return {f"scorer:{name}": pool for name, pool in self.teacher_pools.items()}
        return {"scorer": self.scorers} if self.scorers else {}

    def replace_learner(self, learner: LearnerGroup) -> None:
        """A new learner group (after one died), with a weight sync of its own."""
        self.learner = learner
        self.weights = WeightSync(self.learner.cfg, learner)

    def thread_counts(self) -> dict[str, list[int]]:
        """The torch threads of every actor, by role."""
        counts = {"rollout": torch_threads(self.rollouts.actors)}
        for role, pool in self.scorer_pools().items():
            counts[role] = torch_threads(pool.actors)
        counts["learner"] = torch_threads(self.learner.ranks)
        return counts

    def placement(self) -> dict[str, list[str]]:
        """The Ray node id of every actor, by role (learner ranks in rank order)."""
        where = {"rollout": self.rollouts.nodes(), "learner": self.learner.nodes()}
        where.update({role: pool.nodes() for role, pool in self.scorer_pools().items()})
        return where

    def log_placement(self) -> None:
        """One line saying where the roles run, when they span more than one Ray node."""
        where = self.placement()
        nodes = sorted({n for ids in where.values() for n in ids})
        if len(nodes) > 1:
            short = {n: f"node {k + 1} ({n[:8]})" for k, n in enumerate(nodes)}
            say("placement: " + "; ".join(f"{role} on {', '.join(short[n] for n in ids)}" for role, ids in where.items()))

    def shutdown(self) -> None:
        """Kill the run's actors (the Ray cluster itself is left to whoever started it)."""
        for pool in (self.rollouts, *self.scorer_pools().values()):
            pool.kill()
        self.learner.shutdown()


def start_actors(cfg: Config, model_path: str, *, local_cluster: bool = True,
                 teacher_path: str | None = None, teacher_paths: dict[str, str] | None = None) -> Actors:
    """Every actor of the run, started and ready (vLLM engines loaded, learner ranks set up). The
    scorers load ``teacher_path`` (another model, teacher.model, resolved; or a stage's teacher,
    launch/stages.py), else the student's ``model_path``; with several teachers (teachers:), each
    pool loads its ``teacher_paths[name]``."""
    check_capacity(cfg, strict=local_cluster)
    t0 = time.perf_counter()
    backend = "vLLM" if cfg.scorer.backend == "vllm" else "transformers"
    scorers = f"{cfg.scorer.num_workers} scorer(s) ({backend}), " if scorer_actors(cfg) else ""
    if scorer_actors(cfg) and cfg.teachers:
        scorers = f"{len(cfg.teachers)} teachers' scorer pools, "
    if uses_scorer(cfg) and not scorer_actors(cfg):
        scorers = f"no scorer (the rollout engines score the {cfg.teacher.mode} teacher), "
    say(f"starting {cfg.rollout.num_workers} rollout worker(s) (vLLM), {scorers}{cfg.learner.num_ranks} "
        f"learner rank(s) (ZeRO-{cfg.learner.zero_stage}) on {model_path}, {cfg.model.dtype}")
    if teacher_path is not None:
        other = "another model" if cfg.teacher.model is not None else "the student's weights"
        say(f"the teacher is {other}: {teacher_path} (fixed; no weight pushes)")
    for name, path in (teacher_paths or {}).items():
        one = teacher_config(cfg, name)
        say(f"teacher {name}: {path} ({one.scorer.num_workers} scorer(s), {one.scorer.backend}, context "
            f"{one.teacher.context}; fixed, no weight pushes)")
    for note in notes(cfg):
        say(f"warning: {note}")
    gpu = 1 if cfg.cluster.device == "cuda" else 0
    kw = dict(max_restarts=cfg.train.max_actor_restarts, place_timeout=cfg.cluster.place_timeout_s)
    rollouts = ActorPool(
        "rollout", RolloutWorker, cfg.rollout.num_workers,
        {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu * cfg.rollout.tensor_parallel_size,
         **_resources(cfg.rollout.resources)},
        (cfg, model_path), **kw,
    )
    scorer_pool, teacher_pools = None, {}
    if scorer_actors(cfg) and cfg.teachers:
        teacher_pools = {name: scorer_pool_of(teacher_config(cfg, name), teacher_paths[name], f"scorer:{name}", kw)
                         for name in cfg.teachers}
    elif scorer_actors(cfg):
        scorer_pool = scorer_pool_of(cfg, teacher_path or model_path, "scorer", kw)
    learner = LearnerGroup(cfg, model_path)
    actors = Actors(rollouts, scorer_pool, learner, WeightSync(cfg, learner),
                    scores_on_rollouts=uses_scorer(cfg) and cfg.scorer.on_rollout_engines,
                    teacher_pools=teacher_pools, teacher_models={n: t.model for n, t in cfg.teachers.items()})
    rollouts.wait_ready()
    for pool in actors.scorer_pools().values():
        pool.wait_ready()
    say(f"actors ready in {time.perf_counter() - t0:.0f}s")
    actors.log_placement()
    if cfg.cluster.device == "cpu":
        threads = actors.thread_counts()
        say("threads per actor: " + ", ".join(f"{role} {'/'.join(map(str, n))}" for role, n in threads.items())
            + " (rollout|scorer|learner.num_threads)")
    return actors


def scorer_pool_of(cfg: Config, path: str, kind: str, kw: dict) -> ActorPool:
    """One teacher's scorer pool (of the backend its config names) loading ``path``."""
    return ActorPool(
        kind, EngineScorerWorker if cfg.scorer.backend == "vllm" else ScorerWorker, cfg.scorer.num_workers,
        {"num_cpus": cfg.scorer.num_cpus_per_worker, "num_gpus": cfg.scorer.num_gpus_per_worker,
         **_resources(cfg.scorer.resources)},
        (cfg, path), **kw,
    )


def check_capacity(cfg: Config, *, strict: bool) -> None:
    """Ray waits forever for an actor that does not fit; say so up front instead."""
    import ray

    msg = capacity_shortfall(cfg, ray.cluster_resources())
    if msg is None:
        return
    if strict:
        raise ConfigError(msg)
    print(f"opsd: warning: {msg}; waiting for the cluster to provide them")


def _resources(resources: dict) -> dict:
    """Ray actor options for a role's custom resources (none: no option at all)."""
    return {"resources": dict(resources)} if resources else {}
