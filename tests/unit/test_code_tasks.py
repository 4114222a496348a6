"""Code rows (task "code"): what the loader requires of them, how they are prompted, how a response's
code is found and graded (opsd/data.py, opsd/prompts.py, opsd/verify.py, opsd/evaluation.py), and
`opsd grade` (launch/grade.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from opsd.data import DataError, load_problems
from opsd.evaluation import CODE, grade, rewards, summarize
from opsd.sandbox import Limits, Sandbox, TestSpec
from opsd.verify import extract_code
from tests.unit.test_sandbox_hostile import require_bwrap

ROW = {"id": "add", "task": "code", "problem": "Write add(a, b).", "solution": "```python\ndef add(a, b):\n    return a + b\n```",
       "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], "entry_point": "add"}
GOOD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
BAD = "```python\ndef add(a, b):\n    return a * b\n```"


@pytest.fixture(scope="module")
def box():
    require_bwrap()
    b = Sandbox(Limits(cpu_s=1), workers=2)
    yield b
    b.close()


def write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, code", [
    (GOOD, "def add(a, b):\n    return a + b\n"),
    ("```\nx = 1\n```\n```python\ny = 2\n```", "y = 2\n"),  # a python block before an unmarked one
    ("```py\nz = 3\n```", "z = 3\n"),
    ("no code here", None),
    ("```python\ndef add(a, b):\n    return a +", None),  # cut off: no closed block
    ("```python\n\n```", None),
])
def test_the_code_of_a_response_is_its_first_closed_python_block(text, code):
    assert extract_code(text) == code


def test_a_code_row_needs_tests_not_an_answer_and_carries_them_as_its_gold(tmp_path):
    [p] = load_problems(write(tmp_path, [ROW]), id_key="id")
    assert (p.task, p.verifier, p.uid) == ("code", CODE, "add") and p.solution == ROW["solution"]
    assert load_problems(write(tmp_path, [{**ROW, "verifier": CODE}]))[0].verifier == CODE  # the one it gives itself
    spec = TestSpec.from_json(p.answer)
    assert spec.asserts == tuple(ROW["tests"]) and spec.entry_point == "add"
    program = {**ROW, "tests": "def check(candidate):\n    assert candidate(1, 1) == 2\n"}
    assert TestSpec.from_json(load_problems(write(tmp_path, [program]))[0].answer).program.startswith("def check")
    # its solution (the reference code) only when the objective or the context needs it
    bare = {k: v for k, v in ROW.items() if k != "solution"}
    assert load_problems(write(tmp_path, [bare]), require_solution=False)[0].solution == ""
    with pytest.raises(DataError, match="line 1: key 'solution' is missing \\(teacher.context=solution needs it\\)"):
        load_problems(write(tmp_path, [bare]), needed_by={"solution": "teacher.context=solution"})


@pytest.mark.parametrize("change, message", [
    ({"tests": []}, "line 1: key 'tests' is \\[\\]"),
    ({"tests": None}, "key 'tests' is None"),
    ({"entry_point": "not a name"}, "key 'entry_point' must be a function name"),
    ({"task": "poetry"}, "key 'task' = 'poetry'; expected one of \\['math', 'code'\\]"),
    # as opsd grade refuses it: a procedural task's verifier on a code row would be silently unused
    ({"verifier": "reasoning_gym:basic_arithmetic:1:10:0"}, "line 1: key 'verifier' = 'reasoning_gym:basic_arithmetic"
     ":1:10:0': a code row is graded by its tests"),
])
def test_a_malformed_code_row_is_an_error_naming_line_and_key(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        load_problems(write(tmp_path, [{**ROW, **change}]))


def test_a_code_row_asks_for_one_fenced_python_block_and_the_teacher_reads_the_reference():
    from opsd.config import PromptConfig
    from opsd.data import Problem
    from opsd.prompts import PromptBuilder

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            return "\n".join(m["content"] for m in messages)

        def __call__(self, text, **kw):
            return {"input_ids": list(range(len(text.split())))}

    builder = PromptBuilder(Tok(), PromptConfig(), max_model_len=4096, max_new_tokens=16)
    student = builder.student_messages("Write add(a, b).", "code")[0]["content"]
    assert "fenced Python code block" in student and "boxed" not in student
    teacher = builder.teacher_messages("Write add(a, b).", ROW["solution"], "code")[0]["content"]
    assert ROW["solution"] in teacher and "fenced Python code block" in teacher
    assert "boxed" in builder.student_messages("1 + 1?")[0]["content"]  # math rows as before
    pair = builder.build([Problem("add", "Write add(a, b).", ROW["solution"], "{}", CODE, "code")])[0][0]
    assert pair.verifier == CODE


def test_rewards_and_grades_of_code_rows_come_from_the_sandbox(box):
    gold = TestSpec(asserts=tuple(ROW["tests"]), entry_point="add").to_json()
    assert rewards([GOOD, BAD, "no code", "\\boxed{2}"], [gold, gold, gold, "2"], "strict", [CODE, CODE, CODE, None],
                   box) == [1.0, 0.0, 0.0, 1.0]
    g = grade("add", [GOOD, BAD, "no code"], gold, "strict", CODE, box)
    assert g.correct == [True, False, False] and g.answers[2] is None
    m = summarize([g], [[GOOD, BAD, "no code"]])
    assert m["avg@3"] == pytest.approx(1 / 3) and m["pass@3"] == 1.0 and m["format_rate"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="needs a sandbox"):
        rewards([GOOD], [gold], "strict", [CODE], None)


def test_opsd_grade_prints_a_verdict_per_row_and_names_the_bad_lines(tmp_path):
    require_bwrap()
    from opsd.config import load_config
    from opsd.launch.grade import grade_file

    rows = [
        {**ROW, "id": "ok", "response": GOOD, "verifier": "code"},  # the verifier opsd gives code rows: allowed
        {**ROW, "id": "wrong", "response": BAD},
        {"id": "program", "task": "code", "entry_point": "add", "response": GOOD,
         "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 1) == 2\n"},
        {"id": "loop", "task": "code", "tests": ["assert add(1, 1) == 2"], "response": "```python\nwhile True:\n    pass\n```"},
        {"id": "no-tests", "task": "code", "response": GOOD},
        {"id": "math", "answer": "12", "response": "so \\boxed{12}"},
        {"id": "math-wrong", "answer": 3, "response": "\\boxed{4}"},
        {"id": "poem", "task": "poetry", "response": "roses"},  # refused as the loader refuses it
    ]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "{not json\n"
                    + "".join(json.dumps(r) + "\n" for r in rows[4:]))
    out, errors = io.StringIO(), []
    cfg = load_config(None, ["sandbox.cpu_s=1"])
    summary = grade_file(str(path), sandbox_settings=cfg.sandbox, out=out, err=errors.append)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    got = {r["id"]: (r["passed"], r["verdict"], r["score"]) for r in lines[:-1]}
    assert got == {"ok": (True, "passed", 1.0), "wrong": (False, "failed", 0.0), "program": (False, "failed", 0.0),
                   "loop": (False, "timeout", 0.0), "math": (True, "passed", 1.0), "math-wrong": (False, "failed", 0.0)}
    program = next(r for r in lines if r.get("id") == "program")
    assert program["detail"] == "assert candidate(0, 1) == 2"
    assert [r["line"] for r in lines[:-1]] == [1, 2, 3, 4, 7, 8]  # the file's order
    assert any("line 5: invalid JSON" in e for e in errors) and any("line 6: key 'tests' is missing" in e for e in errors)
    assert any("line 9: key 'task' = 'poetry'; expected one of ['math', 'code']" in e for e in errors)
    assert any("isolation bwrap" in e for e in errors)  # said before anything runs
    assert lines[-1] == {"summary": summary}
    assert summary["graded"] == 6 and summary["bad_rows"] == 3 and summary["passed"] == 2


def test_opsd_grade_on_the_command_line_exits_1_with_bad_rows_and_refuses_less_isolation(tmp_path):
    require_bwrap()
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**ROW, "response": GOOD}) + "\n" + "[]\n")
    run = lambda *extra: subprocess.run([sys.executable, "-m", "opsd.launch.cli", "grade", str(path), *extra],
                                        capture_output=True, text=True, timeout=120)
    done = run()
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["passed"] is True
    assert "line 2: expected a JSON object" in done.stderr
    refused = run("sandbox.bwrap=/nonexistent/bwrap")
    assert refused.returncode == 2 and "config key 'sandbox.isolation' = 'bwrap'" in refused.stderr
    assert refused.stdout == ""


class _Tokenizer:
    chat_template = "x"


def test_humaneval_is_refused_for_training(tmp_path):
    from opsd.config import ConfigError, load_config
    from opsd.launch.problems import load_training_set

    cfg = load_config(None, ["data.train_path=humaneval"])
    with pytest.raises(ConfigError, match="'data.train_path' = 'humaneval': that set is kept for evaluation only"):
        load_training_set(cfg, _Tokenizer())


# The contexts built around a final answer, and the words of why each has no meaning for code.
ANSWER_CONTEXTS = {"answer": ("teacher.context=answer", "shows the final answer alone"),
                   "majority": ("teacher.context=majority", "votes on the final answers"),
                   "contrastive": ("algo=contrastive teacher.context=contrastive rollout.n=2",
                                   "hints end in the final answer")}


@pytest.mark.parametrize("name", list(ANSWER_CONTEXTS))
def test_a_context_built_on_final_answers_is_refused_on_code_rows_at_validate_and_train(tmp_path, name):
    from opsd.config import ConfigError, load_config
    from opsd.contexts import CONTEXTS, context
    from opsd.launch.problems import check_data, load_training_set
    from opsd.launch.validate import validate_config

    overrides, why = ANSWER_CONTEXTS[name]
    code = write(tmp_path, [ROW, {**ROW, "id": "two"}])
    args = [f"data.train_path={code}", "train.prompts_per_step=2", "eval.every=0", *overrides.split()]
    expected = f"config key 'teacher.context' = '{name}' has no meaning for code rows, and {code} has them: .*{why}"
    with pytest.raises(ConfigError, match=expected):
        load_training_set(load_config(None, args), _Tokenizer())
    with pytest.raises(ConfigError, match=expected):
        validate_config(None, args)
    # The same settings on math rows are not refused by it: the refusal is about the task.
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps({"id": f"m{i}", "problem": f"{i} + 1?", "solution": f"\\boxed{{{i + 1}}}",
                                        "answer": str(i + 1)}) + "\n" for i in range(2)))
    found = check_data(load_config(None, [*args, f"data.train_path={math}"]), None, fetch=False)
    assert [p.uid for p in found.problems] == ["m0", "m1"]
    # Every context declares the code rows it refuses, and only these three refuse them.
    assert {n for n in CONTEXTS if "code" in context(n).refused_tasks} == set(ANSWER_CONTEXTS)
