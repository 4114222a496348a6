"""Whether another model can teach this student: the same tokenizer.

The student's sampled token ids go to the teacher unchanged (opsd/prompts.py: never decoded and
encoded again), so both models must read an id as the same token: the same vocabulary (its size
and its token -> id map) and the same special tokens (eos, pad, bos, and the ids generation stops
on, generation_config.json's eos_token_id). The teacher's model may also not have more embedding
rows than the student's (config.json vocab_size), or its top-k could name ids the student has no
logit for. Its chat template may differ: teacher prompts are built with the teacher's own.

:func:`compare` gives one of three answers: ok, refused (naming what differs, both vocabularies'
sizes when they differ), or unchecked ("cannot check without fetching": a hub id whose files are
not on this machine; never ok). ``opsd validate`` asks it from local files only; the driver asks
the same function at train start, where the run fetches what it loads anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OK, REFUSED, UNCHECKED = "ok", "refused", "unchecked"

SPECIAL = ("eos", "pad", "bos")


@dataclass(frozen=True)
class Answer:
    verdict: str  # ok | refused | unchecked
    line: str  # what validate prints; for refused, the error


@dataclass(frozen=True)
class TokenizerFacts:
    """What must agree between a student and its teacher, read from one model's files."""

    where: str  # the model reference, for messages
    size: int  # len(tokenizer): the ids it can produce, added tokens included
    vocab: dict[str, int]  # token -> id
    special: dict[str, tuple[str | None, int | None]]  # eos | pad | bos -> (token, id)
    stop_ids: frozenset[int] | None  # generation_config.json's eos_token_id; None: no such file
    rows: int | None  # config.json vocab_size (the embedding rows); None: not readable


class NotLocal(Exception):
    """A model's files are not on this machine and fetching them was not allowed."""


class Unreadable(Exception):
    """A local model directory whose tokenizer transformers cannot load."""


def tokenizer_facts(tokenizer: Any, where: str, *, stop_ids: Any = None, rows: int | None = None) -> TokenizerFacts:
    special = {name: (getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None))
               for name in SPECIAL}
    if stop_ids is not None:
        stop_ids = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids)
    return TokenizerFacts(where, len(tokenizer), dict(tokenizer.get_vocab()), special, stop_ids, rows)


def read_facts(path: str, *, local_only: bool, trust_remote_code: bool = False) -> TokenizerFacts:
    """The facts of the model at ``path`` (a directory or a hub id). With ``local_only`` nothing is
    fetched: a hub id whose tokenizer is not in the local cache raises :class:`NotLocal`."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers fails in many ways on files it cannot find or read
        if Path(path).is_dir():
            raise Unreadable(f"{path}: transformers cannot load its tokenizer ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if local_only and isinstance(exc, OSError):  # what it raises for a hub id it may not fetch
            raise NotLocal(f"{path} is not in the local hub cache") from exc
        raise
    try:
        stop = GenerationConfig.from_pretrained(path, local_files_only=local_only).eos_token_id
    except OSError:
        stop = None  # no generation_config.json: vLLM then stops on the tokenizer's eos alone
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, trust_remote_code=trust_remote_code)
        rows = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    except (OSError, ValueError):  # a tokenizer-only directory
        rows = None
    return tokenizer_facts(tok, path, stop_ids=stop, rows=rows)


def differences(student: TokenizerFacts, teacher: TokenizerFacts) -> list[str]:
    """What differs, each as a phrase naming both sides' values; empty when the teacher fits."""
    if student.size != teacher.size:
        # Another vocabulary: the id-by-id comparison below would only list its consequences.
        return [f"another vocabulary: the teacher's has {teacher.size:,} tokens, the student's {student.size:,}"]
    found = []
    moved = sorted(tok for tok, i in student.vocab.items() if teacher.vocab.get(tok) != i)
    if moved:
        first = moved[0]
        found.append(f"the same number of tokens ({student.size:,}) but another token -> id map ({len(moved):,} "
                     f"tokens differ; {first!r} is id {student.vocab[first]} for the student, "
                     f"{teacher.vocab.get(first, 'absent')} for the teacher)")
    for name in SPECIAL:
        if student.special[name] != teacher.special[name]:
            found.append(f"the {name} token: the student's {_special(student.special[name])}, the teacher's "
                         f"{_special(teacher.special[name])}")
    if student.stop_ids is not None and teacher.stop_ids is not None and student.stop_ids != teacher.stop_ids:
        found.append(f"the stop ids (generation_config.json eos_token_id): the student's {sorted(student.stop_ids)}, "
                     f"the teacher's {sorted(teacher.stop_ids)}")
    if student.rows is not None and teacher.rows is not None and teacher.rows > student.rows:
        found.append(f"the teacher's model has {teacher.rows:,} embedding rows (config.json vocab_size), more than the "
                     f"student's {student.rows:,}: its top-k could name ids the student has no logit for")
    return found


def _special(value: tuple[str | None, int | None]) -> str:
    token, i = value
    return "none" if token is None and i is None else f"{token!r} (id {i})"


def compare(student: str, teacher: str, *, local_only: bool, trust_remote_code: bool = False,
            key: str = "teacher.model") -> Answer:
    """Whether the model at ``teacher`` has the tokenizer of the model at ``student`` (directories
    or hub ids); ``key`` is the config key that names the teacher, for the messages."""
    try:
        s = read_facts(student, local_only=local_only, trust_remote_code=trust_remote_code)
        t = read_facts(teacher, local_only=local_only, trust_remote_code=trust_remote_code)
    except NotLocal as exc:
        return Answer(UNCHECKED, f"cannot check without fetching: the teacher's tokenizer against the student's "
                                 f"({exc}; opsd train checks it at start, once it has fetched both)")
    except Unreadable as exc:
        return Answer(REFUSED, f"config key '{key}' = {teacher!r}: cannot compare the teacher's tokenizer with the "
                               f"student's ({exc}); each model directory needs its tokenizer files")
    found = differences(s, t)
    if found:
        return Answer(REFUSED, (
            f"config key '{key}' = {teacher!r} has another tokenizer than the student ({student}): "
            f"{'; '.join(found)}. The teacher reads the student's response ids unchanged, which needs the "
            "same tokenizer; choose a teacher of the student's tokenizer family"))
    return Answer(OK, f"the student's tokenizer ({s.size:,} tokens, eos {_special(s.special['eos'])}"
                      f"{', stop ids ' + str(sorted(s.stop_ids)) if s.stop_ids is not None else ''})")
