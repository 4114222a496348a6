from pathlib import Path

import pytest

from opsd.config import REPO_ROOT, Config, ConfigError, actor_threads, check, dtype_note, load_config, lora_note
from opsd.dtypes import cpu_bf16_instructions


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def _opsd(cfg):
    from opsd.objectives import objective

    return objective("opsd").options(cfg)


# --- layering -------------------------------------------------------------------------------


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    ref = Config()
    assert cfg.train.steps == ref.train.steps == 6
    assert cfg.scorer.topk == ref.scorer.topk == 64
    assert cfg.teacher.mode == "fixed"
    assert _opsd(cfg).beta == 0.5
    assert list(cfg.learner.betas) == [0.9, 0.999]
    assert cfg.run_dir is None


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 11\n  seed: 5\nobjectives:\n  opsd:\n    beta: 0.25\n")
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.seed, _opsd(cfg).beta) == (11, 5, 0.25)
    assert cfg.train.prompts_per_step == Config().train.prompts_per_step  # untouched key keeps default

    cfg = load_config(path, ["train.steps=13", "objectives.opsd.support=topk_tail"])
    assert cfg.train.steps == 13  # command line beats the file
    assert cfg.train.seed == 5  # the file still beats the default
    assert _opsd(cfg).support == "topk_tail"


def test_command_line_values_are_converted_to_the_field_type():
    cfg = load_config(None, ["objectives.opsd.beta=1", "logging.wandb=true", "train.resume=/x/y"])
    assert isinstance(_opsd(cfg).beta, float) and _opsd(cfg).beta == 1.0
    assert cfg.logging.wandb is True
    assert cfg.train.resume == "/x/y"


# --- wrong keys, wrong types, bad syntax ----------------------------------------------------


def test_unknown_key_on_command_line_names_it():
    msg = _error(None, ["train.stepz=3"])
    assert "train.stepz" in msg and "command line" in msg


def test_unknown_key_in_yaml_names_it_and_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  stepz: 3\n")
    msg = _error(path)
    assert "train.stepz" in msg and str(path) in msg


def test_unknown_top_level_section_is_named():
    assert "trian" in _error(None, ["trian.steps=3"])


@pytest.mark.parametrize("override,key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("objectives.opsd.beta=abc", "objectives.opsd.beta"),
    ("loss.beta=abc", "objectives.opsd.beta"),  # an old key is named by its new name
    ("model.lora.r=x", "model.lora.r"),
    ("learner.betas=[0.9,abc]", "learner.betas"),
    ("model.max_model_len=null", "model.max_model_len"),
    # A scalar where a section belongs: OmegaConf alone reports this without the key.
    ("train=3", "'train'"),
    ("model.lora=abc", "model.lora"),
])
def test_wrong_type_on_command_line_names_the_key(override, key):
    assert key in _error(None, [override])


@pytest.mark.parametrize("text,key", [
    ("train:\n  steps: abc\n", "train.steps"),
    ("train:\n  steps: [1, 2]\n", "train.steps"),
    ("model:\n  lora: 5\n", "model.lora"),
    ("train: [1]\n", "'train'"),
    # A mapping where a list belongs: a bare TypeError from OmegaConf before the fix.
    ("model:\n  lora:\n    target_modules: {a: 1}\n", "model.lora.target_modules"),
])
def test_wrong_type_in_yaml_names_the_key(tmp_path, text, key):
    msg = _error(_write(tmp_path, text))
    assert key in msg


@pytest.mark.parametrize("item", ["train.steps", "=3", "train.steps 3"])
def test_override_without_equals_is_rejected(item):
    msg = _error(None, [item])
    assert repr(item) in msg and "key=value" in msg


def test_yaml_whose_top_level_is_a_list_names_the_file(tmp_path):
    path = _write(tmp_path, "- train\n- steps\n", name="listy.yaml")
    msg = _error(path)
    assert str(path) in msg and "mapping" in msg


def test_invalid_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "train: [\n", name="broken.yaml")
    assert str(path) in _error(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "cfg.yaml"
    msg = _error(path)
    assert str(path) in msg and "not found" in msg


def test_empty_yaml_means_all_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")).train.steps == Config().train.steps


# --- choices and values ---------------------------------------------------------------------


@pytest.mark.parametrize("override,key,allowed", [
    ("objectives.opsd.support=foo", "objectives.opsd.support", ["topk", "topk_tail"]),
    ("teacher.mode=bar", "teacher.mode", ["fixed", "live", "ema"]),
    ("algo=ppo", "algo", ["opsd", "grpo", "sft"]),
    ("learner.zero_stage=4", "learner.zero_stage", ["0", "1", "2", "3"]),
])
def test_invalid_choice_names_key_and_allowed_values(override, key, allowed):
    msg = _error(None, [override])
    assert f"'{key}'" in msg
    bad = override.split("=", 1)[1]
    assert bad in msg
    for choice in allowed:
        assert choice in msg


@pytest.mark.parametrize("override,key", [
    ("objectives.opsd.beta=1.5", "objectives.opsd.beta"),
    ("objectives.opsd.beta=-0.1", "objectives.opsd.beta"),
    ("loss.temperature=0", "loss.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("teacher.ema_decay=1.0", "teacher.ema_decay"),
    ("scorer.topk=0", "scorer.topk"),
    ("rollout.n=0", "rollout.n"),
    ("rollout.temperature=-1", "rollout.temperature"),
    ("objectives.opsd.token_clip=0", "objectives.opsd.token_clip"),
    ("objectives.opsd.anchor=-1", "objectives.opsd.anchor"),
    ("eval.n=0", "eval.n"),
    ("eval.temperature=-0.5", "eval.temperature"),
    ("rollout.num_threads=0", "rollout.num_threads"),
    ("learner.num_threads=-2", "learner.num_threads"),
])
def test_out_of_range_values_name_the_key(override, key):
    assert f"'{key}'" in _error(None, [override])


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["objectives.opsd.beta=0", "rollout.temperature=0", "loss.skip_first=0", "rollout.top_p=1"])
    assert _opsd(cfg).beta == 0.0
    cfg = load_config(None, ["objectives.opsd.beta=1"])
    assert _opsd(cfg).beta == 1.0


# --- impossible combinations ----------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["teacher.mode=fixed", "teacher.sync_every=2"], "teacher.sync_every"),
    (["teacher.mode=live", "teacher.sync_every=3"], "teacher.sync_every"),
    (["sync.transport=nccl", "cluster.device=cpu"], "sync.transport"),
    (["sync.timeout_s=0"], "sync.timeout_s"),
    # vLLM's logprobs are at temperature 1: a ratio on them needs the loss there too.
    (["algo=grpo", "rollout.n=4", "objectives.grpo.old_logprobs=rollout", "loss.temperature=0.7"], "loss.temperature"),
    # With the learner's own old log-probs the gradient is the sampler's: same temperature.
    (["algo=grpo", "rollout.n=4", "loss.temperature=0.7"], "loss.temperature"),
    (["algo=grpo", "rollout.n=4", "rollout.max_staleness=1"], "rollout.max_staleness"),
    (["algo=kd", "objectives.kd.objective=sampled_token"], "objectives.kd.objective"),
    (["algo=kd", "objectives.kd.source=samples"], "objectives.kd.source"),
    (["objectives.opsd.objective=sampled_token", "objectives.opsd.is_clip=2", "loss.temperature=0.7"], "loss.temperature"),
    (["algo=grpo", "rollout.n=4", "objectives.grpo.kl_coef=0.1", "teacher.mode=live"], "teacher.mode"),
    # The anchor is scored by the scorer's weights: the initial policy only when they are fixed.
    (["objectives.opsd.anchor=0.1", "teacher.mode=live"], "teacher.mode"),
    (["objectives.opsd.anchor=0.1", "teacher.mode=ema"], "teacher.mode"),
    (["algo=grpo", "rollout.n=1"], "rollout.n"),
    (["learner.zero_stage=0", "learner.num_ranks=2"], "learner.zero_stage"),
    (["eval.n=4", "eval.temperature=0"], "eval.n"),
    (["rollout.tensor_parallel_size=2", "cluster.device=cpu"], "rollout.tensor_parallel_size"),
    # vLLM's prompt log-probs are at temperature 1, and the EMA lives in the transformers scorer.
    (["scorer.backend=vllm", "loss.temperature=0.7"], "scorer.backend"),
    (["scorer.backend=vllm", "teacher.mode=ema"], "scorer.backend"),
    (["scorer.on_rollout_engines=true", "teacher.mode=fixed"], "scorer.on_rollout_engines"),
    (["scorer.on_rollout_engines=true", "teacher.mode=ema"], "scorer.on_rollout_engines"),
    (["scorer.on_rollout_engines=true", "teacher.mode=live", "loss.temperature=0.7"], "scorer.on_rollout_engines"),
    # A push that holds the LoRA adapter alone: only vLLM engines outside a collective group take it,
    # never the head's adapter (prompt log-probs would not apply it per token).
    (["model.lora.serve=adapter"], "model.lora.serve"),
    (["model.lora.enabled=true", "model.lora.serve=adapter", "sync.transport=gloo"], "model.lora.serve"),
    (["model.lora.enabled=true", "model.lora.serve=adapter", "teacher.mode=live"], "model.lora.serve"),
    (["model.lora.enabled=true", "model.lora.serve=adapter", "model.lora.target_modules=[q_proj,lm_head]"],
     "model.lora.target_modules"),
    (["model.lora.enabled=true", "model.lora.serve=adapter", "model.lora.r=1024"], "model.lora.r"),
    (["model.lora.enabled=true", "model.lora.serve=bf16"], "model.lora.serve"),
    (["model.lora.enabled=true", "scorer.on_rollout_engines=true", "teacher.mode=fixed"], "scorer.on_rollout_engines"),
])
def test_impossible_combination_names_the_key(overrides, key):
    assert f"'{key}'" in _error(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["teacher.mode=ema", "teacher.sync_every=2"],
    ["algo=grpo", "rollout.n=2"],
    ["learner.zero_stage=0", "learner.num_ranks=1"],
    ["eval.n=4", "eval.temperature=0.7"],
    ["objectives.opsd.objective=sampled_token", "loss.temperature=0.7"],  # no ratio without is_clip
    ["algo=grpo", "rollout.n=4", "objectives.grpo.kl_coef=0.1"],
    ["algo=grpo", "rollout.n=8", "rollout.temperature=1.1", "loss.temperature=1.1"],
    ["algo=grpo", "rollout.n=4", "objectives.grpo.old_logprobs=rollout", "rollout.max_staleness=1"],
    ["algo=kd"],
    ["algo=kd", "objectives.kd.source=teacher_samples", "objectives.kd.support=topk_tail", "objectives.kd.beta=0"],
    ["objectives.opsd.anchor=0.1"],
    ["scorer.backend=vllm"],
    ["scorer.backend=vllm", "teacher.mode=live"],
    ["scorer.on_rollout_engines=true", "teacher.mode=live"],
    ["model.lora.enabled=true", "model.lora.serve=adapter"],  # a fixed teacher on scorer actors
    ["model.lora.enabled=true", "model.lora.serve=adapter", "scorer.on_rollout_engines=true"],
    ["model.lora.enabled=true", "model.lora.serve=adapter", "scorer.on_rollout_engines=true", "teacher.mode=live"],
    ["model.lora.enabled=true", "model.lora.serve=adapter", "scorer.backend=vllm", "teacher.mode=live"],
    ["model.lora.enabled=true", "model.lora.serve=adapter", "sync.transport=in_place"],
])
def test_the_possible_neighbours_of_those_combinations_load(overrides):
    load_config(None, overrides)


def test_topk_is_checked_against_the_vocabulary_size():
    cfg = load_config(None, ["scorer.topk=64"])
    check(cfg, vocab_size=64)  # equal is fine
    check(cfg)  # unknown vocabulary: nothing to check
    with pytest.raises(ConfigError) as info:
        check(cfg, vocab_size=63)
    assert "'scorer.topk'" in str(info.value) and "63" in str(info.value)


def test_check_accepts_a_plain_dataclass():
    check(Config())
    bad = Config()
    bad.teacher.mode = "nope"
    with pytest.raises(ConfigError, match="teacher.mode"):
        check(bad)


# --- shipped configs ------------------------------------------------------------------------


SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_local_config_is_shipped():
    assert REPO_ROOT / "configs" / "local.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.algo in ("opsd", "grpo", "sft")


@pytest.mark.parametrize("flags, device, expected", [
    ("fpu sse avx2 amx_bf16 amx_tile", "cpu", "bfloat16"),
    ("fpu avx2 avx512f avx512_bf16", "cpu", "bfloat16"),
    ("fpu avx2 avx512f", "cpu", "float32"),  # AVX-512 without its bf16 extension is not enough
    ("fpu avx2", "cuda", "bfloat16"),
])
def test_auto_dtype_reads_the_cpu_flags(tmp_path, monkeypatch, flags, device, expected):
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    cfg = load_config(None, ["model.dtype=auto", f"cluster.device={device}"])
    assert cfg.model.dtype == expected
    note = dtype_note(load_config(None, ["model.dtype=bfloat16", f"cluster.device={device}"]))
    assert (note is not None) == (expected == "float32") and (note is None or "model.dtype=bfloat16" in note)


@pytest.mark.parametrize("overrides,warned", [
    (["model.lora.enabled=true", "model.lora.serve=adapter"], True),
    (["model.lora.enabled=true", "model.lora.serve=adapter", "cluster.device=cuda"], False),
    (["model.lora.enabled=true"], False),
])
def test_lora_adapters_on_cpu_engines_come_with_a_warning(overrides, warned):
    note = lora_note(load_config(None, overrides))
    assert (note is not None) == warned and (note is None or "model.lora.serve=merged" in note)


def test_local_config_values_take_effect():
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml")
    # dtype: auto, resolved when loaded: bfloat16 only where this CPU has bf16 matmul instructions.
    assert cfg.model.path == "smollm2-135m" and cfg.model.dtype == ("bfloat16" if cpu_bf16_instructions() else "float32")
    assert cfg.rollout.max_tokens == 64  # the file says 64, the default is 96
    assert cfg.grading.extract == "lenient"  # the default is strict
    assert cfg.data.train_path == "data/wordproblems/train.jsonl"


def test_string_overrides_are_taken_as_written():
    # A template is a mapping or a syntax error to YAML; for a string key it is the text given.
    cfg = load_config(None, ["prompt.teacher_system=Ref: {solution}", "prompt.teacher_template={problem}\n{solution}",
                             "run_dir=123", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.prompt.teacher_system == "Ref: {solution}"
    assert cfg.prompt.teacher_template == "{problem}\n{solution}"
    assert cfg.run_dir == "123" and list(cfg.model.lora.target_modules) == ["q_proj", "v_proj"]
    assert load_config(None, ["prompt.teacher_system=null"]).prompt.teacher_system is None


def test_a_template_with_an_unknown_field_names_the_key():
    with pytest.raises(ConfigError, match=r"'prompt.teacher_template': KeyError 'answer'.*\{problem\}, \{solution\}"):
        load_config(None, ["prompt.teacher_template={problem} {answer}"])


def test_tiny_config_is_the_fast_debug_run():
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    assert cfg.model.path == "tiny" and cfg.rollout.kv_cache_mb == 256 and cfg.eval.every == 3


def test_actor_threads_default_to_the_whole_cpus_ray_reserved():
    # A fractional reservation shares a core: one thread, never zero.
    assert [actor_threads(None, c) for c in (0.25, 0.5, 1.0, 1.5, 2.0, 8.0)] == [1, 1, 1, 1, 2, 8]
    assert actor_threads(3, 0.5) == 3  # set explicitly: taken as written
    assert load_config(None, ["scorer.num_threads=2"]).scorer.num_threads == 2
    with pytest.raises(ConfigError, match="'scorer.num_threads'"):
        load_config(None, ["scorer.num_threads=1.5"])


# --- an objective's own options (objectives.<name>) and the keys that moved there ----------------


def test_an_objectives_options_are_typed_by_its_declaration():
    from opsd.objectives import objective

    cfg = load_config(None, ["algo=grpo", "rollout.n=2", "objectives.grpo.clip_high=1", "objectives.opsd.beta=0"])
    grpo = objective("grpo").options(cfg)
    assert isinstance(grpo.clip_high, float) and grpo.clip_high == 1.0 and grpo.clip_low == 0.2
    assert objective("opsd").options(cfg).beta == 0.0  # a section of another registered objective is checked too
    msg = _error(None, ["objectives.grpo.clip_hi=0.3"])
    assert "'objectives.grpo.clip_hi'" in msg and "['clip_low', 'clip_high', 'kl_coef', 'old_logprobs']" in msg
    assert "'objectives.grpo.kl_coef'" in _error(None, ["algo=grpo", "rollout.n=2", "objectives.grpo.kl_coef=lots"])
    assert "'objectives.ppo'" in _error(None, ["objectives.ppo.clip=1"])
    assert "has no options" in _error(None, ["objectives.sft.beta=1"])


@pytest.mark.parametrize("algo,old,new,value", [
    ("opsd", "loss.beta", "opsd.beta", 0.0),
    ("opsd", "loss.objective", "opsd.objective", "sampled_token"),
    ("opsd", "loss.divergence_clip", "opsd.divergence_clip", 0.05),
    ("kd", "loss.support", "kd.support", "topk_tail"),
    ("kd", "kd.source", "kd.source", "teacher_samples"),
    ("grpo", "loss.clip_high", "grpo.clip_high", 0.28),
    ("grpo", "loss.kl_coef", "grpo.kl_coef", 0.05),
    ("grpo", "loss.old_logprobs", "grpo.old_logprobs", "rollout"),
    ("contrastive", "loss.contrast_tau", "contrastive.tau", 0.05),
    ("contrastive", "loss.clip_low", "contrastive.clip_low", 0.1),
])
def test_an_old_key_is_read_as_the_new_one_with_one_note(algo, old, new, value):
    from opsd.config import notes
    from opsd.objectives import objective

    extra = {"grpo": ["rollout.n=2"] + (["loss.temperature=1"] if "old_logprobs" in old else []),
             "contrastive": ["rollout.n=2", "teacher.context=contrastive"]}.get(algo, [])
    cfg = load_config(None, [f"algo={algo}", *extra, f"{old}={value}"])
    name, option = new.split(".")
    assert getattr(objective(name).options(cfg), option) == value
    found = [n for n in notes(cfg) if "old config keys" in n]
    assert len(found) == 1 and f"{old} -> objectives.{new}" in found[0]


def test_an_old_key_of_another_objective_is_dropped_as_it_had_no_effect(tmp_path):
    from opsd.config import notes

    path = _write(tmp_path, "loss:\n  clip_low: 0.3\n  beta: 0.25\n")
    cfg = load_config(path, ["algo=opsd"])
    assert cfg.objectives.opsd.beta == 0.25 and "grpo" not in cfg.objectives
    (note,) = [n for n in notes(cfg) if "old config keys" in n]
    assert "loss.clip_low (no option of algo=opsd" in note and "loss.beta -> objectives.opsd.beta" in note
    assert not [n for n in notes(load_config(None, ["objectives.opsd.beta=0.25"])) if "old config keys" in n]


def test_an_old_key_and_its_new_key_together_are_refused_naming_both():
    msg = _error(None, ["loss.beta=0.1", "objectives.opsd.beta=0.2"])
    assert "'loss.beta'" in msg and "'objectives.opsd.beta'" in msg


def test_the_finished_experiments_recipes_still_load():
    """docs/results/*: the comparison's per-method overrides and the configs they ran on (the
    rows that distil from the SFT teacher given a model reference in place of its weights)."""
    from opsd.benchmarks.comparison import ALL_METHODS, ComparisonSpec, method_overrides

    spec = ComparisonSpec()
    for config in ("configs/local.yaml", "configs/gsm8k.yaml"):
        for method in ALL_METHODS:
            overrides = [o for o in method_overrides(spec, method, 0, 0.7, bare_train="data/toy/train.jsonl",
                                                     teacher_model="tiny")
                         if not o.startswith("data.train_path=")]
            load_config(config, overrides)


# --- teacher.model: another model as the teacher ----------------------------------------------


def test_teacher_model_defaults_to_the_student_and_takes_a_model_reference():
    assert load_config().teacher.model is None
    for ref in ("tiny", "Qwen/Qwen3-8B", "/models/teacher", "teacher.gguf"):
        cfg = load_config(None, [f"teacher.model={ref}", "teacher.context=none"])
        assert cfg.teacher.model == ref and cfg.teacher.context == "none"


@pytest.mark.parametrize("overrides, key, remedy", [
    (["teacher.mode=live"], "'teacher.mode' = live", "set teacher.mode=fixed"),
    (["teacher.mode=ema"], "'teacher.mode' = ema", "set teacher.mode=fixed"),
    (["teacher.mode=live", "scorer.on_rollout_engines=true"], "'teacher.mode' = live", "set teacher.mode=fixed"),
    (["scorer.on_rollout_engines=true", "model.lora.enabled=true", "model.lora.serve=adapter"],
     "'scorer.on_rollout_engines' = true", "set scorer.on_rollout_engines=false"),
    (["algo=grpo", "rollout.n=2", "loss.kl_coef=0.01"], "'teacher.model' = 'other' with algo=grpo",
     "set objectives.grpo.kl_coef=0"),
    (["algo=kd", "kd.source=teacher_samples"], "'teacher.model' = 'other' with algo=kd", "use objectives.kd.source=reference"),
    (["algo=grpo", "rollout.n=2"], "'teacher.model' is set with algo=grpo, which scores nothing",
     "unset teacher.model"),
    (["algo=sft"], "'teacher.model' is set with algo=sft, which scores nothing", "unset teacher.model"),
], ids=["live", "ema", "live-on-engines", "fixed-on-engines", "grpo-kl-reference", "kd-teacher-samples", "grpo-no-kl",
        "sft"])
def test_what_assumes_the_teacher_is_the_student_is_refused_naming_the_key(overrides, key, remedy):
    message = _error(None, ["teacher.model=other", *overrides])
    assert f"config key {key}" in message and remedy in message, message
    load_config(None, overrides)  # each is fine with the student as its own teacher


@pytest.mark.parametrize("overrides", [
    [], ["teacher.context=none"], ["scorer.backend=vllm"], ["algo=kd"], ["algo=contrastive", "rollout.n=2",
                                                                         "teacher.context=contrastive"],
    ["model.lora.enabled=true"], ["model.lora.enabled=true", "model.lora.serve=adapter"],
], ids=["opsd", "context-none", "vllm-scorer", "kd-reference", "contrastive", "lora", "lora-adapter"])
def test_what_works_with_another_model_as_the_teacher(overrides):
    # LoRA's fixed teacher is the base with the adapters off; with teacher.model it is that model.
    assert load_config(None, ["teacher.model=other", *overrides]).teacher.model == "other"


def test_an_empty_teacher_model_names_the_key():
    assert "'teacher.model' is empty" in _error(None, ["teacher.model=''"])
