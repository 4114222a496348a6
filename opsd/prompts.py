"""Student and teacher prompts as token ids, from the chat template.

The student's context holds the problem only; the teacher's also holds what the teacher context
(opsd/contexts/) gives it, by default the reference solution. A context that does not read the
student's samples is built once per problem here; one that does is built after each rollout
(launch/pipeline.py), through the same templates.
The response the student sampled is appended to either context as the very same ids: nothing
here decodes a response and encodes it again, which could change its tokenisation and put the
teacher's targets at the wrong positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from opsd.config import PromptConfig
from opsd.contexts.base import Templates
from opsd.data import Problem


class PromptTooLongError(ValueError):
    """A prompt does not leave room for the response within the model's context."""


@dataclass(frozen=True)
class PromptPair:
    uid: str
    student_ids: list[int]
    teacher_ids: list[int] | None  # None: the teacher's context is built per step from the samples
    answer: str | None  # None: the dataset has no answer (nothing is graded)
    verifier: str | None = None  # grades by a procedural task's own verifier instead of math-verify
    teacher: str | None = None  # which of several teachers scores it (opsd/teachers.py); None: the one


def _template_ids(tokenizer: Any, messages: list[dict], *, thinking: bool) -> list[int]:
    # Render to text and tokenise once: the return type of tokenize=True changed across
    # transformers releases, the text form did not.
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    # verbose=False: lengths are checked against the budget below, in the terms of the config.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class PromptBuilder:
    def __init__(self, tokenizer: Any, cfg: PromptConfig, *, max_model_len: int, max_new_tokens: int):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
                "opsd needs one to build student and teacher prompts"
            )
        self.tokenizer = tokenizer
        # A plain copy: every prompt reads several of its keys, and a key of an OmegaConf node
        # costs ~20 us to read (a quarter of the CPU time of building a large set's prompts).
        self.cfg: PromptConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        self.max_model_len = max_model_len
        self.max_new_tokens = max_new_tokens

    def instruction(self, task: str = "math") -> str:
        """What the student is asked besides the problem: a boxed answer, or for a code row one
        fenced Python block (prompt.code_instruction)."""
        return self.cfg.code_instruction if task == "code" else self.cfg.student_instruction

    def student_messages(self, problem: str, task: str = "math") -> list[dict]:
        return [{"role": "user", "content": f"{problem}\n{self.instruction(task)}".strip()}]

    def teacher_messages(self, problem: str, solution: str, task: str = "math") -> list[dict]:
        if self.cfg.teacher_system is not None:
            system = self.cfg.teacher_system.format(problem=problem, solution=solution)
            return [{"role": "system", "content": system}, *self.student_messages(problem, task)]
        content = self.cfg.teacher_template.format(
            problem=problem, solution=solution, instruction=self.instruction(task)
        )
        return [{"role": "user", "content": content}]

    def templates(self) -> Templates:
        return Templates(self.student_messages, self.teacher_messages)

    def student_ids(self, problem: str, task: str = "math") -> list[int]:
        return _template_ids(self.tokenizer, self.student_messages(problem, task), thinking=self.cfg.student_thinking)

    def teacher_ids(self, problem: str, solution: str, task: str = "math") -> list[int]:
        return self.teacher_context_ids(self.teacher_messages(problem, solution, task))

    def teacher_context_ids(self, messages: list[dict]) -> list[int]:
        """A teacher context's messages (opsd/contexts/) as token ids."""
        return _template_ids(self.tokenizer, messages, thinking=self.cfg.teacher_thinking)

    @property
    def prompt_limit(self) -> int:
        """The most tokens a prompt may have: prompt.max_prompt_len, and room for the response."""
        return min(self.cfg.max_prompt_len, self.max_model_len - self.max_new_tokens)

    def build(self, problems: Sequence[Problem], *, source: str = "",
              teacher: Callable[[Problem], list[dict] | None] | None = None,
              teacher_builder: PromptBuilder | None = None) -> tuple[list[PromptPair], list[str]]:
        """Prompts for each problem; returns (pairs, uids skipped as over-long).

        ``teacher(problem)`` gives the teacher's messages (None: no teacher prompt now); by default
        the reference solution in the configured template. ``teacher_builder`` renders them when the
        teacher is another model (teacher.model: its tokenizer and chat template, and its limits);
        by default this builder does. With ``prompt.overlong=error`` an over-long prompt raises
        :class:`PromptTooLongError` naming the row; with ``skip`` it is left out and its uid
        returned.
        """
        other = teacher_builder is not None and teacher_builder is not self
        teacher_builder = teacher_builder or self
        pairs: list[PromptPair] = []
        skipped: list[str] = []
        for p in problems:
            s_ids = self.student_ids(p.problem, p.task)
            messages = self.teacher_messages(p.problem, p.solution, p.task) if teacher is None else teacher(p)
            t_ids = None if messages is None else teacher_builder.teacher_context_ids(messages)
            over = [(who, len(ids), b)
                    for who, ids, b in (("student", s_ids, self), ("teacher", t_ids, teacher_builder))
                    if ids is not None and len(ids) > b.prompt_limit]
            if over:
                if self.cfg.overlong == "skip":
                    skipped.append(p.uid)
                    continue
                which, n, b = max(over, key=lambda o: (o[1] - o[2].prompt_limit, o[0] == "teacher"))
                whose = " (teacher.model's chat template)" if other and which == "teacher" else ""
                raise PromptTooLongError(
                    f"{source + ': ' if source else ''}row {p.uid}: the {which} prompt{whose} has {n} tokens, more "
                    f"than {b.prompt_limit} (prompt.max_prompt_len={b.cfg.max_prompt_len}, model.max_model_len="
                    f"{b.max_model_len} minus {b.max_new_tokens} new tokens). Raise those limits or set "
                    "prompt.overlong=skip to drop such rows (they are counted)."
                )
            pairs.append(PromptPair(p.uid, s_ids, t_ids, p.answer, p.verifier, p.teacher))
        return pairs, skipped


def response_loss_mask(num_tokens: int, *, skip_first: int = 0) -> list[bool]:
    """Every sampled token counts, EOS included, except the first ``skip_first``.

    The mask comes from the response length, never from comparing ids with the pad id: with a
    tokenizer whose pad equals EOS, an id test would drop the EOS the student must learn to emit.
    """
    return [i >= skip_first for i in range(num_tokens)]
