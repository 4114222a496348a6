import json
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.launch.cli import main
from opsd.launch.validate import CANNOT_CHECK, validate_config
from opsd.assets.gguf import ModelError
from opsd.data import DataError
from opsd.config import REPO_ROOT, ConfigError, load_config, notes

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))

# What each shipped config asks Ray for; a change to a recipe's layout has to change this too.
NEEDS = {
    "local.yaml": "needs 0 GPUs, 2 CPUs",
    "tiny.yaml": "needs 0 GPUs, 2 CPUs",
    "grpo-local.yaml": "needs 0 GPUs, 2 CPUs",
    "sft-local.yaml": "needs 0 GPUs, 2 CPUs",
    "gsm8k.yaml": "needs 0 GPUs, 2 CPUs",
    "mbpp.yaml": "needs 0 GPUs, 2 CPUs",
    "qwen3-1.7b.yaml": "needs 4 GPUs, 14 CPUs",
    "qwen3-4b.yaml": "needs 8 GPUs, 28 CPUs",
    "qwen3-8b.yaml": "needs 8 GPUs, 28 CPUs",
    "qwen3-1.7b-from-8b.yaml": "needs 4 GPUs, 14 CPUs",
    "two-teachers.yaml": "needs 0 GPUs, 2 CPUs",
    "qwen3-1.7b-staged.yaml": "needs 4 GPUs, 14 CPUs",
}
# Recipes whose teacher's tokenizer is checked only where both hub ids' files are (else validate
# says it cannot check without fetching).
FETCHED = {"qwen3-1.7b-from-8b.yaml"}


def is_cluster_recipe(path: Path) -> bool:
    return load_config(path).cluster.device == "cuda"


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(NEEDS)


# What validate cannot check on a machine where nothing was fetched, per shipped config.
FETCHES = {
    "local.yaml": ["opsd model fetch smollm2-135m"],
    "gsm8k.yaml": ["opsd model fetch smollm2-135m", "opsd data fetch gsm8k"],
    "mbpp.yaml": ["opsd model fetch smollm2-135m", "opsd data fetch mbpp"],
    "qwen3-1.7b.yaml": ["hf download Qwen/Qwen3-1.7B"],
    "qwen3-4b.yaml": ["hf download Qwen/Qwen3-4B"],
    "qwen3-8b.yaml": ["hf download Qwen/Qwen3-8B"],
    "qwen3-1.7b-from-8b.yaml": ["hf download Qwen/Qwen3-1.7B"],
    "qwen3-1.7b-staged.yaml": ["hf download Qwen/Qwen3-1.7B"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, nothing_fetched):
    # Cluster recipes point at data that lives on the cluster; local ones must load their data here.
    check_data = not is_cluster_recipe(path)
    lines = validate_config(str(path), [], check_data=check_data)
    verdict = [line for line in lines if line.startswith(CANNOT_CHECK)]
    assert [line.rsplit("`", 2)[1] for line in verdict if "`" in line] == FETCHES.get(path.name, []), lines
    # teacher.model's tokenizer is compared with the student's only from local files
    assert any("the teacher's tokenizer" in line for line in verdict) == (path.name in FETCHED), lines
    assert lines[-1] == (verdict[-1] if verdict else "ok")
    assert any(NEEDS[path.name] in line for line in lines), lines
    if check_data and path.name not in ("gsm8k.yaml", "mbpp.yaml"):  # a named set, not fetched here
        rows = {"local.yaml": 900}.get(path.name, 4000)  # the word problems or the toy set
        assert any(line.startswith("data: data.train_path") and f"{rows} problems" in line for line in lines), lines
    assert not any(nothing_fetched.glob("**/*.whl")), "validate downloaded a wheel"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_use_no_old_key(path):
    # An old key still loads, with a note on every validate and train; a shipped recipe shows the
    # keys a user should write (its stages' overrides included).
    from opsd.launch.stages import stage_configs

    cfg = load_config(path)
    for c in [cfg] + [c for _, c in (stage_configs(cfg) if cfg.stages else [])]:
        assert not [n for n in notes(c) if "old config keys" in n], path.name


@pytest.mark.parametrize("name", ["qwen3-1.7b.yaml", "qwen3-4b.yaml", "qwen3-8b.yaml"])
def test_paper_recipes_can_push_over_nccl(name, nothing_fetched):
    # Whole GPUs per learner rank and rollout engine: each can be a member of a NCCL weight group.
    lines = validate_config(str(REPO_ROOT / "configs" / name), ["sync.transport=nccl"], check_data=False)
    assert lines[-1].startswith(CANNOT_CHECK)  # the model: a hub id, not in this machine's cache
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert f"sync: learner rank 0 -> {cfg.rollout.num_workers} rollout engine" in "\n".join(lines)
    assert any("broadcast over NCCL (GPU to GPU)" in line and "waits at most 600 s" in line for line in lines), lines


def test_sync_line_names_the_receivers():
    lines = validate_config(str(REPO_ROOT / "configs" / "local.yaml"),
                            ["teacher.mode=ema", "sync.transport=gloo", "sync.bucket_mb=16"], check_data=False)
    assert "sync: learner rank 0 -> 1 rollout engine and 1 ema teacher, broadcast over gloo (host memory), " \
           "16 MB buckets, waits at most 600 s" in lines
    lines = validate_config(str(REPO_ROOT / "configs" / "local.yaml"), [], check_data=False)
    assert "sync: learner rank 0 -> 1 rollout engine, through Ray's object store, 64 MB buckets" in lines
    lines = validate_config(str(REPO_ROOT / "configs" / "local.yaml"),
                            ["teacher.mode=live", "scorer.on_rollout_engines=true"], check_data=False)
    assert ("sync: learner rank 0 -> 1 rollout engine (the live teacher: they score it by prefill), through Ray's "
            "object store, 64 MB buckets") in lines
    assert any(line.startswith("resources:") and "scorer" not in line for line in lines)
    lines = validate_config(str(REPO_ROOT / "configs" / "local.yaml"),
                            ["model.lora.enabled=true", "model.lora.serve=adapter", "scorer.on_rollout_engines=true",
                             "sync.transport=in_place"], check_data=False)
    assert ("sync: learner rank 0 -> 1 rollout engine (they score the fixed teacher by prefill, on the base "
            "weights), the LoRA adapter alone, read in place from the learner's memory (same host), 64 MB buckets, "
            "waits at most 600 s") in lines


@pytest.mark.parametrize("name,tokens", [("qwen3-1.7b.yaml", 1024), ("qwen3-4b.yaml", 1024), ("qwen3-8b.yaml", 2048)])
def test_paper_recipes_keep_the_published_settings(name, tokens):
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert cfg.model.path == f"Qwen/Qwen3-{name[6:-5].upper()}"
    assert (cfg.model.dtype, cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.alpha) == ("bfloat16", True, 64, 128)
    assert len(cfg.model.lora.target_modules) == 7
    assert cfg.learner.lr == pytest.approx(2e-4)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.1, 0.95, 20)
    assert cfg.rollout.max_tokens == tokens
    assert (cfg.objectives.opsd.beta, cfg.teacher.mode) == (0.5, "fixed")
    assert cfg.train.prompts_per_step * cfg.rollout.n == 32
    assert cfg.model.max_model_len >= cfg.prompt.max_prompt_len + cfg.rollout.max_tokens


def test_a_cluster_recipe_with_its_data_missing_names_the_path():
    with pytest.raises(DataError, match=r"data\.train_path.*/data/opsd/math_train\.jsonl"):
        validate_config(str(REPO_ROOT / "configs" / "qwen3-1.7b.yaml"), [])


def test_missing_data_path_names_key_and_path(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="data.train_path") as err:
        validate_config(str(REPO_ROOT / "configs" / "tiny.yaml"), [f"data.train_path={missing}"])
    assert str(missing) in str(err.value)


def test_missing_eval_path_is_checked_only_when_eval_runs(tmp_path):
    missing = tmp_path / "eval.jsonl"
    tiny = str(REPO_ROOT / "configs" / "tiny.yaml")
    with pytest.raises(DataError, match=r"eval\.path.*eval\.jsonl"):
        validate_config(tiny, [f"eval.path={missing}", "eval.every=3"])
    lines = validate_config(tiny, [f"eval.path={missing}", "eval.every=0"])
    assert lines[-1] == "ok"


def test_bad_data_row_is_reported_with_key_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")  # no solution
    with pytest.raises(DataError, match=r"data\.train_path.*line 1.*solution"):
        validate_config(str(REPO_ROOT / "configs" / "tiny.yaml"), [f"data.train_path={bad}"])


def test_bad_keys_and_values_name_the_key(tmp_path):
    local = str(REPO_ROOT / "configs" / "local.yaml")
    with pytest.raises(ConfigError, match="rollout.temprature"):
        validate_config(local, ["rollout.temprature=1.0"], check_data=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  zero_stage: 5\n")
    with pytest.raises(ConfigError, match="learner.zero_stage"):
        validate_config(str(bad), [], check_data=False)


@pytest.mark.parametrize("overrides,key", [
    (["learner.num_gpus_per_rank=1"], "learner.num_gpus_per_rank"),  # GPUs on a CPU cluster
    (["learner.num_cpus_per_rank=1"], "cluster.num_cpus"),  # 1 + 0.5 + 2 x 1 > 2 local CPUs
    (["cluster.device=cuda", "scorer.num_gpus_per_worker=1"], "learner.num_gpus_per_rank"),  # learner without GPU
    (["cluster.device=cuda", "scorer.num_gpus_per_worker=1", "learner.num_gpus_per_rank=0.5"], "NCCL"),
    (["cluster.device=cuda", "learner.num_gpus_per_rank=1"], "scorer.num_gpus_per_worker"),
    (["cluster.device=cuda", "scorer.num_gpus_per_worker=0.5", "learner.num_gpus_per_rank=1",
      "teacher.mode=live", "sync.transport=nccl"], "scorer.num_gpus_per_worker' = 0.5 with sync.transport=nccl"),
    (["model.max_model_len=64", "rollout.max_tokens=64"], "model.max_model_len"),
    (["eval.every=2", "model.max_model_len=128", "eval.max_tokens=128"], "eval.max_tokens"),
])
def test_inconsistent_resources_are_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(str(REPO_ROOT / "configs" / "local.yaml"), overrides, check_data=False)


def test_resource_totals_follow_the_config():
    lines = validate_config(
        str(REPO_ROOT / "configs" / "qwen3-1.7b.yaml"),
        ["rollout.num_workers=3", "rollout.tensor_parallel_size=2", "scorer.num_gpus_per_worker=0.5"],
        check_data=False,
    )
    # rollout 3 x 2 GPUs + scorer 0.5 + learner 2 x 1; CPUs 3 x 4 + 2 + 2 x 4.
    assert any("needs 8.5 GPUs, 22 CPUs" in line for line in lines), lines


def test_capacity_shortfall_names_what_is_missing_against_the_sums_of_the_roles():
    from opsd.launch.resources import capacity_shortfall, check_local_capacity

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["learner.resources={opsd_learner: 1.5}"])
    # tiny.yaml, role by role: rollout 1 x 1 CPU, scorer 1 x 0.5, learner 2 x 0.25 (and 1.5 opsd_learner each).
    cpus = 1 * 1 + 1 * 0.5 + 2 * 0.25
    assert capacity_shortfall(cfg, {"CPU": cpus, "opsd_learner": 3.0}) is None  # exactly enough
    short = capacity_shortfall(cfg, {"CPU": cpus - 0.5, "opsd_learner": 3.0})
    assert short.startswith(f"the run's actors need {cpus:g} CPUs (the cluster has {cpus - 0.5:g}):"), short
    assert "learner.num_cpus_per_rank" in short and "GPUs" not in short
    short = capacity_shortfall(cfg, {"CPU": 8.0})
    assert "3 of the custom resource 'opsd_learner' (the cluster has 0" in short and "CPUs" not in short
    assert "2 learner x 0.25 CPU / 0 GPU / 1.5 opsd_learner" in short
    # Before a local cluster starts: its CPUs are cluster.num_cpus, and it has no custom resources.
    with pytest.raises(ConfigError, match="custom resource 'opsd_learner'"):
        check_local_capacity(load_config(REPO_ROOT / "configs" / "tiny.yaml", ["learner.resources={opsd_learner: 1}",
                                                                              "cluster.num_cpus=8"]))
    with pytest.raises(ConfigError, match=r"need 2 CPUs \(the cluster has 1\)"):
        check_local_capacity(load_config(REPO_ROOT / "configs" / "tiny.yaml", ["cluster.num_cpus=1"]))
    check_local_capacity(load_config(REPO_ROOT / "configs" / "tiny.yaml", ["cluster.num_cpus=2"]))
    # No cluster.num_cpus: Ray counts the machine's CPUs, so only custom resources are known short.
    check_local_capacity(load_config(REPO_ROOT / "configs" / "tiny.yaml", ["cluster.num_cpus=null",
                                                                          "learner.num_cpus_per_rank=64"]))


def test_short_context_is_noted():
    lines = validate_config(str(REPO_ROOT / "configs" / "qwen3-8b.yaml"), ["model.max_model_len=3000"], check_data=False)
    assert any("capped at" in line and "952 tokens" in line for line in lines), lines


def test_model_path_kinds(tmp_path, nothing_fetched):
    local = str(REPO_ROOT / "configs" / "local.yaml")

    def model_line(path):
        return next(l for l in validate_config(local, [f"model.path={path}"], check_data=False) if l.startswith("model:"))

    assert "Hugging Face hub id" in model_line("Qwen/Qwen3-1.7B")
    assert "tiny" in model_line("tiny")
    assert "SmolLM2-135M-Instruct" in model_line("smollm2-135m") and "Apache-2.0" not in model_line("tiny")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_line(tmp_path / "m.gguf") == f"model: GGUF file {tmp_path / 'm.gguf'} (imported once into artifacts/gguf/ on first use)"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    # What train would refuse, validate refuses: a directory with a config and no weights.
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        model_line(model_dir)
    with pytest.raises(ConfigError, match="no config.json"):
        model_line(tmp_path.parent)
    for bad in ("org/name/extra", "./not/here", "just-a-name"):
        with pytest.raises(ConfigError, match="model.path"):
            model_line(bad)


def test_cli_skip_data_flag(capsys, nothing_fetched):
    recipe = str(REPO_ROOT / "configs" / "qwen3-1.7b.yaml")
    assert main(["validate", recipe, "--skip-data"]) == 3  # its hub model is not in this machine's cache
    assert "needs 4 GPUs, 14 CPUs" in capsys.readouterr().out
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "/data/opsd/math_train.jsonl" in err and err.strip().endswith("opsd validate --skip-data checks the rest of the config without the data")


def test_validate_starts_and_imports_nothing_heavy():
    code = (
        "import sys; from opsd.launch.validate import validate_config; "
        "validate_config('configs/local.yaml', []); "
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- teacher.model ------------------------------------------------------------------------------


def test_a_teacher_of_the_same_tokenizer_validates(tiny_model, teacher_model):
    lines = validate_config(str(REPO_ROOT / "configs" / "tiny.yaml"), [f"teacher.model={teacher_model}"],
                            check_data=False)
    assert f"teacher: local directory {teacher_model}" in lines
    assert any(line.startswith("teacher: the student's tokenizer (") and "'<|im_end|>' (id 2)" in line
               for line in lines), lines
    assert lines[-1] == "ok"


def test_a_teacher_of_another_vocabulary_is_refused_naming_both_sizes(tmp_path, tiny_model):
    from transformers import AutoTokenizer, Qwen3Config

    from opsd.assets.tiny import build_tokenizer

    other = build_tokenizer([f"a corpus of its own, line {i}" for i in range(50)], vocab_size=300)
    other.save_pretrained(tmp_path)
    Qwen3Config(vocab_size=300).save_pretrained(tmp_path)
    student = len(AutoTokenizer.from_pretrained(tiny_model))
    with pytest.raises(ConfigError) as err:
        validate_config(str(REPO_ROOT / "configs" / "tiny.yaml"), [f"teacher.model={tmp_path}"], check_data=False)
    assert str(err.value).startswith(f"config key 'teacher.model' = '{tmp_path}' has another tokenizer")
    assert f"another vocabulary: the teacher's has {len(other):,} tokens, the student's {student:,}" in str(err.value)


def test_a_teacher_not_made_yet_is_not_passed_as_checked(tmp_path, teacher_model, monkeypatch):
    monkeypatch.setenv("OPSD_TINY_DIR", str(tmp_path / "not-built"))  # the named tiny model, not built here
    lines = validate_config(str(REPO_ROOT / "configs" / "tiny.yaml"),
                            [f"model.path={teacher_model}", "teacher.model=tiny"], check_data=False)
    assert "teacher: cannot check without fetching: the teacher's tokenizer against the student's (tiny is built " \
           "on first use)" in lines
    assert lines[-1] == ("cannot check without fetching: the teacher's tokenizer against the student's (tiny is "
                         "built on first use)")
    assert not (tmp_path / "not-built").exists()  # validate made nothing


def test_the_distillation_recipe_offline_says_it_cannot_check_the_teacher(tmp_path):
    """configs/qwen3-1.7b-from-8b.yaml names two hub ids: with an empty hub cache and no network,
    validate answers "cannot check without fetching" for the teacher's tokenizer, never plain ok."""
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "opsd.launch.cli", "validate", "configs/qwen3-1.7b-from-8b.yaml",
                          "--skip-data"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr  # the third answer: cannot check without fetching
    lines = out.stdout.splitlines()
    assert "teacher: Qwen/Qwen3-8B (Hugging Face hub id; fetched where the job runs)" in lines
    assert any(line.startswith("teacher: cannot check without fetching: the teacher's tokenizer against the "
                               "student's (Qwen/Qwen3-1.7B") for line in lines), lines
    assert lines[-1].startswith("cannot check without fetching") and "ok" not in lines, lines


def test_the_distillation_recipe_is_the_1_7b_recipe_with_the_8b_teacher():
    from omegaconf import OmegaConf

    def settings(name):
        return OmegaConf.to_container(load_config(REPO_ROOT / "configs" / name))

    student, distil = settings("qwen3-1.7b.yaml"), settings("qwen3-1.7b-from-8b.yaml")
    assert (distil["teacher"].pop("model"), distil["teacher"].pop("context")) == ("Qwen/Qwen3-8B", "none")
    del student["teacher"]["model"], student["teacher"]["context"]
    assert distil == student
