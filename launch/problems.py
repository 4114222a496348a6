"""A run's problems as prompts: the training set (prompt pairs, the sampler that visits them, the
reference solutions) and the held-out set, checked before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsd.config import Config, ConfigError, resolve_path
from opsd.data import DataError, EpochSampler, load_problems
from opsd.prompts import PromptBuilder, PromptPair


@dataclass
class TrainingSet:
    pairs: list[PromptPair]  # the usable training problems, as student and teacher prompt ids
    solutions: dict[str, str]  # uid -> reference solution (SFT and KD from references train on it)
    sampler: EpochSampler  # the order the run visits pairs in; its state is in every checkpoint
    eval_pairs: list[PromptPair] = field(default_factory=list)  # held-out problems (eval.every > 0)
    skipped: list[str] = field(default_factory=list)  # uids left out as over-long (prompt.overlong=skip)

    def __post_init__(self) -> None:
        self.initial_sampler = self.sampler.state_dict()  # where a learner lost before any checkpoint restarts


def columns(cfg: Config) -> dict:
    d = cfg.data
    return dict(problem_key=d.problem_key, solution_key=d.solution_key, answer_key=d.answer_key, id_key=d.id_key)


def load_training_set(cfg: Config, tokenizer: Any) -> TrainingSet:
    """Every training row read, checked and turned into prompt ids; the held-out rows too when the
    run evaluates. Raises a DataError or ConfigError naming the file, row or key."""
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.rollout.max_tokens)
    train_path = resolve_path(cfg.data.train_path)
    problems = load_problems(train_path, **columns(cfg))
    if cfg.data.max_rows:
        problems = problems[: cfg.data.max_rows]
    pairs, skipped = builder.build(problems, source=str(train_path))
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
    return TrainingSet(pairs, {p.uid: p.solution for p in problems}, sampler, _eval_pairs(cfg, tokenizer), skipped)


def _eval_pairs(cfg: Config, tokenizer: Any) -> list[PromptPair]:
    if not cfg.eval.every:
        return []
    eval_path = resolve_path(cfg.eval.path or cfg.data.test_path)
    problems = load_problems(eval_path, **columns(cfg))[: cfg.eval.max_problems]
    # Evaluation answers get eval.max_tokens, so its prompts get the rest of the context.
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.eval.max_tokens)
    return builder.build(problems, source=str(eval_path))[0]
