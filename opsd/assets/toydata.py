"""The toy math set: seeded arithmetic problems with short step-by-step solutions.

It is what the local debug run trains and evaluates on, so it has to be small enough for CPU
rollouts (problems <= ~30 tokens, solutions <= ~60 tokens with the tiny tokenizer) and regular
enough that a tiny model can imitate the steps: every solution spells out digit columns or
intermediate results in a fixed format and ends with the line "So the answer is \\boxed{N}."

Five levels, balanced in every split:

    1  addition of 1-2 digit numbers, column by column
    2  addition or subtraction of 2-3 digit numbers with at least one carry or borrow
    3  (11..199) x 1-digit multiplication, split into tens and ones (2-digit x 1-digit alone
       has only 648 distinct problems, fewer than the 900 the default splits need)
    4  two-step expressions: (a + b) * c, (a - b) * c, a * b + c, a * b - c
    5  three-step expressions: a * b + c * d, (a + b) * c - d, and 2-digit x 2-digit products

Train and test never share an underlying expression (so not a problem text either), whatever
the wording. Generation is pure Python `random.Random` with integer seeds, which is stable
across Python versions and platforms; `write_jsonl` fixes the byte format, so the shipped files
regenerate byte for byte (scripts/make_toy_data.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from opsd.config import REPO_ROOT

LEVELS = (1, 2, 3, 4, 5)
DEFAULT_TOY_DIR = REPO_ROOT / "data" / "toy"
DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 4000, "test": 500}

_COLUMNS = ("Ones", "Tens", "Hundreds", "Thousands")
_NAMES = ("Ann", "Ben", "Sam", "Mia", "Tom", "Lily", "Max", "Zoe")
_ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stickers", "marbles")
_ASK = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}.")


@dataclass(frozen=True)
class ToyProblem:
    level: int
    key: str  # canonical expression; two problems with the same key are the same problem
    problem: str
    solution: str
    answer: str


def _digit(n: int, i: int) -> int:
    return (n // 10**i) % 10


def _ndigits(n: int) -> int:
    return len(str(n))


def add_columns(a: int, b: int) -> list[str]:
    """Column addition, ones first: 'Tens: 3 + 4 + 1 = 8' (the + 1 is the carry)."""
    lines, carry = [], 0
    for i in range(max(_ndigits(a), _ndigits(b))):
        da, db = _digit(a, i), _digit(b, i)
        s = da + db + carry
        line = f"{_COLUMNS[i]}: {da} + {db}" + (" + 1" if carry else "") + f" = {s}"
        if s >= 10:
            line += f", write {s - 10} carry 1"
        lines.append(line + ".")
        carry = s // 10
    if carry:
        lines.append(f"{_COLUMNS[max(_ndigits(a), _ndigits(b))]}: write the carry 1.")
    return lines


def sub_columns(a: int, b: int) -> list[str]:
    """Column subtraction (a >= b), ones first: 'Tens: 14 - 1 - 7 = 6, borrow 1'."""
    assert a >= b
    lines, borrow = [], 0
    for i in range(_ndigits(a)):
        da, db = _digit(a, i), _digit(b, i)
        need = da - borrow < db
        top = da + 10 if need else da
        expr = f"{top}" + (" - 1" if borrow else "") + f" - {db}"
        line = f"{_COLUMNS[i]}: {expr} = {top - borrow - db}"
        lines.append(line + (", borrow 1." if need else "."))
        borrow = int(need)
    return lines


def mul_small(a: int, b: int) -> str:
    """a * b for a 1-digit b, as one line splitting a into its last digit and the rest."""
    if a < 10 or a % 10 == 0:
        return f"{a} * {b} = {a * b}."
    tens, ones = a - a % 10, a % 10
    return f"{a} * {b} = {tens} * {b} + {ones} * {b} = {tens * b} + {ones * b} = {a * b}."


def _solution(steps: Iterable[str], answer: int) -> str:
    return "\n".join([*(s for s in steps if s), f"So the answer is \\boxed{{{answer}}}."])


def _pose(rng: random.Random, expr: str, words: list[str]) -> tuple[str, str]:
    """Problem text and its solution's opening line ("" for a bare expression).

    Half of the problems with a word template use it; the rest ask for the bare expression.
    """
    if words and rng.random() < 0.5:
        return rng.choice(words), f"We need {expr}."
    return rng.choice(_ASK).format(e=expr), ""


def _level1(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    expr = f"{a} + {b}"
    problem, opening = _pose(rng, expr, [
        f"{name} has {a} {item} and finds {b} more. How many {item} now?",
        f"A box has {a} {item}. {name} adds {b}. How many {item} now?",
    ])
    return ToyProblem(1, expr, problem, _solution([opening, *add_columns(a, b)], a + b), str(a + b))


def _level2(rng: random.Random) -> ToyProblem:
    while True:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if rng.random() < 0.5:
            op, a, b = "-", max(a, b), min(a, b)
            regroups = any(_digit(a, i) < _digit(b, i) for i in range(3))
        else:
            op = "+"
            regroups = any(_digit(a, i) + _digit(b, i) >= 10 for i in range(3))
        if regroups and a != b:
            break
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    expr = f"{a} {op} {b}"
    if op == "+":
        value, steps = a + b, add_columns(a, b)
        words = [f"A shop sold {a} {item} and then {b} more. How many in total?"]
    else:
        value, steps = a - b, sub_columns(a, b)
        words = [f"{name} had {a} {item} and gave away {b}. How many {item} are left?"]
    problem, opening = _pose(rng, expr, words)
    return ToyProblem(2, expr, problem, _solution([opening, *steps], value), str(value))


def _level3(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(11, 199), rng.randint(2, 9)
    if a % 10 == 0:
        a += 1
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    expr = f"{a} * {b}"
    problem, opening = _pose(rng, expr, [
        f"{name} buys {b} bags of {a} {item}. How many {item}?",
    ])
    return ToyProblem(3, expr, problem, _solution([opening, mul_small(a, b)], a * b), str(a * b))


def _level4(rng: random.Random) -> ToyProblem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    form = rng.randrange(4)
    if form == 0:  # (a + b) * c
        a, b, c = rng.randint(10, 60), rng.randint(2, 39), rng.randint(2, 9)
        s = a + b
        expr, value = f"({a} + {b}) * {c}", s * c
        steps = [f"{a} + {b} = {s}.", mul_small(s, c)]
        words = [f"{c} boxes each hold {a} red and {b} blue {item}. How many {item}?"]
    elif form == 1:  # (a - b) * c
        a, c = rng.randint(20, 99), rng.randint(2, 9)
        b = rng.randint(2, a - 10)
        s = a - b
        expr, value = f"({a} - {b}) * {c}", s * c
        steps = [f"{a} - {b} = {s}.", mul_small(s, c)]
        words = []
    else:  # a * b + c, a * b - c
        a, b = rng.randint(11, 99), rng.randint(2, 9)
        p = a * b
        c = rng.randint(2, min(99, p - 1))
        op = "+" if form == 2 else "-"
        value = p + c if op == "+" else p - c
        expr = f"{a} * {b} {op} {c}"
        steps = [mul_small(a, b), f"{p} {op} {c} = {value}."]
        words = ([f"{name} has {b} bags of {a} {item} and {c} more. How many {item}?"]
                 if op == "+" else
                 [f"{name} buys {b} packs of {a} {item} and gives away {c}. How many are left?"])
    problem, opening = _pose(rng, expr, words)
    return ToyProblem(4, expr, problem, _solution([opening, *steps], value), str(value))


def _level5(rng: random.Random) -> ToyProblem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    form = rng.randrange(3)
    if form == 0:  # a * b + c * d, one of the two products a times-table fact (keeps it short)
        a, b, c, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(11, 49), rng.randint(2, 9)
        if rng.random() < 0.5:
            a, b, c, d = c, d, a, b
        p, q = a * b, c * d
        expr, value = f"{a} * {b} + {c} * {d}", p + q
        steps = [mul_small(a, b), mul_small(c, d), f"{p} + {q} = {value}."]
        words = [f"{name} buys {b} packs of {a} {item} and {d} packs of {c}. How many {item}?"]
    elif form == 1:  # (a + b) * c - d
        a, b, c = rng.randint(10, 50), rng.randint(2, 30), rng.randint(2, 9)
        s = a + b
        d = rng.randint(2, min(99, s * c - 1))
        expr, value = f"({a} + {b}) * {c} - {d}", s * c - d
        steps = [f"{a} + {b} = {s}.", mul_small(s, c), f"{s * c} - {d} = {value}."]
        words = []
    else:  # 2-digit x 2-digit, split on the second factor's tens and ones
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        if b % 10 == 0:
            b += 1
        tens, ones = b - b % 10, b % 10
        expr, value = f"{a} * {b}", a * b
        steps = [f"{a} * {b} = {a} * {tens} + {a} * {ones}.",
                 f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.",
                 f"{a * tens} + {a * ones} = {value}."]
        words = [f"A hall has {a} rows of {b} seats. How many seats?"]
    problem, opening = _pose(rng, expr, words)
    return ToyProblem(5, expr, problem, _solution([opening, *steps], value), str(value))


_MAKERS: dict[int, Callable[[random.Random], ToyProblem]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5,
}


def make_problem(level: int, rng: random.Random) -> ToyProblem:
    if level not in _MAKERS:
        raise ValueError(f"toy level must be one of {LEVELS}, got {level!r}")
    return _MAKERS[level](rng)


def _per_level(n: int, levels: int = len(LEVELS)) -> list[int]:
    """n split over the levels as evenly as possible, the remainder to the lower levels."""
    q, r = divmod(n, levels)
    return [q + (i < r) for i in range(levels)]


def generate_toy_splits(sizes: dict[str, int] | None = None,
                        seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Rows of every split, keyed by split name, in file order (see :func:`generate_splits`)."""
    return generate_splits(make_problem, LEVELS, dict(DEFAULT_SIZES if sizes is None else sizes), seed, "toy")


def generate_splits(make: Callable[[int, random.Random], ToyProblem], levels: tuple[int, ...],
                    sizes: dict[str, int], seed: int, prefix: str) -> dict[str, list[dict]]:
    """Rows of every split of a generated set, keyed by split name, in file order.

    Each level draws its own unique problems from `Random(seed * 1000 + level)`; the splits take
    consecutive slices of that stream (in the order of `sizes`), so no expression is in two
    splits. Rows are then shuffled per split and numbered `<prefix>-<split>-NNNNNN`.
    """
    counts = {name: _per_level(n, len(levels)) for name, n in sizes.items()}
    pools: dict[str, list[ToyProblem]] = {name: [] for name in sizes}
    for li, level in enumerate(levels):
        rng = random.Random(seed * 1000 + level)
        need = sum(c[li] for c in counts.values())
        seen: set[str] = set()
        drawn: list[ToyProblem] = []
        for _ in range(100 * need):
            if len(drawn) == need:
                break
            p = make(level, rng)
            if p.key not in seen:
                seen.add(p.key)
                drawn.append(p)
        else:
            if len(drawn) < need:
                raise RuntimeError(f"level {level}: only {len(drawn)} distinct problems, "
                                   f"{need} requested")
        start = 0
        for name in sizes:
            pools[name].extend(drawn[start:start + counts[name][li]])
            start += counts[name][li]
    out: dict[str, list[dict]] = {}
    for si, name in enumerate(sizes):
        rows = pools[name]
        random.Random(seed * 1000 + 100 + si).shuffle(rows)
        out[name] = [
            {"id": f"{prefix}-{name}-{i:06d}", "level": p.level, "problem": p.problem,
             "solution": p.solution, "answer": p.answer}
            for i, p in enumerate(rows)
        ]
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, keys in row order, UTF-8, '\\n' line ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_toy_data(out_dir: str | Path = DEFAULT_TOY_DIR, sizes: dict[str, int] | None = None,
                   seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write `<out_dir>/<split>.jsonl` for every split; returns the paths."""
    paths = {}
    for name, rows in generate_toy_splits(sizes, seed).items():
        paths[name] = Path(out_dir) / f"{name}.jsonl"
        write_jsonl(rows, paths[name])
    return paths
