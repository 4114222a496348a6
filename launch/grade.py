"""``opsd grade FILE.jsonl``: grade responses someone already has, one JSON verdict per row.

A row is ``{"id": ..., "task": "code", "tests": [...] or a test program, "entry_point": ...,
"response": ...}`` (``test_setup`` optional: code run before the asserts) or ``{"id": ...,
"answer": ..., "response": ...}`` for math (``"task": "math"``, the default). Code runs in the
sandbox (opsd/sandbox.py), whose isolation is said first on stderr; math answers are compared by
math-verify (opsd/verify.py), or, where the row carries a procedural task's ``verifier`` (the
``reasoning_gym:<task>:<seed>:<size>:<index>`` of the rows ``data.train_path: reasoning_gym:...``
loads, opsd/assets/procedural.py), graded by that task's own verifier, as training grades them:
its grade may be partial, and only a full grade passes. Printed on stdout: one line per row,
``{"id", "line", "task", "passed", "verdict", "score", "detail"}`` (``score``: the reward training
would give, 1.0 or 0.0 except for a procedural task's partial grade), in the file's order, then
``{"summary": ...}``. A row that cannot be graded is an error on stderr naming its line; the
others are graded all the same, and the exit status is then 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from opsd.assets.procedural import TaskError
from opsd.data import DataError, code_tests, row_task, row_verifier
from opsd.evaluation import reward, run_code
from opsd.verify import EXTRACTORS, extract_answer

__all__ = ["grade_file", "main_grade"]


def _row(line_no: int, raw: str, path: str) -> dict:
    """One line's row, checked: what it must hold depends on its task."""
    at = f"{path}, line {line_no}"
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{at}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected a JSON object, got {type(row).__name__}")
    task = row_task(row, at)
    response = row.get("response")
    if not isinstance(response, str):
        raise DataError(f"{at}: key 'response' {'is missing' if 'response' not in row else 'must be a string'}")
    verifier = row_verifier(row, at, task)  # checked in form for either task
    if task == "code":
        gold, verifier = code_tests(row, at), None  # graded by its tests, in the sandbox
    elif verifier is not None:
        gold = verifier  # the task's own verifier regenerates the entry and its answer
    else:
        gold = row.get("answer")
        if not isinstance(gold, (str, int, float)) or isinstance(gold, bool) or not str(gold).strip():
            raise DataError(f"{at}: key 'answer' {'is missing' if 'answer' not in row else 'must be a string or a number'}"
                            " (a math row is graded against it; a code row needs \"task\": \"code\")")
        gold = str(gold)
    return {"id": row.get("id", line_no), "line": line_no, "task": task, "gold": gold, "response": response,
            "verifier": verifier}


def grade_file(path: str, *, sandbox_settings: Any, extract: str = "strict", out: TextIO = sys.stdout,
               err: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict:
    """Grade every row of ``path``; print the verdicts and the summary to ``out``; return the summary."""
    rows, bad = [], 0
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(_row(line_no, raw, path))
        except DataError as exc:
            bad += 1
            err(f"opsd grade: {exc}")
    verdicts: dict[int, dict] = {}
    code = [r for r in rows if r["task"] == "code"]
    isolation = None
    if code:
        from opsd.sandbox import shared

        # Said here on every call, not by shared() on the process's first use only.
        box = shared(sandbox_settings, log=lambda line: None)
        isolation = box.isolation.level
        err(f"opsd grade: model-written code runs in a sandbox, isolation {box.isolation.describe()} "
            f"(required: sandbox.isolation={sandbox_settings.isolation}; {box.workers} at a time)")
        for r, v in zip(code, run_code([r["response"] for r in code], [r["gold"] for r in code], box)):
            verdicts[r["line"]] = {"passed": v.passed, "verdict": v.verdict, "score": float(v.passed),
                                   "detail": v.detail}
    for r in [r for r in rows if r["task"] == "math"]:
        try:  # as training grades it: math-verify, or a procedural task's own (maybe partial) grade
            score = reward(r["response"], r["gold"], extract, r["verifier"])
        except TaskError as exc:
            bad += 1
            err(f"opsd grade: {path}, line {r['line']}: {exc}")
            continue
        answer = extract_answer(r["response"], extract)
        wrong = ("no answer found" if answer is None else f"answer {answer!r}, " + (
            f"the task's verifier gave {score:g}" if r["verifier"] else f"expected {r['gold']!r}"))
        verdicts[r["line"]] = {"passed": score == 1.0, "verdict": "passed" if score == 1.0 else "failed",
                               "score": score, "detail": "" if score == 1.0 else wrong}
    rows = [r for r in rows if r["line"] in verdicts]
    counts: dict[str, int] = {}
    for r in rows:
        v = verdicts[r["line"]]
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
        print(json.dumps({"id": r["id"], "line": r["line"], "task": r["task"], **v}), file=out)
    passed = counts.get("passed", 0)
    summary = {"rows": len(rows) + bad, "graded": len(rows), "bad_rows": bad, "passed": passed,
               "pass_rate": passed / len(rows) if rows else 0.0, "verdicts": counts, "isolation": isolation}
    print(json.dumps({"summary": summary}), file=out)
    return summary


def main_grade(args: Any) -> int:
    """The body of ``opsd grade`` (launch/cli.py parses the arguments)."""
    from opsd.config import load_config

    cfg = load_config(None, list(args.overrides))  # sandbox.* and grading.extract from key=value
    extract = cfg.grading.extract if cfg.grading.extract in EXTRACTORS else "strict"
    if not Path(args.file).is_file():
        print(f"opsd grade: {args.file}: no such file", file=sys.stderr)
        return 2
    summary = grade_file(args.file, sandbox_settings=cfg.sandbox, extract=extract)
    return 1 if summary["bad_rows"] else 0
