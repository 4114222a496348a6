"""What a run's actors reserve in Ray, summed per role, and whether a cluster can hold them: the
numbers `opsd validate` prints and the checks `opsd train` makes before and after Ray starts
(docs/DESIGN.md, "One check before the first step")."""

from __future__ import annotations

from opsd.config import Config, ConfigError, scorer_actors
from opsd.launch.cluster import custom_parts


def actor_resources(cfg: Config) -> list[tuple[str, int, float, float, str]]:
    """(role, count, CPUs each, GPUs each, the key that sets the GPUs), as the driver asks Ray."""
    r, s, lr = cfg.rollout, cfg.scorer, cfg.learner
    cuda = cfg.cluster.device == "cuda"
    roles = [("rollout", r.num_workers, r.num_cpus_per_worker, r.tensor_parallel_size if cuda else 0,
              "rollout.tensor_parallel_size")]
    if scorer_actors(cfg) and cfg.teachers:  # a pool per teacher, each with its own settings (teachers:)
        from opsd.teachers import teacher_configs

        for name, one in teacher_configs(cfg).items():
            t = one.scorer
            roles.append(("scorer", t.num_workers, t.num_cpus_per_worker, t.num_gpus_per_worker,
                          f"teachers.{name}.scorer.num_gpus_per_worker"))
    elif scorer_actors(cfg):
        roles.append(("scorer", s.num_workers, s.num_cpus_per_worker, s.num_gpus_per_worker,
                      "scorer.num_gpus_per_worker"))
    roles.append(("learner", lr.num_ranks, lr.num_cpus_per_rank, lr.num_gpus_per_rank, "learner.num_gpus_per_rank"))
    return roles


def resource_needs(cfg: Config) -> tuple[float, float]:
    """(GPUs, CPUs) that the run's actors reserve in Ray, all together."""
    roles = actor_resources(cfg)
    return sum(n * g for _, n, _, g, _ in roles), sum(n * c for _, n, c, _, _ in roles)


def custom_resource_needs(cfg: Config) -> dict[str, float]:
    """Custom Ray resources (rollout/scorer/learner .resources) that the actors reserve, all together."""
    need: dict[str, float] = {}
    for role, n, _, _, _ in actor_resources(cfg):
        for name, amount in getattr(cfg, role).resources.items():
            need[name] = need.get(name, 0.0) + n * amount
    return need


def check_local_capacity(cfg: Config) -> None:
    """Before the run starts a local cluster of its own: what that cluster will offer is known from
    the config (cluster.num_cpus, and no custom resources), so a run that cannot fit is refused before
    Ray starts, as `opsd validate` refuses it. GPUs are left to check_capacity once Ray is up (a local
    cluster finds them itself)."""
    need_gpus, _ = resource_needs(cfg)
    cpus = float("inf") if cfg.cluster.num_cpus is None else float(cfg.cluster.num_cpus)  # None: Ray counts them
    msg = capacity_shortfall(cfg, {"GPU": need_gpus, "CPU": cpus})  # GPUs: as many as needed, unchecked
    if msg is not None:
        raise ConfigError(msg)


def capacity_shortfall(cfg: Config, have: dict) -> str | None:
    """What the run's actors need beyond the cluster resources ``have`` (Ray's names: CPU, GPU and
    custom ones), as one message naming the keys to change; None when everything fits."""
    gpus, cpus = resource_needs(cfg)
    short = [f"{need:g} {kind}s (the cluster has {have.get(kind, 0):g})"
             for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > have.get(kind, 0) + 1e-9]
    short += [f"{need:g} of the custom resource {name!r} (the cluster has {have.get(name, 0):g}; nodes offer it "
              f"with `ray start --resources`)"
              for name, need in custom_resource_needs(cfg).items() if need > have.get(name, 0) + 1e-9]
    if not short:
        return None
    roles = ", ".join(f"{n} {role} x {c:g} CPU / {g:g} GPU{custom_suffix(getattr(cfg, role).resources)}"
                      for role, n, c, g, _ in actor_resources(cfg))
    return (f"the run's actors need {' and '.join(short)}: {roles}. Lower the per-actor resources "
            "(rollout.num_cpus_per_worker, scorer.num_cpus_per_worker, learner.num_cpus_per_rank, the roles' "
            ".resources, ...) or give "
            "the cluster more (cluster.num_cpus for a local one)")


def custom_suffix(resources: dict) -> str:
    """' / 1 opsd_learner' for a role's custom resources."""
    return "".join(f" / {p}" for p in custom_parts(resources))
