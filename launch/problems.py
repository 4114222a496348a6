"""A run's problems as prompts: the training set (prompt pairs, the sampler that visits them, the
problems themselves for the teacher contexts built per step) and the held-out set, checked
before anything starts.

:func:`check_model` and :func:`check_data` are the checks ``opsd train`` makes before its first
step and the very ones ``opsd validate`` makes (launch/validate.py), so that the two cannot
disagree: train passes ``fetch=True`` and downloads what a named model or set needs; validate
passes ``fetch=False`` and gets :class:`NotFetched` instead, which it reports as what it could not
check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from opsd.config import Config, ConfigError, check, distills, resolve_path, training_rows
from opsd.contexts import context
from opsd.contexts.base import PRIMARY, ContextInput, DatasetView
from opsd.assets.datasets import hint, named, resolve_data
from opsd.assets.wheels import NotFetched
from opsd.data import HUB_ID, DataError, EpochSampler, Problem, load_problems
from opsd.prompts import PromptBuilder, PromptPair
from opsd.teachers import context_key, default_teacher, teacher_config, teacher_configs


@dataclass
class TrainingSet:
    pairs: list[PromptPair]  # the usable training problems, as student (and teacher) prompt ids
    problems: dict[str, Problem]  # uid -> the row (solution, answer) for the contexts built per step
    sampler: EpochSampler  # the order the run visits pairs in; its state is in every checkpoint
    view: DatasetView  # the rest of the set, for contexts that read another problem
    builder: PromptBuilder  # renders a context's messages as token ids, with the run's templates
    eval_pairs: list[PromptPair] = field(default_factory=list)  # held-out problems (eval.every > 0)
    skipped: list[str] = field(default_factory=list)  # uids left out as over-long (prompt.overlong=skip)
    # Renders the teacher's contexts: another model's tokenizer and chat template (teacher.model),
    # else the student's builder itself.
    teacher_builder: PromptBuilder | None = None
    # Several teachers (teachers:): name -> the builder of its prompts (teacher_builders below).
    teacher_builders: dict[str, PromptBuilder] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.initial_sampler = self.sampler.state_dict()  # where a learner lost before any checkpoint restarts
        self.teacher_builder = self.teacher_builder or self.builder

    @property
    def solutions(self) -> dict[str, str]:
        return {uid: p.solution for uid, p in self.problems.items()}


def read_problems(cfg: Config, path: str, *, fetch: bool = True, **requirements) -> list[Problem]:
    """The problem set a config names: a named dataset (made on first use, opsd/assets/datasets.py),
    a file or directory (relative to the working directory, else the repository), or a hub id;
    ``PATH::SPLIT`` picks a split. Read with the config's column names, dataset config and answer
    format; ``requirements`` as load_problems takes them. With ``fetch=False`` a named set whose
    wheel is not here, or a hub dataset, raises :class:`NotFetched`."""
    d = cfg.data
    file, sep, split = resolve_data(path, fetch=fetch).partition("::")
    local = resolve_path(file)
    if not fetch and not local.exists() and HUB_ID.match(file):
        raise NotFetched(f"the hub dataset {file}", "opsd train reads it where the job runs; to check it here, "
                        "save it with datasets' save_to_disk and give that directory")
    try:
        return load_problems(f"{local}{sep}{split}", problem_key=d.problem_key, solution_key=d.solution_key,
                             answer_key=d.answer_key, id_key=d.id_key, dataset_config=d.dataset_config,
                             answer_format=d.answer_format, **requirements)
    except FileNotFoundError:
        if "/" in path or Path(path.split(":")[0]).suffix:
            raise
        # A bare name (no folder, no suffix) is more likely a misspelt named set than a lost file.
        raise FileNotFoundError(f"problem set {path!r} is neither a file here nor a named set{hint(path)}") from None


def check_model(cfg: Config, *, fetch: bool = True) -> tuple[str, Any]:
    """(what the actors load for model.path, its tokenizer), after the checks of a model directory
    (opsd/assets/models.py) and of the config against its vocabulary. Raises ModelError or
    ConfigError naming model.path; with ``fetch=False``, NotFetched for a model not here yet."""
    from opsd.assets.models import check_model_dir, hub_snapshot, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path, fetch=fetch)
    check_model_dir(path if Path(path).exists() else (hub_snapshot(path) or path),
                    trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    check(cfg, vocab_size=len(tokenizer))
    return path, tokenizer


@dataclass
class DataCheck:
    """What :func:`check_data` found. Without a tokenizer (its model not fetched) only the rows
    were read: ``pairs`` is None."""

    train_path: str
    problems: list[Problem]  # the training rows, after data.max_rows
    pairs: list[PromptPair] | None  # the usable ones as prompts
    skipped: list[str]  # uids dropped as over-long (prompt.overlong=skip)
    eval_path: str | None  # None: the run does not evaluate
    eval_rows: int = 0
    eval_pairs: list[PromptPair] = field(default_factory=list)
    eval_skipped: list[str] = field(default_factory=list)
    view: DatasetView | None = None
    builder: PromptBuilder | None = None
    teacher_builder: PromptBuilder | None = None  # teacher.model's template; None: ``builder``
    teacher_builders: dict[str, PromptBuilder] = field(default_factory=dict)  # several teachers' (teachers:)
    routed: dict[str, int] = field(default_factory=dict)  # several teachers: name -> its training rows

    def report(self) -> list[str]:
        """The lines ``opsd validate`` prints about the data."""
        train = f"data: data.train_path {self.train_path}: {len(self.problems)} problems"
        if self.pairs is not None:
            train += f", {len(self.pairs)} usable{_dropped(self.skipped, self.builder)}"
        if self.routed:
            train += f"; rows per teacher: {', '.join(f'{name} {n}' for name, n in self.routed.items())}"
        if self.eval_path is None:
            return [train, "data: evaluation is off (eval.every=0); the test set is not read"]
        held_out = f"data: held-out set {self.eval_path}: {self.eval_rows} problems evaluated"
        if self.pairs is not None:
            held_out += f", {len(self.eval_pairs)} usable{_dropped(self.eval_skipped, None)}"
        return [train, held_out]


def _dropped(skipped: list[str], builder: PromptBuilder | None) -> str:
    if not skipped:
        return ""
    why = f" ({_too_long(builder)})" if builder is not None else ""
    return f"; {len(skipped)} dropped by prompt.overlong=skip{why}"


def _too_long(builder: PromptBuilder) -> str:
    """Why a row is over-long, in the terms of the config."""
    c = builder.cfg
    return (f"a student or teacher prompt over {builder.prompt_limit} tokens: prompt.max_prompt_len={c.max_prompt_len}, "
            f"model.max_model_len={builder.max_model_len} minus {builder.max_new_tokens} new tokens")


def _read(cfg: Config, key: str, value: str, *, fetch: bool, **requirements) -> list[Problem]:
    """read_problems, with the config key named in its errors."""
    try:
        return read_problems(cfg, value, fetch=fetch, **requirements)
    except FileNotFoundError as exc:
        # A path on a laptop checking a cluster recipe: the data is elsewhere; say how to check the rest.
        elsewhere = "; opsd validate --skip-data checks the rest of the config without the data" if "/" in value else ""
        raise DataError(f"config key '{key}' = {value!r}: {exc}{elsewhere}") from None
    except DataError as exc:
        raise DataError(f"config key '{key}': {exc}") from None


def check_data(cfg: Config, tokenizer: Any | None, *, fetch: bool = True, teacher_tokenizer: Any = None,
               teacher_tokenizers: dict[str, Any] | None = None) -> DataCheck:
    """Every training row read and checked and turned into prompt ids (the held-out rows too when
    the run evaluates), and the usable rows counted against train.prompts_per_step. A row must hold
    a solution or an answer only when the objective or the teacher context needs it. Raises a
    DataError, PromptTooLongError or ConfigError naming the file, row or key; with ``fetch=False``,
    NotFetched for a named set not here yet. With ``tokenizer`` None only the rows are checked.
    ``teacher_tokenizer``: another model's (teacher.model), whose chat template renders the teacher's
    prompts, checked against the same limits. ``teacher_tokenizers``: with several teachers
    (teachers:), name -> each other model's tokenizer; every row's route is checked as it is read."""
    train_path = cfg.data.train_path
    if getattr(named(str(train_path)), "eval_only", False):
        raise ConfigError(f"config key 'data.train_path' = {train_path!r}: that set is kept for evaluation only "
                          "(opsd data list); train on another (e.g. mbpp for code) and evaluate on it")
    problems = _read(cfg, "data.train_path", train_path, fetch=fetch, **training_rows(cfg))
    if cfg.data.max_rows:
        problems = problems[: cfg.data.max_rows]
    for name, one in teacher_configs(cfg).items():  # the run's teacher, or each of several with its rows
        if not distills(one):
            continue
        mine = [p for p in problems if (p.teacher or default_teacher(cfg)) == name] if cfg.teachers else problems
        refused = context(one.teacher.context).refused_tasks
        clash = sorted({p.task for p in mine} & set(refused))
        if clash:
            task, key = clash[0], context_key(cfg, name)
            whose = f" (routed to teacher {name})" if cfg.teachers else ""
            raise ConfigError(
                f"config key '{key}' = {one.teacher.context!r} has no meaning for {task} rows, and {train_path} has "
                f"them{whose}: {refused[task]}. Use {key}=solution (the reference code), other_problem or none")
    eval_key, eval_path = ("eval.path", cfg.eval.path) if cfg.eval.path else ("data.test_path", cfg.data.test_path)
    result = DataCheck(str(train_path), problems, None, [], eval_path if cfg.eval.every else None)
    if cfg.teachers:
        routed = [p.teacher or default_teacher(cfg) for p in problems]
        result.routed = {name: routed.count(name) for name in cfg.teachers}
    if tokenizer is not None:
        result.builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                                       max_new_tokens=cfg.rollout.max_tokens)
        result.view = DatasetView(problems, cfg.train.seed)
        if teacher_tokenizer is not None:
            result.teacher_builder = PromptBuilder(teacher_tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                                                   max_new_tokens=cfg.rollout.max_tokens)
        if cfg.teachers:
            result.teacher_builders = teacher_builders(cfg, result.builder, teacher_tokenizers or {})
            result.pairs, result.skipped = build_pairs(cfg, problems, result.builder, result.view,
                                                       result.teacher_builders, str(train_path))
        else:
            result.pairs, result.skipped = result.builder.build(
                problems, source=str(train_path), teacher=static_teacher(cfg, result.builder, result.view),
                teacher_builder=result.teacher_builder)
    usable = len(problems) if result.pairs is None else len(result.pairs)
    if not usable:
        raise DataError(f"{train_path}: no usable problems: all {len(problems)} rows dropped by prompt.overlong=skip "
                        f"({_too_long(result.builder)}); raise those limits")
    # drop_last: a batch never spans two epochs, so no prompt appears twice in one batch (its
    # samples would share a sample_id and, for GRPO, a group).
    if usable < cfg.train.prompts_per_step:
        why = (f": {len(result.skipped)} of its {len(problems)} rows were dropped by prompt.overlong=skip "
               f"({_too_long(result.builder)}); lower train.prompts_per_step or raise those limits"
               if result.skipped else "; lower train.prompts_per_step or use a larger set")
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is more than the {usable} usable "
                          f"problem{'s' if usable > 1 else ''} in {train_path}{why}")
    if cfg.eval.every:
        # Graded by answer: a held-out set of bare problems and answers (a procedural task's) is fine.
        held_out = _read(cfg, eval_key, eval_path, fetch=fetch, require_solution=False)[: cfg.eval.max_problems]
        result.eval_rows = len(held_out)
        if tokenizer is not None:
            # Evaluation answers get eval.max_tokens, so its prompts get the rest of the context.
            builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                                    max_new_tokens=cfg.eval.max_tokens)
            # Built as ever (the teacher's prompt counts in the length check), so that a held-out set
            # keeps the same problems across versions of opsd.
            result.eval_pairs, result.eval_skipped = builder.build(held_out, source=str(eval_path))
    check_sandbox(cfg, problems + held_out if cfg.eval.every else problems)
    return result


def check_sandbox(cfg: Config, problems: list[Problem]) -> None:
    """With code rows to grade, the sandbox the driver grades evaluations in, made now: its isolation
    is said, and a machine that gives less than sandbox.isolation stops the run before its run
    directory exists (each rollout worker checks its own machine the same way)."""
    from opsd.evaluation import CODE

    if any(p.verifier == CODE for p in problems):
        from opsd.sandbox import shared

        shared(cfg.sandbox, log=print)


def load_training_set(cfg: Config, tokenizer: Any, teacher_tokenizer: Any = None,
                      teacher_tokenizers: dict[str, Any] | None = None) -> TrainingSet:
    """The checked data (:func:`check_data`) as the run's training set and held-out prompts."""
    found = check_data(cfg, tokenizer, teacher_tokenizer=teacher_tokenizer, teacher_tokenizers=teacher_tokenizers)
    sampler = EpochSampler(len(found.pairs), seed=cfg.train.seed, shuffle=cfg.data.shuffle, drop_last=True)
    return TrainingSet(found.pairs, {p.uid: p for p in found.problems}, sampler, found.view, found.builder,
                       found.eval_pairs, found.skipped, found.teacher_builder, found.teacher_builders)


def static_teacher(cfg: Config, builder: PromptBuilder, view: DatasetView):
    """The teacher's messages per problem when the teacher context does not read the samples
    (built once, lengths checked now); None per problem when it does, or when the scorer reads the
    student's own prompt, or when there is no teacher."""
    if not distills(cfg):
        return lambda problem: None
    ctx = context(cfg.teacher.context)
    if ctx.uses_samples:
        return lambda problem: None
    templates, seed = builder.templates(), cfg.train.seed
    return lambda problem: ctx.build(cfg, ContextInput(problem, other=view.other(problem.uid), seed=seed),
                                     templates)[PRIMARY]


def teacher_builders(cfg: Config, builder: PromptBuilder, tokenizers: dict[str, Any]) -> dict[str, PromptBuilder]:
    """name -> the builder that renders its teacher prompts: its own tokenizer's chat template, or
    the student's builder (the student's weights as a teacher, or a tokenizer not checked here)."""
    return {name: PromptBuilder(tokenizers[name], cfg.prompt, max_model_len=cfg.model.max_model_len,
                                max_new_tokens=cfg.rollout.max_tokens) if name in tokenizers else builder
            for name in cfg.teachers}


def build_pairs(cfg: Config, problems: list[Problem], builder: PromptBuilder, view: Any,
                builders: dict[str, PromptBuilder], source: str) -> tuple[list[PromptPair], list[str]]:
    """The prompt pairs of rows routed to several teachers, in the rows' order: each row's teacher
    prompt built with its teacher's context and template (and checked against its limits), and
    each pair naming its teacher; with the uids dropped as over-long."""
    default = default_teacher(cfg)
    by_teacher: dict[str, list[Problem]] = {name: [] for name in cfg.teachers}
    for p in problems:
        by_teacher[p.teacher or default].append(p)
    built: dict[str, PromptPair] = {}
    skipped: set[str] = set()
    for name, group in by_teacher.items():
        one = teacher_config(cfg, name)
        pairs, dropped = builder.build(group, source=source, teacher=static_teacher(one, builder, view),
                                       teacher_builder=builders[name])
        built.update({pair.uid: replace(pair, teacher=name) for pair in pairs})
        skipped.update(dropped)
    return ([built[p.uid] for p in problems if p.uid in built],
            [p.uid for p in problems if p.uid in skipped])
