"""A run's problems as prompts: the training set (prompt pairs, the sampler that visits them, the
problems themselves for the teacher contexts built per step) and the held-out set, checked
before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsd.config import Config, ConfigError, distills, resolve_path, training_rows
from opsd.contexts import context
from opsd.contexts.base import PRIMARY, ContextInput, DatasetView
from opsd.assets.datasets import resolve_data
from opsd.data import DataError, EpochSampler, Problem, load_problems
from opsd.prompts import PromptBuilder, PromptPair


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

    def __post_init__(self) -> None:
        self.initial_sampler = self.sampler.state_dict()  # where a learner lost before any checkpoint restarts
        self.teacher_builder = self.teacher_builder or self.builder

    @property
    def solutions(self) -> dict[str, str]:
        return {uid: p.solution for uid, p in self.problems.items()}


def read_problems(cfg: Config, path: str, **requirements) -> list[Problem]:
    """The problem set a config names: a named dataset (made on first use, opsd/assets/datasets.py),
    a file or directory (relative to the working directory, else the repository), or a hub id;
    ``PATH::SPLIT`` picks a split. Read with the config's column names, dataset config and answer
    format; ``requirements`` as load_problems takes them."""
    d = cfg.data
    file, sep, split = resolve_data(path).partition("::")
    return load_problems(f"{resolve_path(file)}{sep}{split}", problem_key=d.problem_key, solution_key=d.solution_key,
                         answer_key=d.answer_key, id_key=d.id_key, dataset_config=d.dataset_config,
                         answer_format=d.answer_format, **requirements)


def load_training_set(cfg: Config, tokenizer: Any, teacher_tokenizer: Any = None) -> TrainingSet:
    """Every training row read, checked and turned into prompt ids; the held-out rows too when the
    run evaluates. A row must hold a solution or an answer only when the objective or the teacher
    context needs it. ``teacher_tokenizer``: another model's (teacher.model), whose chat template
    renders the teacher's prompts, checked against the same limits. Raises a DataError or
    ConfigError naming the file, row or key."""
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.rollout.max_tokens)
    teacher_builder = builder if teacher_tokenizer is None else PromptBuilder(
        teacher_tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=cfg.rollout.max_tokens)
    train_path = cfg.data.train_path
    problems = read_problems(cfg, train_path, **training_rows(cfg))
    if cfg.data.max_rows:
        problems = problems[: cfg.data.max_rows]
    view = DatasetView(problems, cfg.train.seed)
    pairs, skipped = builder.build(problems, source=str(train_path), teacher=static_teacher(cfg, builder, view),
                                   teacher_builder=teacher_builder)
    if not pairs:
        raise DataError(
            f"{train_path}: no usable problems (all {len(problems)} skipped as over-long); raise "
            "model.max_model_len or prompt.max_prompt_len"
        )
    # drop_last: a batch never spans two epochs, so no prompt appears twice in one batch (its
    # samples would share a sample_id and, for GRPO, a group).
    if len(pairs) < cfg.train.prompts_per_step:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} is more than the {len(pairs)} usable "
            f"problems in {train_path}"
        )
    sampler = EpochSampler(len(pairs), seed=cfg.train.seed, shuffle=cfg.data.shuffle, drop_last=True)
    return TrainingSet(pairs, {p.uid: p for p in problems}, sampler, view, builder, _eval_pairs(cfg, tokenizer),
                       skipped, teacher_builder)


def static_teacher(cfg: Config, builder: PromptBuilder, view: DatasetView):
    """The teacher's messages per problem when the teacher context does not read the samples
    (built once, lengths checked now); None per problem when it does, or when the scorer reads the
    student's own prompt, or when there is no teacher."""
    if not distills(cfg):
        return lambda problem: None
    ctx = context(cfg.teacher.context)
    if ctx.uses_samples:
        return lambda problem: None
    templates = builder.templates()
    return lambda problem: ctx.build(cfg, ContextInput(problem, other=view.other(problem.uid), seed=cfg.train.seed),
                                     templates)[PRIMARY]


def _eval_pairs(cfg: Config, tokenizer: Any) -> list[PromptPair]:
    if not cfg.eval.every:
        return []
    eval_path = cfg.eval.path or cfg.data.test_path
    # Graded by answer: a held-out set of bare problems and answers (a procedural task's) is fine.
    problems = read_problems(cfg, eval_path, require_solution=False)[: cfg.eval.max_problems]
    # Evaluation answers get eval.max_tokens, so its prompts get the rest of the context.
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.eval.max_tokens)
    # Built as ever (the teacher's prompt counts in the length check), so that a held-out set
    # keeps the same problems across versions of opsd.
    return builder.build(problems, source=str(eval_path))[0]
