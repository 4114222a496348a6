"""``opsd validate``: check a config, its data and the resources it asks for, starting nothing.

Runs anywhere, in seconds: no Ray, no vLLM, no model download. What it cannot see (whether a hub
model exists, whether the cluster has the GPUs) it states instead of checking. Every failure is a
:class:`ConfigError` naming the key, so the CLI prints it the way it prints a bad key.
"""

from __future__ import annotations

import re
from typing import Sequence

from opsd.config import (
    Config, ConfigError, load_config, notes, resolve_path, samples_per_prompt, scorer_actors, serves_adapter,
    training_rows, uses_scorer,
)
from opsd.assets.datasets import named
from opsd.data import DataError
from opsd.launch.problems import read_problems

# Hugging Face repo ids: "org/name", letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def validate_config(config_path: str, overrides: Sequence[str] = (), *, check_data: bool = True) -> list[str]:
    """Load ``config_path`` with ``overrides`` and check what can be checked here.

    Returns the report as lines; raises :class:`ConfigError` at the first problem. With
    ``check_data=False`` the data paths are not read (a cluster recipe whose data lives on the
    cluster).
    """
    cfg = load_config(config_path, list(overrides))
    algo = f"algo=kd, kd.source={cfg.kd.source}" if cfg.algo == "kd" else f"algo={cfg.algo}"
    lines = [f"config: {config_path} ({algo}, device={cfg.cluster.device}, dtype={cfg.model.dtype})",
             _check_model(cfg)]
    lines += [f"warning: {note}" for note in notes(cfg)]
    lines += _check_data(cfg) if check_data else ["data: not read (--skip-data)"]
    lines += _check_resources(cfg)
    lines.append("ok")
    return lines


def _check_model(cfg: Config) -> str:
    from opsd.assets.models import MODELS, describe

    path = cfg.model.path
    named = describe(path)
    if named is not None:
        return named
    local = resolve_path(path)
    if local is not None and local.is_file() and local.suffix == ".gguf":
        return f"model: GGUF file {local} (imported once into artifacts/gguf/ on first use)"
    if local is not None and local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"config key 'model.path' = {path!r}: {local} exists but is not a model directory (no config.json)"
            )
        return f"model: local directory {local}"
    if HUB_ID.match(path) and not path.startswith((".", "~")):
        return f"model: {path} (Hugging Face hub id; fetched where the job runs, not checked here)"
    raise ConfigError(
        f"config key 'model.path' = {path!r}: no such directory, and not a Hugging Face hub id 'org/name'; "
        f"expected a named model ({', '.join(MODELS)}), a .gguf file, a local model directory with config.json, "
        "or a hub id such as Qwen/Qwen3-1.7B"
    )


def _check_data(cfg: Config) -> list[str]:
    sets = [("data.train_path", cfg.data.train_path)]
    if cfg.eval.every:
        sets.append(("eval.path", cfg.eval.path) if cfg.eval.path else ("data.test_path", cfg.data.test_path))
    lines = []
    for key, value in sets:
        path = _resolve_data_path(value)
        try:
            problems = read_problems(cfg, value, **(training_rows(cfg) if key == "data.train_path" else {}))
        except FileNotFoundError:
            raise ConfigError(
                f"config key '{key}' = {value!r}: {path} does not exist (use --skip-data to check the config "
                "on a machine that does not hold the data)"
            ) from None
        except DataError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from exc
        dataset = named(value)
        about = f" ({dataset.summary})" if dataset else ""
        lines.append(f"data: {key} {value if dataset else path}: {len(problems)} problems{about}")
    if not cfg.eval.every:
        lines.append("data: evaluation is off (eval.every=0); the test set is not read")
    return lines


def _resolve_data_path(value: str) -> str:
    """resolve_path for the file part of ``DIR::SPLIT``."""
    file, sep, split = value.partition("::")
    return f"{resolve_path(file)}{sep}{split}"


def actor_resources(cfg: Config) -> list[tuple[str, int, float, float, str]]:
    """(role, count, CPUs each, GPUs each, the key that sets the GPUs), as the driver asks Ray."""
    r, s, lr = cfg.rollout, cfg.scorer, cfg.learner
    cuda = cfg.cluster.device == "cuda"
    roles = [("rollout", r.num_workers, r.num_cpus_per_worker, r.tensor_parallel_size if cuda else 0,
              "rollout.tensor_parallel_size")]
    if scorer_actors(cfg):
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


def _sync_line(cfg: Config) -> str:
    """Who receives the pushes, what a push holds, and how it travels."""
    sc, r = cfg.sync, cfg.rollout
    receivers = f"{r.num_workers} rollout engine{'s' if r.num_workers > 1 else ''}"
    if scorer_actors(cfg) and cfg.teacher.mode != "fixed":
        receivers += f" and {cfg.scorer.num_workers} {cfg.teacher.mode} teacher{'s' if cfg.scorer.num_workers > 1 else ''}"
    elif uses_scorer(cfg) and cfg.scorer.on_rollout_engines:
        receivers += (" (the live teacher: they score it by prefill)" if cfg.teacher.mode == "live" else
                      f" (they score the {cfg.teacher.mode} teacher by prefill, on the base weights)")
    how = {"object_store": "through Ray's object store", "gloo": "broadcast over gloo (host memory)",
           "nccl": "broadcast over NCCL (GPU to GPU)",
           "in_place": "read in place from the learner's memory (same host)"}.get(sc.transport, f"through {sc.transport}")
    what = " the LoRA adapter alone," if serves_adapter(cfg) else ""
    return (f"sync: learner rank 0 -> {receivers},{what} {how}, {sc.bucket_mb:g} MB buckets"
            + (f", waits at most {sc.timeout_s:g} s" if sc.transport != "object_store" else ""))


def _check_resources(cfg: Config) -> list[str]:
    from opsd.workers.learner_training import micro_batches_per_rank

    cuda = cfg.cluster.device == "cuda"
    r, lr = cfg.rollout, cfg.learner
    roles = actor_resources(cfg)
    notes = []
    for role, _, _, gpus, key in roles:
        if not cuda and gpus:
            raise ConfigError(
                f"config key '{key}' = {gpus:g} asks for GPUs with cluster.device=cpu; Ray would wait for them "
                "forever on a CPU cluster. Set it to 0, or cluster.device=cuda"
            )
        if cuda and not gpus:
            raise ConfigError(f"config key '{key}' = 0 with cluster.device=cuda: the {role} runs on a GPU; give it one")
    if cfg.sync.transport == "nccl":
        # Learner rank 0 and every receiver are ranks of one NCCL group per receiving pool.
        receivers = {"rollout", "learner"} | ({"scorer"} if cfg.teacher.mode != "fixed" else set())
        for role, _, _, gpus, key in roles:
            if role in receivers and gpus < 1:
                raise ConfigError(
                    f"config key '{key}' = {gpus:g} with sync.transport=nccl: NCCL cannot put two members of one "
                    f"weight group on the same GPU; give the {role} a whole GPU, or use sync.transport=object_store"
                )
    if cuda and lr.num_ranks > 1 and lr.num_gpus_per_rank < 1:
        raise ConfigError(
            f"config key 'learner.num_gpus_per_rank' = {lr.num_gpus_per_rank:g} with {lr.num_ranks} ranks: NCCL "
            "cannot put two ranks of one group on the same GPU; use 1"
        )
    if cuda and lr.num_gpus_per_rank > 1:
        notes.append(f"note: a learner rank uses one GPU; learner.num_gpus_per_rank={lr.num_gpus_per_rank:g} "
                     "reserves the rest idle")

    total_gpus, total_cpus = resource_needs(cfg)
    local = cfg.cluster.address is None and cfg.cluster.num_cpus is not None
    if local and total_cpus > cfg.cluster.num_cpus + 1e-9:
        raise ConfigError(
            f"the actors ask for {total_cpus:g} CPUs but config key 'cluster.num_cpus' = {cfg.cluster.num_cpus}: "
            "the local Ray would wait for them forever; lower the num_cpus_per_* keys or raise cluster.num_cpus"
        )
    each = ", ".join(f"{role} {n} x ({c:g} CPU, {g:g} GPU)" for role, n, c, g, _ in roles)
    lines = [f"resources: needs {total_gpus:g} GPUs, {total_cpus:g} CPUs: {each}"]

    rows = cfg.train.prompts_per_step * samples_per_prompt(cfg)
    per_rank = -(-rows // lr.num_ranks)
    lora = f", LoRA r={cfg.model.lora.r}" if cfg.model.lora.enabled else ", full fine-tuning"
    micro = micro_batches_per_rank(cfg)
    lines.append(
        f"learner: {rows} rows per step, {per_rank} per rank as {micro} micro-batch{'es' if micro > 1 else ''} "
        f"of {lr.micro_batch_size}, ZeRO-{lr.zero_stage}{lora}"
    )
    lines.append(_sync_line(cfg))
    budget = cfg.model.max_model_len - r.max_tokens
    if budget <= 0:
        raise ConfigError(
            f"config key 'model.max_model_len' = {cfg.model.max_model_len} leaves no room for a prompt before "
            f"rollout.max_tokens={r.max_tokens} new tokens"
        )
    if cfg.eval.every and cfg.model.max_model_len - cfg.eval.max_tokens <= 0:
        raise ConfigError(
            f"config key 'eval.max_tokens' = {cfg.eval.max_tokens} leaves no room for a prompt in "
            f"model.max_model_len={cfg.model.max_model_len}"
        )
    if budget < cfg.prompt.max_prompt_len:
        notes.append(
            f"note: prompts are capped at model.max_model_len - rollout.max_tokens = {budget} tokens, below "
            f"prompt.max_prompt_len={cfg.prompt.max_prompt_len}"
        )
    return lines + notes
