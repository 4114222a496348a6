"""Bad input through the CLI: a one-line error naming the problem and exit status 2, no traceback."""

from __future__ import annotations

from opsd.launch.cli import main


def test_overlong_prompts_give_a_clear_error(tmp_path, capsys):
    rc = main(["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", "model.max_model_len=120",
               "rollout.max_tokens=64"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "row toy-train-" in err and "prompt.overlong=skip" in err and "Traceback" not in err


def test_all_rows_skipped_is_an_error_not_an_empty_run(tmp_path, capsys):
    rc = main(["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", "model.max_model_len=120",
               "rollout.max_tokens=64", "prompt.overlong=skip"])
    assert rc == 2
    assert "no usable problems" in capsys.readouterr().err


def test_bad_data_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1", "solution": "\\\\boxed{2}"}\n{"id": "b", "problem": ""}\n')
    rc = main(["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.train_path={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl" in err and "line 2" in err


def test_unknown_key_names_it(capsys):
    assert main(["validate", "configs/tiny.yaml", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
