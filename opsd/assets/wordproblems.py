"""The default run's task: one- and two-step word problems a 135M-parameter model half solves.

Chosen by measurement (docs/TASK.md): SmolLM2-135M-Instruct, greedy, with the default
instruction, gets about a third of these right without help and most of them with the reference
solution in its context, so the teacher knows what the student does not and the gap is one
that training on the student's own answers can close. The levels, balanced in every split:

    1  "has a, gets b more": a + b, with a, b in 2..40
    2  "has a, gives away b": a - b, with 10 <= a <= 60 and 2 <= b <= a - 2
    3  "a boxes of b each": a * b, with a in 2..12 and b in 2..50
    4  two steps, "has a, gets b, then gives away c": a + b - c

Every solution names the operation, writes the calculation and its result, and ends with
"The answer is \\boxed{N}." Train and test never share the numbers of a problem at the same
level (the key), whatever its wording; generation is seeded `random.Random`, so the shipped
files regenerate byte for byte (scripts/make_toy_data.py --set wordproblems).
"""

from __future__ import annotations

import random
from pathlib import Path

from opsd.assets.toydata import ToyProblem, generate_splits, write_jsonl
from opsd.config import REPO_ROOT

LEVELS = (1, 2, 3)
DEFAULT_DIR = REPO_ROOT / "data" / "wordproblems"
DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 900, "test": 400}

_NAMES = ("Ann", "Ben", "Sam", "Mia", "Tom", "Lily", "Max", "Zoe", "Leo", "Emma", "Noah", "Ava")
_ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stickers", "marbles", "stamps", "cookies")
_GET = (("buys {b} more", "buys"), ("finds {b} more", "finds"), ("gets {b} more from a friend", "gets"))
_LOSE = (("gives away {b}", "gives away"), ("loses {b}", "loses"), ("sells {b}", "sells"))
_BOX = (("boxes", "box"), ("bags", "bag"), ("packs", "pack"))


def _answer(n: int) -> str:
    return f"The answer is \\boxed{{{n}}}."


def _level1(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(2, 20), rng.randint(2, 25)
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    phrase, verb = rng.choice(_GET)
    problem = f"{who} has {a} {item}. {who} {phrase.format(b=b)}. How many {item} does {who} have now?"
    solution = f"{who} {verb} {b} more, so we add: {a} + {b} = {a + b}.\n{_answer(a + b)}"
    return ToyProblem(1, f"{a}+{b}", problem, solution, str(a + b))


def _level2(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(10, 99), rng.randint(1, 5)
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    phrase, verb = rng.choice(_LOSE)
    problem = f"{who} has {a} {item}. {who} {phrase.format(b=b)} of them. How many {item} does {who} have left?"
    solution = f"{who} {verb} {b}, so we subtract: {a} - {b} = {a - b}.\n{_answer(a - b)}"
    return ToyProblem(2, f"{a}-{b}", problem, solution, str(a - b))


def _level3(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(2, 10), rng.randint(2, 50)
    who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, box = rng.choice(_BOX)
    problem = f"{who} has {a} {boxes} with {b} {item} in each {box}. How many {item} does {who} have?"
    solution = f"There are {a} {boxes} of {b} {item}, so we multiply: {a} * {b} = {a * b}.\n{_answer(a * b)}"
    return ToyProblem(3, f"{a}*{b}", problem, solution, str(a * b))


_MAKERS = {1: _level1, 2: _level2, 3: _level3}


def make_problem(level: int, rng: random.Random) -> ToyProblem:
    if level not in _MAKERS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return _MAKERS[level](rng)


def generate_word_splits(sizes: dict[str, int] | None = None, seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    return generate_splits(make_problem, LEVELS, dict(DEFAULT_SIZES if sizes is None else sizes), seed, "wp")


def write_word_data(out_dir: str | Path = DEFAULT_DIR, sizes: dict[str, int] | None = None,
                    seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write `<out_dir>/<split>.jsonl` for every split; returns the paths."""
    paths = {}
    for name, rows in generate_word_splits(sizes, seed).items():
        paths[name] = Path(out_dir) / f"{name}.jsonl"
        write_jsonl(rows, paths[name])
    return paths
