"""Bad input, as a user would bring it: every case ends with exit status 2 and a one-line error
that names the file, row, key or value, and leaves nothing half-written (no run directory).

All of it is caught before Ray starts: configs, data files, model directories, resume directories,
batch files, and actors that do not fit the local cluster the run would start (its size is in the
config). That last case runs the command in a process of its own, where starting a cluster fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.launch.cli import main
from opsd.config import REPO_ROOT

TINY = "configs/tiny.yaml"
pytestmark = pytest.mark.usefixtures("tiny_model")
GOOD_ROW = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2. The answer is \\boxed{2}."}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_train(tmp_path: Path, capsys, *args: str, config: str = TINY) -> str:
    run_dir = tmp_path / "run"
    rc = main(["train", config, f"run_dir={run_dir}", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists(), "a run that failed its checks left a run directory"
    return err


# --- configs -----------------------------------------------------------------------------------

CONFIG_CASES = [
    (["train.stepz=3"], r"train\.stepz"),
    (["train.steps=many"], r"train\.steps"),
    (["objectives.opsd.beta=1.5"], r"objectives\.opsd\.beta.*1\.5"),
    (["objectives.opsd.bta=1"], r"objectives\.opsd\.bta.*no option.*beta"),
    (["objectives.grpo.clip_low=x"], r"objectives\.grpo\.clip_low"),
    (["learner.lr=-1"], r"learner\.lr.*-1"),
    (["algo=ppo"], r"'algo' = 'ppo'.*opsd"),
    (["algo=grpo", "rollout.n=1"], r"rollout\.n.*>= 2"),
    (["teacher.sync_every=2"], r"teacher\.sync_every.*fixed"),
    (["sync.transport=nccl"], r"sync\.transport.*cluster\.device=cuda"),
    (["model=3"], r"'model' is a section"),
    (["scorer.topk=100000"], r"scorer\.topk.*100000.*512"),
    (["eval.n=4"], r"eval\.n.*temperature"),
    (["grading.extract=loose"], r"grading\.extract.*'loose'"),
    (["train.prompts_per_step=9999"], r"train\.prompts_per_step=9999"),
    (["steps"], r"'steps' is not of the form key=value"),
    (["train.max_bad_steps=0"], r"train\.max_bad_steps.*0"),
    (["learner.resources.CPU=1"], r"learner\.resources\.CPU.*not a custom resource.*learner\.num_cpus_per_rank"),
    (["rollout.resources.opsd_actors=0"], r"rollout\.resources\.opsd_actors' = 0; expected > 0"),
    (["cluster.place_timeout_s=0"], r"cluster\.place_timeout_s.*must be positive"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[c[0][-1] for c in CONFIG_CASES])
def test_bad_config_values(tmp_path, capsys, overrides, message):
    assert re.search(message, run_train(tmp_path, capsys, *overrides))


def test_a_config_file_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    assert "bad.yaml: not valid YAML" in run_train(tmp_path, capsys, config=str(bad))


def test_a_config_file_that_is_a_list(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- train\n- steps\n")
    assert "list.yaml: the top level must be a mapping" in run_train(tmp_path, capsys, config=str(bad))


def test_a_missing_config_file(tmp_path, capsys):
    assert "config file not found" in run_train(tmp_path, capsys, config=str(tmp_path / "nope.yaml"))


# --- datasets ----------------------------------------------------------------------------------

DATA_CASES = {
    "empty": ([], r"empty\.jsonl: no rows"),
    "not_json": ([GOOD_ROW, "{problem: 1"], r"not_json\.jsonl, line 2: invalid JSON"),
    "a_list": ([GOOD_ROW, "[1, 2]"], r"a_list\.jsonl, line 2: expected a JSON object, got list"),
    "no_problem": ([GOOD_ROW, {"question": "x", "solution": "y \\boxed{1}"}], r"line 2: key 'problem' is missing"),
    "problem_is_a_number": ([GOOD_ROW, {"problem": 7, "solution": "\\boxed{7}"}], r"line 2: key 'problem' must be a string, got int 7"),
    "empty_solution": ([GOOD_ROW, {"problem": "x", "solution": "  "}], r"line 2: key 'solution' is empty"),
    "no_answer": ([GOOD_ROW, {"problem": "x", "solution": "it is two"}], r"line 2: no answer: key 'answer' is absent"),
    "null_answer_no_box": ([{"problem": "x", "solution": "two", "answer": None}], r"line 1: no answer"),
    "duplicate_ids": ([dict(GOOD_ROW, id="a"), dict(GOOD_ROW, id="b"), dict(GOOD_ROW, id="a")],
                      r"line 3: id 'a' \(key 'id'\) repeats line 1"),
    "ids_in_some_rows": ([dict(GOOD_ROW, id="a"), GOOD_ROW], r"line 2: key 'id' is missing"),
    "overlong": ([{"problem": "count " * 400, "solution": "\\boxed{1}"}],
                 r"row overlong:0: the teacher prompt has \d+ tokens.*prompt\.overlong=skip"),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_dataset_rows(tmp_path, capsys, name):
    rows, message = DATA_CASES[name]
    path = write_rows(tmp_path / f"{name}.jsonl", rows)
    err = run_train(tmp_path, capsys, f"data.train_path={path}", "train.prompts_per_step=1", "eval.every=0")
    assert re.search(message, err), err


def test_a_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + '{"problem": "caf\xe9", "solution": "\\\\boxed{1}"}'.encode("latin-1") + b"\n")
    err = run_train(tmp_path, capsys, f"data.train_path={path}", "train.prompts_per_step=1")
    assert "latin1.jsonl, line 2: not UTF-8 (byte 0xe9" in err


def test_an_unknown_format_and_a_missing_file(tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    csv.write_text("problem,solution\n")
    assert "rows.csv: unknown format '.csv'" in run_train(tmp_path, capsys, f"data.train_path={csv}")
    assert "nothere.jsonl' does not exist" in run_train(tmp_path, capsys, f"data.train_path={tmp_path / 'nothere.jsonl'}")


def test_a_parquet_file_that_is_not_parquet(tmp_path, capsys):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert "broken.parquet: cannot read as Parquet" in run_train(tmp_path, capsys, f"data.train_path={bad}")


def test_a_bad_eval_set_is_named_too(tmp_path, capsys):
    path = write_rows(tmp_path / "heldout.jsonl", [GOOD_ROW, "nope"])
    err = run_train(tmp_path, capsys, f"eval.path={path}", "eval.every=3")
    assert "heldout.jsonl, line 2: invalid JSON" in err


# --- model directories -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from opsd.assets.models import resolve_model_path

    return Path(resolve_model_path("tiny"))


def model_copy(tiny_dir: Path, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny_dir, dest, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dest


def test_a_model_directory_without_config(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "noconfig", drop=("config.json",))
    assert f"model.path={m}: no config.json" in run_train(tmp_path, capsys, f"model.path={m}")


def test_a_model_directory_without_weights(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "noweights", drop=("*.safetensors",))
    assert f"model.path={m}: no *.safetensors weights" in run_train(tmp_path, capsys, f"model.path={m}")


def test_pickled_weights_are_named_and_never_loaded(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "pickled", drop=("*.safetensors",))
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    err = run_train(tmp_path, capsys, f"model.path={m}")
    assert "it has pytorch_model.bin: opsd never loads pickled weights" in err


def test_a_model_directory_without_a_tokenizer(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "notok", drop=("tokenizer*", "chat_template.jinja", "special_tokens_map.json"))
    assert f"model.path={m}: no tokenizer" in run_train(tmp_path, capsys, f"model.path={m}")


def test_a_tokenizer_without_a_chat_template(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "nochat", drop=("chat_template.jinja",))
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "its tokenizer has no chat template" in run_train(tmp_path, capsys, f"model.path={m}")


def test_a_tokenizer_of_another_model(tmp_path, capsys, tiny_dir):
    m = model_copy(tiny_dir, tmp_path / "smallvocab")
    cfg = json.loads((m / "config.json").read_text())
    cfg["vocab_size"] = 100
    (m / "config.json").write_text(json.dumps(cfg))
    err = run_train(tmp_path, capsys, f"model.path={m}")
    assert "the tokenizer has 512 tokens but the model only 100 embeddings" in err


def test_a_gguf_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    assert "model.gguf: not a readable GGUF file" in run_train(tmp_path, capsys, f"model.path={bad}")


def test_a_model_path_that_is_nothing(tmp_path, capsys):
    rc = main(["validate", TINY, f"model.path={tmp_path / 'nowhere' / 'x'}"])
    assert rc == 2 and "model.path" in capsys.readouterr().err


# --- resume directories and batches ------------------------------------------------------------


def test_resume_from_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["train", TINY, "--resume", str(tmp_path / "empty")])
    assert rc == 2 and "no config.yaml there" in capsys.readouterr().err


def test_resume_without_a_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    shutil.copy(REPO_ROOT / TINY, run / "config.yaml")
    (run / "checkpoints" / "step_3" / "driver_state.json").write_text('{"step": 3, "polic')  # torn
    rc = main(["train", TINY, "--resume", str(run)])
    captured = capsys.readouterr()
    assert rc == 2 and "no complete checkpoint" in captured.err
    assert "driver_state.json is damaged" in captured.out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing added


def test_a_corrupt_arrow_batch_is_named(tmp_path):
    from opsd.batch import BatchError, read_ipc

    bad = tmp_path / "step_000001.arrow"
    bad.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(BatchError, match=r"step_000001\.arrow: not a readable Arrow IPC batch"):
        read_ipc(bad)


# The command as `opsd train` runs it, in a process of its own where a local Ray cluster cannot
# start: the refusal must come before one is started.
NO_LOCAL_RAY = (
    "import sys\n"
    "import opsd.launch.cluster as cluster\n"
    "class NoCluster:\n"
    "    def __init__(self, **kw):\n"
    "        raise AssertionError('a local Ray cluster was started')\n"
    "cluster.LocalCluster = NoCluster\n"
    "from opsd.launch.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_actors_that_do_not_fit_the_local_cluster_are_refused_before_it_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", NO_LOCAL_RAY, "train", TINY, f"run_dir={run_dir}", "learner.num_cpus_per_rank=4",
         "eval.every=0", "cluster.num_cpus=4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    # 1 rollout x 1 CPU + 1 scorer x 0.5 + 2 learner ranks x 4 = 9.5 CPUs on a cluster of 4.
    assert "the run's actors need 9.5 CPUs (the cluster has 4)" in proc.stderr, proc.stderr[-4000:]
    assert "learner.num_cpus_per_rank" in proc.stderr
    assert "Traceback" not in proc.stderr and "a local Ray cluster was started" not in proc.stderr
    assert not run_dir.exists(), "a run that failed its checks left a run directory"


@pytest.mark.parametrize("override, message", [
    ("learner.num_cpus_per_rank=4", "9.5 CPUs (the cluster has 4)"),
    # A role pinned to nodes that a local cluster never has.
    ("learner.resources={opsd_learner: 1}", "2 of the custom resource 'opsd_learner' (the cluster has 0"),
], ids=["cpus", "custom-resource"])
@pytest.mark.parametrize("staged", [False, True], ids=["one-stage", "staged"])
def test_every_stage_is_checked_against_the_local_cluster_before_it_starts(tmp_path, capsys, monkeypatch, override,
                                                                          message, staged):
    """In this process (the command's code, as above; this process may hold a Ray of its own
    from other tests, so the run is told it would start a local one)."""
    import opsd.launch.cluster as cluster
    import opsd.launch.driver as driver

    def no_ray(cfg):
        raise AssertionError("Ray was started")

    for module in (cluster, driver):
        monkeypatch.setattr(module, "starts_local_cluster", lambda cfg: True)
        monkeypatch.setattr(module, "init_ray", no_ray)
    run_dir = tmp_path / "run"
    config = TINY
    if staged:  # the second stage does not fit: every stage is checked before anything starts
        key, value = override.split("=", 1)
        config = str(tmp_path / "staged.yaml")
        Path(config).write_text((REPO_ROOT / TINY).read_text().replace("data/toy/", f"{REPO_ROOT}/data/toy/") + (
            "stages:\n"
            "  - {name: first, algo: opsd, steps: 1}\n"
            f"  - {{name: second, algo: opsd, steps: 1, overrides: {{{key}: {value}}}}}\n"))
        override = "eval.every=0"
    assert main(["train", config, f"run_dir={run_dir}", override, "eval.every=0", "cluster.num_cpus=4"]) == 2
    err = capsys.readouterr().err
    assert "the run's actors need" in err and message in err, err
    assert not run_dir.exists(), "a run that failed its checks left a run directory"
