"""The default run's word-problem set (opsd/assets/wordproblems.py) and the shipped data/wordproblems/."""

import hashlib
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from opsd.data import load_problems
from opsd.assets.toydata import read_jsonl
from opsd.assets.wordproblems import DEFAULT_DIR, DEFAULT_SIZES, LEVELS

REPO = Path(__file__).resolve().parents[2]
NUMBERS = re.compile(r"\d+")
OPERATIONS = {1: lambda a, b: a + b, 2: lambda a, b: a - b, 3: lambda a, b: a * b}


@pytest.fixture(scope="module")
def shipped():
    return {s: read_jsonl(DEFAULT_DIR / f"{s}.jsonl") for s in ("train", "test")}


def test_script_regenerates_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_toy_data.py"), "--set", "wordproblems", "--out",
                    str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    for split in ("train", "test"):
        got, want = (tmp_path / f"{split}.jsonl").read_bytes(), (DEFAULT_DIR / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest(), split


def test_sizes_ids_and_level_balance(shipped):
    for split, n in DEFAULT_SIZES.items():
        rows = shipped[split]
        assert [r["id"] for r in rows] == [f"wp-{split}-{i:06d}" for i in range(n)]
        counts = Counter(r["level"] for r in rows)
        assert set(counts) == set(LEVELS) and max(counts.values()) - min(counts.values()) <= 1
        assert len({r["level"] for r in rows[:10]}) > 1  # shuffled, not grouped by level


def test_every_answer_follows_from_the_numbers_of_its_problem(shipped):
    # Recomputed from the problem text alone, independently of the generator's own arithmetic.
    for split, rows in shipped.items():
        for r in rows:
            a, b = map(int, NUMBERS.findall(r["problem"]))
            want = OPERATIONS[r["level"]](a, b)
            assert r["answer"] == str(want), r
            assert want > 0
            assert r["solution"].endswith(f"The answer is \\boxed{{{want}}}.")
            assert f"{a} {'+-*'[r['level'] - 1]} {b} = {want}" in r["solution"]


def test_train_and_test_never_share_the_numbers_of_a_problem(shipped):
    def key(r):
        return (r["level"], *NUMBERS.findall(r["problem"]))

    train = {key(r) for r in shipped["train"]}
    test = [key(r) for r in shipped["test"]]
    assert len(set(test)) == len(test) and len(train) == len(shipped["train"])
    assert not train & set(test)


def test_the_loader_takes_the_shipped_files():
    for split, n in DEFAULT_SIZES.items():
        problems = load_problems(DEFAULT_DIR / f"{split}.jsonl", id_key="id")
        assert len(problems) == n and problems[0].uid == f"wp-{split}-000000"
