"""Problems from disk (math, and code graded by its tests), and the deterministic order in which
training visits them.

`load_problems` reads JSON Lines, Parquet, a directory written by `datasets.save_to_disk`, or a
dataset in the hub's layout (a hub id such as ``openai/gsm8k``, fetched where the run has a hub,
or a local directory laid out as one), checks every row up front and names file, row and key in
any error. Answers are read as each dataset writes them (:func:`solution_and_answer`); a row with
``"task": "code"`` is graded by its tests instead (:func:`code_tests`). `EpochSampler` turns
(seed, epoch) into a permutation, so the data position in a checkpoint is three integers and a
resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opsd.verify import extract_boxed

__all__ = ["DataError", "EpochSampler", "Problem", "load_problems"]

FORMATS = (
    "a .jsonl file (one JSON object per line), a .parquet file, a directory saved with datasets' save_to_disk, "
    "or a hub dataset (an id such as openai/gsm8k, or a local directory in the hub's layout; its config in "
    "data.dataset_config); pick a split with 'PATH::SPLIT' (default 'train')"
)
# A hub dataset id: "org/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
ANSWER_FORMATS = ("auto", "boxed", "gsm8k")
_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)
_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(text: str) -> tuple[str, str, int] | None:
    """GSM8K's way of writing a solution: working lines with calculator annotations (``<<4*2=8>>``),
    then ``#### N``. Returns the working without the annotations and with "The answer is \\boxed{N}."
    as its last line (what a teacher reads), N, and the number of working lines; None when
    ``text`` is not written that way."""
    found = _GSM8K_FINAL.search(text)
    if found is None or text[found.end():].strip():
        return None
    answer = found.group(1).strip()
    steps = [_ANNOTATION.sub("", line).strip() for line in text[:found.start()].splitlines() if line.strip()]
    return "\n".join(steps + [f"The answer is \\boxed{{{answer}}}."]), answer, len(steps)


def solution_and_answer(solution: str, answer_format: str = "auto") -> tuple[str, str | None]:
    """A solution as a teacher should read it, and the answer it gives: ``gsm8k`` (``#### N``, see
    :func:`gsm8k_solution`), ``boxed`` (the last \\boxed{}), ``auto`` (GSM8K's form when the
    solution ends with it, else boxed)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer format {answer_format!r}; expected one of {ANSWER_FORMATS}")
    if answer_format in ("auto", "gsm8k"):
        parsed = gsm8k_solution(solution)
        if parsed is not None:
            return parsed[0], parsed[1]
        if answer_format == "gsm8k":
            return solution, None
    return solution, extract_boxed(solution)


class DataError(ValueError):
    """A data file that cannot be used as given; the message names file, row and key."""


TASKS = ("math", "code")  # a row's task kind: what it must hold, how it is prompted and graded
CODE_VERIFIER = "code"  # opsd.evaluation.CODE: the row's answer is a test spec, run in the sandbox
PROCEDURAL_PREFIX = "reasoning_gym"  # a procedural task's verifier: parse_verifier


@dataclass(frozen=True)
class Problem:
    uid: str  # stable row id: "<source>:<row index from 0>" or the configured id column
    problem: str
    solution: str  # "" when loaded with require_solution=False and the row has none (code: the reference code)
    answer: str | None  # None when loaded with require_answer=False and the row has none (code: its tests)
    verifier: str | None = None  # a procedural task's own grader of this row (opsd/assets/procedural.py), or "code"
    task: str = "math"  # one of TASKS
    teacher: str | None = None  # its teacher among several (the route column); None: the default one


def parse_verifier(verifier: str) -> tuple[str, int, int, int]:
    """A procedural task's verifier, ``reasoning_gym:<task>:<seed>:<size>:<index>``
    (opsd/assets/procedural.py), -> (task, seed, size, index): its form alone (whether
    reasoning-gym has the task is known only once its dataset is made). DataError otherwise."""
    try:
        prefix, task, seed, size, index = verifier.split(":")
        seed, size, index = int(seed), int(size), int(index)
        if prefix != PROCEDURAL_PREFIX or not task or size < 1 or not 0 <= index < size:
            raise ValueError(verifier)
    except (ValueError, AttributeError):
        raise DataError(f"verifier {verifier!r}: expected {PROCEDURAL_PREFIX}:<task>:<seed>:<size>:<index>, "
                        "0 <= index < size") from None
    return task, seed, size, index


def row_verifier(row: dict, at: str, task: str = "math") -> str | None:
    """A row's verifier, checked in form here so that a bad one names its row before training,
    not at its first reward in a rollout worker: a math row's is absent or a procedural task's
    (:func:`parse_verifier`); a code row is graded by its tests, so its is absent or "code"."""
    verifier = row.get("verifier")
    if verifier is None:
        return None
    if task == "code":
        if verifier != CODE_VERIFIER:
            raise DataError(f"{at}: key 'verifier' = {verifier!r}: a code row is graded by its tests "
                            f"(absent, or {CODE_VERIFIER!r}); a procedural task's verifier belongs on a math row")
        return verifier
    try:
        parse_verifier(verifier)
    except DataError as exc:
        hint = ' (a code row says "task": "code")' if verifier == CODE_VERIFIER else ""
        raise DataError(f"{at}: key 'verifier': {exc}{hint}") from None
    return verifier


def code_tests(row: dict, at: str) -> str:
    """A code row's tests as the sandbox takes them (opsd.sandbox.TestSpec, as JSON): ``tests`` is a
    list of assert statements (MBPP's ``test_list``; ``test_setup`` runs first) or one test program
    (HumanEval's, which defines ``check(candidate)``: it is called on ``entry_point``)."""
    from opsd.sandbox import TestSpec  # standard library only; nothing here runs the tests

    tests, entry, setup = row.get("tests"), row.get("entry_point"), row.get("test_setup") or ""
    if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
        raise DataError(f"{at}: key 'entry_point' must be a function name, got {entry!r}")
    if not isinstance(setup, str):
        raise DataError(f"{at}: key 'test_setup' must be a string of code, got {type(setup).__name__}")
    if isinstance(tests, list) and tests and all(isinstance(t, str) and t.strip() for t in tests):
        return TestSpec(asserts=tuple(tests), setup=setup, entry_point=entry).to_json()
    if isinstance(tests, str) and tests.strip():
        return TestSpec(program=tests, setup=setup, entry_point=entry).to_json()
    state = "is missing" if "tests" not in row else f"is {tests!r:.80}"
    raise DataError(f"{at}: key 'tests' {state}; a code row (task 'code') needs a non-empty list of assert "
                    "statements or a test program (a string)")


def load_problems(
    path: str | Path, *,
    problem_key: str = "problem", solution_key: str = "solution", answer_key: str = "answer",
    id_key: str | None = None,
    require_solution: bool = True,
    require_answer: bool = True,
    needed_by: dict[str, str] | None = None,
    dataset_config: str | None = None,
    answer_format: str = "auto",
    route_key: str | None = None, routes: tuple[str, ...] = (),
) -> list[Problem]:
    """Read and validate every row of a problem set.

    `path` is a .jsonl or .parquet file, or a `save_to_disk` directory; `DIR::SPLIT` chooses a
    split of a saved DatasetDict, which otherwise must have a "train" split; a hub dataset (an id, or
    a directory in the hub's layout) is read with ``datasets.load_dataset`` and its
    ``dataset_config``. A solution is read in ``answer_format`` (:func:`solution_and_answer`); when a
    row has no answer (key absent or null), the answer is the one its solution gives.

    Ids come from the `id_key` column when the file has one (then every row needs one, and no
    two may be equal); when no row has that key, or `id_key` is None, a row's id is
    "<file stem>:<row index from 0>", the same on every run and resume of the same file.

    A row without a solution (or without an answer) is an error only when ``require_solution``
    (``require_answer``) says so; ``needed_by`` names who needs each (``{"solution":
    "teacher.context=solution"}``), for the error. Answers are graded against, so a set has them
    for every row or for none: one row without an answer among rows with one is an error anyway.
    A row's ``route_key`` value, if not null, is one of ``routes`` (its teacher, opsd/teachers.py).
    """
    rows, source, where = _read_rows(path, dataset_config)
    if id_key is not None and not any(isinstance(row, dict) and id_key in row for _, row in rows):
        id_key = None  # no id column: ids from the file and row
    problems: list[Problem] = []
    first_row_of_uid: dict[str, int] = {}
    unanswered: list[str] = []  # where the rows without an answer are
    for index, (row_no, row) in enumerate(rows):
        at = f"{path}, {where} {row_no}"
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(row).__name__}")
        problem = _text(row, problem_key, at)
        why = {k: f" ({v} needs it)" for k, v in (needed_by or {}).items()}
        uid = f"{source}:{index}" if id_key is None else _row_id(row, id_key, at)
        if uid in first_row_of_uid:
            raise DataError(f"{at}: id {uid!r} (key {id_key!r}) repeats {where} {first_row_of_uid[uid]}")
        first_row_of_uid[uid] = row_no
        teacher = _route(row, route_key, routes, at) if route_key else None
        if row_task(row, at) == "code":  # graded by its tests, not by an answer
            row_verifier(row, at, "code")
            solution = _text(row, solution_key, at, why.get("solution", "")) if (
                require_solution or not _is_blank(row.get(solution_key))) else ""
            problems.append(Problem(uid, problem, solution, code_tests(row, at), CODE_VERIFIER, "code", teacher))
            continue
        if require_solution or not _is_blank(row.get(solution_key)):
            solution, given = solution_and_answer(_text(row, solution_key, at, why.get("solution", "")), answer_format)
        else:
            solution, given = "", None
        answer = None if row.get(answer_key) is None else _text(row, answer_key, at)
        if answer is not None and answer_format != "boxed" and (written := gsm8k_solution(answer)) is not None:
            answer = written[1]  # an answer column in GSM8K's form (openai/gsm8k's "answer" is its solution)
        if answer is None:
            answer = given
            if (answer is None or not answer.strip()) and require_answer:
                raise DataError(
                    f"{at}: no answer: key {answer_key!r} is absent and the "
                    f"{solution_key!r} field has no \\boxed{{...}} to take it from{why.get('answer', '')}"
                )
        answer = answer.strip() if answer is not None and answer.strip() else None
        if answer is None:
            unanswered.append(at)
        verifier = row_verifier(row, at)
        problems.append(Problem(uid=uid, problem=problem, solution=solution, answer=answer, verifier=verifier,
                                teacher=teacher))
    if not problems:
        raise DataError(f"{path}: no rows")
    if unanswered and len(unanswered) < len(problems):
        raise DataError(
            f"{unanswered[0]}: no answer: key {answer_key!r} is absent and the {solution_key!r} field has no "
            f"\\boxed{{...}} to take it from, while other rows have one (a set has answers for every row or for none)"
        )
    return problems


def _route(row: dict, key: str, routes: tuple[str, ...], at: str) -> str | None:
    """The teacher a row names in its route column (None: absent or null, the default teacher)."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value not in routes:
        raise DataError(f"{at}: key {key!r} = {value!r} names no teacher; the teachers are {list(routes)} (teachers:; "
                        "the column is teacher.route, and a row without it goes to teacher.default)")
    return value


def row_task(row: dict, at: str) -> str:
    """A row's task kind (absent: math), checked: the loader and `opsd grade` refuse an unknown one alike."""
    task = row.get("task", "math")
    if task not in TASKS:
        raise DataError(f"{at}: key 'task' = {task!r}; expected one of {list(TASKS)}")
    return task


def _read_rows(path: str | Path, dataset_config: str | None = None) -> tuple[list[tuple[int, Any]], str, str]:
    """(row number, row) of every row of a problem set, its source name for ids, and what a row is
    called in errors ("line" or "row")."""
    path_str = str(path)
    split = None
    if "::" in path_str:
        path_str, split = path_str.rsplit("::", 1)
    file = Path(path_str)
    if not file.exists() and HUB_ID.match(path_str):
        return _read_hub(path_str, dataset_config, split), f"{path_str.replace('/', '_')}/{split or 'train'}", "row"
    if not file.exists():
        raise FileNotFoundError(f"problem set {path_str!r} does not exist; expected {FORMATS}")
    if file.is_dir() and not _saved_to_disk(file):
        return _read_hub(str(file), dataset_config, split), f"{file.name}/{split or 'train'}", "row"
    if split is not None and not file.is_dir():
        raise DataError(
            f"{path}: '::{split}' selects a split, which only a saved dataset directory has"
        )

    if file.is_dir():
        rows, source = _read_saved_dataset(file, split)
        where = "row"
    elif file.suffix == ".jsonl":
        rows, source = _read_jsonl(file), file.stem
        where = "line"
    elif file.suffix == ".parquet":
        rows, source = _read_parquet(file), file.stem
        where = "row"
    else:
        raise DataError(f"{file}: unknown format {file.suffix!r}; expected {FORMATS}")
    return rows, source, where


def _text(row: dict, key: str, at: str, why: str = "") -> str:
    value = row.get(key)
    if value is None:
        state = "is null" if key in row else "is missing"
        keys = ", ".join(repr(k) for k in row)
        raise DataError(f"{at}: key {key!r} {state}{why} (row has {keys})")
    if not isinstance(value, str):
        got = f"{type(value).__name__} {value!r:.80}"
        raise DataError(f"{at}: key {key!r} must be a string, got {got}")
    if not value.strip():
        raise DataError(f"{at}: key {key!r} is empty")
    return value


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _row_id(row: dict, key: str, at: str) -> str:
    value = row.get(key)
    # bool is an int subclass, and True as an id is a mistake, not a number.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(row, key, at)


def _read_jsonl(file: Path) -> list[tuple[int, Any]]:
    # Bytes first, decoded line by line, so a bad byte is reported with its line number.
    rows = []
    for line_no, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{file}, line {line_no}: not UTF-8 "
                f"(byte {raw[e.start]:#04x} at column {e.start + 1})"
            ) from None
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{file}, line {line_no}: invalid JSON: {e.msg} at column {e.colno}"
            ) from None
    return rows


def _read_parquet(file: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for "this is not parquet"
        raise DataError(f"{file}: cannot read as Parquet: {e}") from e
    return list(enumerate(table.to_pylist(), start=1))


def _saved_to_disk(directory: Path) -> bool:
    """Whether ``directory`` was written by datasets' save_to_disk (else: a hub-layout directory)."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _read_hub(name: str, config: str | None, split: str | None) -> list[tuple[int, Any]]:
    """A hub dataset, or a local directory in the hub's layout (files per config and split, a
    README naming them): datasets.load_dataset."""
    import datasets  # deferred: slow to import and only needed for this format

    try:
        loaded = datasets.load_dataset(name, config, split=split or "train")
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # datasets' ways of saying no such set/config/split
        raise DataError(f"{name}{f' (config {config!r})' if config else ''}, split {split or 'train'!r}: cannot load "
                        f"it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); expected {FORMATS}") from e
    return list(enumerate(loaded.to_list(), start=1))


def _read_saved_dataset(directory: Path, split: str | None) -> tuple[list[tuple[int, Any]], str]:
    import datasets  # deferred: slow to import and only needed for this format

    try:
        loaded = datasets.load_from_disk(str(directory))
    except FileNotFoundError as e:
        raise DataError(
            f"{directory}: not a saved dataset directory ({e}); expected {FORMATS}"
        ) from e
    source = directory.name
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(
                f"{directory}: no split {split!r}; it has {sorted(loaded)} "
                "(choose one with 'DIR::SPLIT')"
            )
        loaded = loaded[split]
        # Row indices restart in every split, so the split is part of the id.
        source = f"{source}/{split}"
    elif split is not None:
        raise DataError(f"{directory}: '::{split}' given, but this directory holds a single split")
    return list(enumerate(loaded.to_list(), start=1)), source


class EpochSampler:
    """Endless stream of row indices, reshuffled every epoch.

    The permutation of epoch e is a pure function of (seed, e), so every process and every
    restart agrees on it, and `state_dict()` (seed, epoch, position) is all a checkpoint needs.
    It comes from NumPy's seeded Generator, whose streams NumPy keeps stable in practice but does
    not promise across releases: resume a run with the NumPy it started with.
    With `drop_last=False` a batch that reaches the end of an epoch continues into the next
    epoch's permutation; with `drop_last=True` the short tail of the epoch is skipped instead,
    so no batch spans two epochs.
    """

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True, drop_last: bool = False):
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # next index into this epoch's permutation; always < num_items
        self._order = self.epoch_indices(0)

    def epoch_indices(self, epoch: int) -> list[int]:
        """Every index once, in epoch `epoch`'s order."""
        if not self.shuffle:
            return list(range(self.num_items))
        # SeedSequence hashes the pair, so neighbouring seeds or epochs give unrelated streams.
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_items).tolist()

    def next_batch(self, batch_size: int) -> list[int]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if self.drop_last:
            if batch_size > self.num_items:
                raise ValueError(
                    f"batch_size {batch_size} exceeds the {self.num_items} items of an epoch, "
                    "so with drop_last=True no batch could ever be drawn"
                )
            if self.position + batch_size > self.num_items:
                self._start_epoch(self.epoch + 1)
        batch: list[int] = []
        while len(batch) < batch_size:
            take = min(batch_size - len(batch), self.num_items - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
            if self.position == self.num_items:
                self._start_epoch(self.epoch + 1)
        return batch

    def state_dict(self) -> dict:
        return {
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; resuming would visit different rows"
                )
        position = int(state["position"])
        if not 0 <= position < self.num_items:
            raise ValueError(f"sampler state position {position} is outside [0, {self.num_items})")
        self._start_epoch(int(state["epoch"]))
        self.position = position

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = self.epoch_indices(epoch)
