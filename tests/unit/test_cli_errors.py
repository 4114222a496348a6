"""Bad input through the CLI: a one-line error naming the problem and exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from opsd.config import REPO_ROOT
from opsd.launch.cli import main

pytestmark = pytest.mark.usefixtures("tiny_model")


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


# --- names a newcomer mistypes ---------------------------------------------------------------


def test_a_misspelt_named_set_names_the_closest_one(tmp_path, capsys):
    for command in (["validate", "configs/tiny.yaml"], ["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}"]):
        assert main([*command, "data.train_path=gsm9k"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("problem set 'gsm9k' is neither a file here nor a named set; did you mean 'gsm8k'? "
                            "(named sets: opsd data list)"), err
        assert "config key 'data.train_path'" in err
    # A facet keeps its part; a name like no named set still points at the list.
    assert main(["validate", "configs/tiny.yaml", "data.train_path=mathh:algebra:1-2"]) == 2
    assert "did you mean 'math:algebra:1-2'" in capsys.readouterr().err
    assert main(["validate", "configs/tiny.yaml", "data.train_path=zzz"]) == 2
    assert "opsd data list shows the named sets" in capsys.readouterr().err


def test_eval_of_a_misspelt_named_set_mentions_named_sets(capsys):
    assert main(["eval", "--model", "tiny", "--data", "math-50"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'math-500'" in err and "opsd data list" in err and "Traceback" not in err


def test_a_top_level_key_that_belongs_to_a_section_is_named(capsys):
    assert main(["validate", "configs/tiny.yaml", "steps=2"]) == 2
    assert "config key 'steps'" in (err := capsys.readouterr().err) and "Did you mean 'train.steps'?" in err
    assert main(["validate", "configs/tiny.yaml", "temperature=1"]) == 2
    err = capsys.readouterr().err
    assert all(k in err for k in ("'rollout.temperature'", "'loss.temperature'", "'eval.temperature'")), err
    assert main(["validate", "configs/tiny.yaml", "flux_capacitor=1"]) == 2
    assert "Did you mean" not in capsys.readouterr().err  # nothing close: no guess


# --- a hub model id with no network -----------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: huggingface_hub reads its environment once, at import."""
    full = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "opsd.launch.cli", *args], cwd=REPO_ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


# Offline mode, and a hub that refuses connections at once: both fast and the same on any machine.
NO_HUB = {"offline": {"HF_HUB_OFFLINE": "1"}, "unreachable": {"HF_ENDPOINT": "http://127.0.0.1:9"}}


@pytest.mark.parametrize("how", sorted(NO_HUB))
def test_a_hub_model_without_network_is_one_line(tmp_path, how):
    env = {**NO_HUB[how], **({"HF_HUB_OFFLINE": "0"} if how == "unreachable" else {})}
    trained = run_cli(["train", "configs/tiny.yaml", "model.path=Qwen/Qwen3-0.6B", f"run_dir={tmp_path / 'run'}"],
                      env, tmp_path)
    assert trained.returncode == 2, trained.stderr
    lines = trained.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in trained.stderr, trained.stderr
    assert lines[0].startswith("opsd: error: config key 'model.path' = 'Qwen/Qwen3-0.6B': not in the local Hugging "
                               "Face cache and ")
    assert "hf download Qwen/Qwen3-0.6B" in lines[0] and "local model directory" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if how == "offline" else "127.0.0.1:9) cannot be reached") in lines[0]
    assert not (tmp_path / "run").exists()
    validated = run_cli(["validate", "configs/tiny.yaml", "model.path=Qwen/Qwen3-0.6B"], env, tmp_path)
    assert validated.returncode == 3, validated.stderr
    assert validated.stdout.strip().splitlines()[-1] == (
        "cannot check without fetching (Qwen/Qwen3-0.6B from the Hugging Face hub): run `hf download Qwen/Qwen3-0.6B` "
        "(or opsd train, which fetches it)")


def test_a_hub_model_in_the_local_cache_is_checked_offline(tmp_path, tiny_model):
    # The cache's layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}.
    repo = tmp_path / "hf" / "models--someorg--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    validated = run_cli(["validate", "configs/tiny.yaml", "model.path=someorg/tiny"], NO_HUB["unreachable"], tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.strip().splitlines()[-1] == "ok"
    # The checks ran on the cached files: a tokenizer larger than the model is refused as train refuses it.
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    refused = run_cli(["validate", "configs/tiny.yaml", "model.path=someorg/tiny"], NO_HUB["unreachable"], tmp_path)
    assert refused.returncode == 2 and "the model only 100 embeddings" in refused.stderr, refused.stderr


def test_eval_of_a_hub_model_without_network_is_one_line(tmp_path):
    evaluated = run_cli(["eval", "--model", "Qwen/Qwen3-0.6B", "--data", "data/toy/test.jsonl"], NO_HUB["offline"],
                        tmp_path)
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr, evaluated.stderr
    assert evaluated.stderr.strip() == (
        "opsd: error: --model = 'Qwen/Qwen3-0.6B': not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it where there is a network (hf download Qwen/Qwen3-0.6B) into this machine's Hugging Face cache, "
        "or set model.path to a local model directory")


def test_data_fetch_of_a_misspelt_name(capsys):
    assert main(["data", "fetch", "math-50"]) == 2
    assert capsys.readouterr().err.strip() == ("opsd data fetch: 'math-50' is not a named data set; did you mean "
                                               "'math-500' or 'math' or 'math-val'? (named sets: opsd data list)")
