import hashlib
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from opsd.assets.toydata import (
    DEFAULT_TOY_DIR,
    LEVELS,
    add_columns,
    generate_toy_splits,
    make_problem,
    mul_small,
    read_jsonl,
    sub_columns,
)

REPO = Path(__file__).resolve().parents[2]
ARITH = re.compile(r"^[\d+\-*() ]+$")


@pytest.fixture(scope="module")
def shipped():
    return {s: read_jsonl(DEFAULT_TOY_DIR / f"{s}.jsonl") for s in ("train", "test")}


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_script_regenerates_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_toy_data.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    for split in ("train", "test"):
        assert _sha(tmp_path / f"{split}.jsonl") == _sha(DEFAULT_TOY_DIR / f"{split}.jsonl")


def test_sizes_ids_and_level_balance(shipped):
    for split, n in (("train", 4000), ("test", 500)):
        rows = shipped[split]
        assert [r["id"] for r in rows] == [f"toy-{split}-{i:06d}" for i in range(n)]
        assert Counter(r["level"] for r in rows) == {lv: n // 5 for lv in LEVELS}
        assert all(list(r) == ["id", "level", "problem", "solution", "answer"] for r in rows)
        # shuffled, not grouped by level
        assert len({r["level"] for r in rows[:20]}) > 1


def test_no_problem_shared_within_or_across_splits(shipped):
    train = [r["problem"] for r in shipped["train"]]
    test = [r["problem"] for r in shipped["test"]]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def _expression(row):
    """The arithmetic the problem asks for: from 'We need X.' or from the bare question."""
    first = row["solution"].split("\n")[0]
    if first.startswith("We need "):
        return first[len("We need "):-1]
    m = re.search(r"(?:What is|Compute|Calculate|Find the value of) (.+)[?.]$", row["problem"])
    assert m, row
    return m.group(1)


def test_answers_are_the_value_of_the_problem(shipped):
    for row in shipped["train"] + shipped["test"]:
        expr = _expression(row)
        assert ARITH.match(expr), row
        assert str(eval(expr)) == row["answer"], row
        # the word problem's own numbers appear in the expression, in some order
        nums = sorted(re.findall(r"\d+", row["problem"]))
        assert nums == sorted(re.findall(r"\d+", expr)), row
        assert row["solution"].endswith(f"So the answer is \\boxed{{{row['answer']}}}."), row


def test_every_arithmetic_step_is_correct(shipped):
    checked = 0
    for row in shipped["train"] + shipped["test"]:
        for line in row["solution"].split("\n")[:-1]:
            body = line.split(":", 1)[-1].split(",")[0].rstrip(".")
            if "=" not in body:
                continue
            parts = [p.strip() for p in body.split("=")]
            assert all(ARITH.match(p) for p in parts), line
            assert len({eval(p) for p in parts}) == 1, (row["id"], line)
            checked += 1
    assert checked > 4500 * 1.5


def _compose_columns(lines):
    """The number written by column lines: the last ', write d' digit, else the result."""
    digits = []
    for line in lines:
        m = re.search(r"write (?:the carry )?(\d)", line)
        digits.append(m.group(1) if m else re.search(r"= (\d+)", line).group(1))
    return int("".join(reversed(digits)))


def test_column_algorithms_compose_to_the_result():
    rng = random.Random(7)
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert _compose_columns(add_columns(a, b)) == a + b
        hi, lo = max(a, b), min(a, b)
        assert _compose_columns(sub_columns(hi, lo)) == hi - lo


def test_column_lines_format():
    assert add_columns(988, 893) == [
        "Ones: 8 + 3 = 11, write 1 carry 1.",
        "Tens: 8 + 9 + 1 = 18, write 8 carry 1.",
        "Hundreds: 9 + 8 + 1 = 18, write 8 carry 1.",
        "Thousands: write the carry 1.",
    ]
    assert sub_columns(305, 298) == [
        "Ones: 15 - 8 = 7, borrow 1.",
        "Tens: 10 - 1 - 9 = 0, borrow 1.",
        "Hundreds: 3 - 1 - 2 = 0.",
    ]
    assert mul_small(47, 6) == "47 * 6 = 40 * 6 + 7 * 6 = 240 + 42 = 282."
    assert mul_small(7, 6) == "7 * 6 = 42."


def test_level_contents(shipped):
    rows = shipped["train"]
    for r in rows:
        nums = [int(n) for n in re.findall(r"\d+", _expression(r))]
        if r["level"] == 1:
            assert "+" in _expression(r) and all(n <= 99 for n in nums)
        if r["level"] == 2:
            assert "carry" in r["solution"] or "borrow" in r["solution"], r
        if r["level"] == 3:
            assert "*" in _expression(r) and len(nums) == 2 and min(nums) <= 9
    ops = {lv: Counter(len(re.findall(r"[+\-*]", _expression(r))) for r in rows if r["level"] == lv)
           for lv in LEVELS}
    assert set(ops[4]) == {2}
    assert set(ops[5]) == {1, 3}  # 2-digit x 2-digit products, and three-step expressions


def test_generation_is_seeded():
    a = generate_toy_splits({"train": 7, "test": 3}, seed=1)
    assert a == generate_toy_splits({"train": 7, "test": 3}, seed=1)
    assert a != generate_toy_splits({"train": 7, "test": 3}, seed=2)
    assert Counter(r["level"] for r in a["train"]) == {1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
    assert Counter(r["level"] for r in a["test"]) == {1: 1, 2: 1, 3: 1}


def test_make_problem_rejects_unknown_level():
    with pytest.raises(ValueError, match="toy level"):
        make_problem(6, random.Random(0))


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_jsonl(p)
