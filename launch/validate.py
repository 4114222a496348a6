"""``opsd validate``: check a config, its model, its data and the resources it asks for, starting
nothing and fetching nothing.

Runs anywhere, in seconds: no Ray, no vLLM, no download. The model and data checks are the very
functions ``opsd train`` runs before its first step (launch/problems.py), so validate refuses
exactly what train would refuse, with the same message. Three answers: ``ok``; a refusal (an
exception naming the key, file or row, printed by the CLI as train prints it); or, for what it
would have to download first (a named model or set not fetched yet, a hub model not in the
local cache), a last line "cannot check without fetching N MB (...): run `...`". What it cannot
see at all (whether the cluster has the GPUs) it states instead of checking.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from opsd.config import (
    Config, ConfigError, load_config, notes, resolve_path, samples_per_prompt, scorer_actors, serves_adapter,
    uses_scorer,
)
from opsd.assets.wheels import NotFetched
from opsd.launch.problems import check_data, check_model
from opsd.launch.resources import actor_resources, resource_needs
from opsd.objectives import objective
from opsd.vocab import REFUSED, UNCHECKED, Answer, compare

# Hugging Face repo ids: "org/name", letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CANNOT_CHECK = "cannot check without fetching"  # how the third answer's lines start


def validate_config(config_path: str, overrides: Sequence[str] = (), *, check_data: bool = True) -> list[str]:
    """Load ``config_path`` with ``overrides`` and check what can be checked here.

    Returns the report as lines, the last one ``ok`` or a line starting with :data:`CANNOT_CHECK`;
    raises at the first problem what ``opsd train`` would raise (ConfigError, DataError,
    PromptTooLongError, ModelError). With ``check_data=False`` the data paths are not read (a
    cluster recipe whose data lives on the cluster).
    """
    cfg = load_config(config_path, list(overrides))
    if cfg.stages:
        return _validate_stages(cfg, config_path, check_data)
    lines, unchecked = _report(cfg, config_path, check_data)
    return lines + (unchecked or ["ok"])


def _validate_stages(cfg: Config, config_path: str, check_data: bool) -> list[str]:
    """Every stage's effective config (the run's config with its overrides: launch/stages.py),
    checked and reported as a one-stage config is, each report's lines headed by its stage."""
    from opsd.launch.stages import stage_configs

    found = stage_configs(cfg)
    lines = [f"config: {config_path}: {len(found)} stages, {found[-1][0].last_step} steps "
             f"({' -> '.join(f'{s.name} {s.steps}' for s, _ in found)})"]
    unchecked: list[str] = []
    for stage, scfg in found:
        report, missing = _report(scfg, config_path, check_data)
        lines.append(f"stage {stage.index}: {stage.name}, algo={stage.algo}, steps {stage.first_step + 1}-"
                     f"{stage.last_step}, " + (f"teacher {stage.teacher}" if uses_scorer(scfg) else "no teacher"))
        lines += [f"[{stage.name}] {line}" for line in report[1:]]
        unchecked += [m for m in missing if m not in unchecked]
    return lines + (unchecked or ["ok"])


def _report(cfg: Config, config_path: str, check_data: bool) -> tuple[list[str], list[str]]:
    """The report of one (stage's) config, and what could not be checked without fetching."""
    options = objective(cfg.algo).options(cfg)
    algo = f"algo={cfg.algo}" + (f", {options}" if options is not None else "")
    lines = [f"config: {config_path} ({algo}, device={cfg.cluster.device}, dtype={cfg.model.dtype})",
             _check_model(cfg)]
    unchecked: list[str] = []
    tokenizer = _tokenizer(cfg, unchecked)
    teacher_tokenizer = None
    if cfg.teacher.model is not None:
        lines.append(f"teacher: {_describe_model('teacher.model', cfg.teacher.model)}")
        teacher = check_teacher_tokenizer(cfg)
        lines.append(f"teacher: {teacher.line}")
        if teacher.verdict == UNCHECKED:
            unchecked.append(teacher.line)
        elif tokenizer is not None:
            teacher_tokenizer = _teacher_tokenizer(cfg)
    teacher_tokenizers = _check_teachers(cfg, tokenizer, lines, unchecked) if cfg.teachers else None
    lines += [f"warning: {note}" for note in notes(cfg)]
    lines += (_check_data(cfg, tokenizer, unchecked, teacher_tokenizer, teacher_tokenizers) if check_data
              else ["data: not read (--skip-data)"])
    lines += _check_resources(cfg)
    return lines, unchecked


def _check_teachers(cfg: Config, tokenizer: Any | None, lines: list[str], unchecked: list[str]) -> dict[str, Any]:
    """Several teachers (teachers:): each one's model and tokenizer against the student's, as for
    teacher.model, and the routing rule; returns name -> the tokenizer of each other model checked."""
    from opsd.teachers import default_teacher, teacher_configs

    tokenizers = {}
    for name, one in teacher_configs(cfg).items():
        key, where = f"teachers.{name}.model", f"teacher {name}"
        if one.teacher.model is None:
            lines.append(f"{where}: the student's initial weights (fixed), context {one.teacher.context}")
            continue
        lines.append(f"{where}: {_describe_model(key, one.teacher.model)}, context {one.teacher.context}")
        answer = check_teacher_tokenizer(one, key=key)
        lines.append(f"{where}: {answer.line}")
        if answer.verdict == UNCHECKED:
            unchecked.append(f"{where}: {answer.line}")
        elif tokenizer is not None:
            tokenizers[name] = _teacher_tokenizer(one)
    lines.append(f"teachers: each row's teacher is its data column {cfg.teacher.route!r} (a row without it: "
                 f"{default_teacher(cfg)}); one scorer pool per teacher")
    return tokenizers


def _teacher_tokenizer(cfg: Config) -> Any:
    """teacher.model's tokenizer from this machine's files (its check answered ok, so they are here):
    its chat template renders the teacher's prompts, whose lengths are checked as train checks them."""
    from opsd.assets.models import load_tokenizer, made_reference

    return load_tokenizer(made_reference(cfg.teacher.model)[0], trust_remote_code=cfg.model.trust_remote_code)


def check_teacher_tokenizer(cfg: Config, resolved: tuple[str, str] | None = None, *,
                            key: str = "teacher.model") -> Answer:
    """teacher.model against model.path: the same tokenizer (opsd/vocab.py), one of three answers;
    the refusal is raised as a ConfigError. ``resolved``: the (student, teacher) directories or hub
    ids that opsd train has resolved and loads anyway, compared with what loading them fetches;
    None (opsd validate): from the files on this machine only, so that a named model or a GGUF not
    made yet, or a hub id not in the local cache, answers "cannot check without fetching"."""
    from opsd.assets.models import made_reference

    if resolved is None:
        refs = [made_reference(path) for path in (cfg.model.path, cfg.teacher.model)]
        why = [reason for _, reason in refs if reason]
        if why:
            return Answer(UNCHECKED, f"cannot check without fetching: the teacher's tokenizer against the student's "
                                     f"({'; '.join(why)})")
        student, teacher = (ref for ref, _ in refs)
    else:
        student, teacher = resolved
    answer = compare(student, teacher, local_only=resolved is None, trust_remote_code=cfg.model.trust_remote_code,
                     key=key)
    if answer.verdict == REFUSED:
        raise ConfigError(answer.line)
    return answer


def _check_model(cfg: Config) -> str:
    return f"model: {_describe_model('model.path', cfg.model.path)}"


def _describe_model(key: str, path: str) -> str:
    from opsd.assets.models import MODELS, describe

    named = describe(path)
    if named is not None:
        return named.removeprefix("model: ")
    local = resolve_path(path)
    if local is not None and local.is_file() and local.suffix == ".gguf":
        return f"GGUF file {local} (imported once into artifacts/gguf/ on first use)"
    if local is not None and local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"config key '{key}' = {path!r}: {local} exists but is not a model directory (no config.json)"
            )
        return f"local directory {local}"
    if HUB_ID.match(path) and not path.startswith((".", "~")):
        return f"{path} (Hugging Face hub id; fetched where the job runs)"
    raise ConfigError(
        f"config key '{key}' = {path!r}: no such directory, and not a Hugging Face hub id 'org/name'; "
        f"expected a named model ({', '.join(MODELS)}), a .gguf file, a local model directory with config.json, "
        "or a hub id such as Qwen/Qwen3-1.7B"
    )


def _tokenizer(cfg: Config, unchecked: list[str]) -> Any | None:
    """The model's tokenizer after train's model checks, or None (noted in ``unchecked``) when the
    model is not here and would have to be fetched."""
    try:
        return check_model(cfg, fetch=False)[1]
    except NotFetched as exc:
        unchecked.append(str(exc))
        return None


def _check_data(cfg: Config, tokenizer: Any | None, unchecked: list[str], teacher_tokenizer: Any = None,
                teacher_tokenizers: dict[str, Any] | None = None) -> list[str]:
    try:
        found = check_data(cfg, tokenizer, fetch=False, teacher_tokenizer=teacher_tokenizer,
                           teacher_tokenizers=teacher_tokenizers)
    except NotFetched as exc:
        unchecked.append(str(exc))
        return ["data: not read (it would have to be fetched first)"]
    lines = found.report()
    if tokenizer is None:
        lines.append("data: prompt lengths not checked (they need the model's tokenizer)")
    return lines


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
