"""benchmarks/comparison.py without training: the report's arithmetic on hand-made runs, and the
skip-what-is-finished bookkeeping."""

from __future__ import annotations

import json

import pytest

from opsd.benchmarks.comparison import (
    READS_TEACHER, ComparisonSpec, keep_teacher, method_overrides, run_order, summarize, table, teacher_of,
    teacher_path, weights_sha256, write_report,
)


def record(method: str, seed: int, accs: list[float], tokens_per_step: int, *, base: bool = False) -> dict:
    """A run evaluated at steps 5, 10, ...; ``accs`` are those evaluations."""
    steps = [{"step": s, "tokens_generated_total": s * tokens_per_step, "wall_seconds": 2.0 * s, "kl_sampled": 0.1,
              "response_len_mean": 30.0, "reward_mean": 0.2, "engine_mismatch": None, "clip_frac_rollout": None}
             for s in range(1, 5 * len(accs) + 1)]
    evals = [{"step": 5 * (i + 1), "tokens": 5 * (i + 1) * tokens_per_step, "wall_seconds": 10.0 * (i + 1),
              "accuracy": a, "format_rate": 0.5, "response_len": 30.0} for i, a in enumerate(accs)]
    if base:
        evals.insert(0, {"step": 0, "tokens": 0, "wall_seconds": 0.0, "accuracy": 0.2, "format_rate": 0.0,
                         "response_len": 37.0})
    return {"method": method, "seed": seed, "run_dir": "x", "run_wall_seconds": 100.0, "steps": steps, "evals": evals}


def with_base(r: dict) -> dict:
    return {**r, "evals": [{"step": 0, "tokens": 0, "wall_seconds": 0.0, "accuracy": 0.2}] + r["evals"]}


def test_token_ratio_on_the_mean_curves_and_seed_by_seed():
    by = {
        # GRPO: 100 tokens a step; seed 0 ends at 0.40, seed 1 at 0.30 (mean 0.35).
        "grpo": [with_base(record("grpo", 0, [0.30, 0.40], 100)), with_base(record("grpo", 1, [0.30, 0.30], 100))],
        # OPSD: 20 tokens a step, reaches 0.40 at its first evaluation.
        "opsd_fixed": [with_base(record("opsd_fixed", 0, [0.40, 0.40], 20)),
                       with_base(record("opsd_fixed", 1, [0.30, 0.35], 20))],
    }
    s = summarize(by)
    assert s["grpo_final_accuracy_mean"] == pytest.approx(0.35)
    g, o = s["methods"]["grpo"], s["methods"]["opsd_fixed"]
    assert g["final_accuracy_mean"] == pytest.approx(0.35) and g["final_accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    # Mean GRPO curve: 0.2 (0 tokens), 0.30 (500), 0.35 (1000): reaches 0.35 at 1000 tokens.
    assert g["tokens_to_grpo_final"] == pytest.approx(1000)
    # Mean OPSD curve: 0.2 (0), 0.35 (100): 0.35 at 100 tokens -> ratio 0.1.
    assert o["tokens_to_grpo_final"] == pytest.approx(100) and o["token_ratio_vs_grpo"] == pytest.approx(0.1)
    # Seed 0: GRPO reaches its 0.40 at 1000 tokens, OPSD at 100 -> 0.1. Seed 1: GRPO's 0.30 at
    # 500 tokens (its first evaluation); OPSD's 0.30 also at its first, 100 tokens -> 0.2.
    assert o["token_ratio_per_seed"] == pytest.approx([0.1, 0.2])
    assert g["token_ratio_per_seed"] == pytest.approx([1.0, 1.0])
    text = table({"summary": s, "spec": {"eval_problems": 200}, "extract": "lenient"})
    assert "0.15 ± 0.07 (2)" in text  # the per-seed ratios, mean ± std


def test_a_method_that_generates_nothing_has_no_token_ratio():
    by = {"grpo": [with_base(record("grpo", 0, [0.30], 100))], "sft": [with_base(record("sft", 0, [0.35], 0))]}
    s = summarize(by)
    assert s["methods"]["sft"]["token_ratio_vs_grpo"] is None and s["methods"]["sft"]["token_ratio_per_seed"] == []


def test_the_kl_column_is_left_empty_where_the_tokens_are_not_the_students_samples():
    by = {"opsd_fixed": [with_base(record("opsd_fixed", 0, [0.3], 20))],
          "kd_reference": [with_base(record("kd_reference", 0, [0.3], 0))],
          "srpo": [with_base(record("srpo", 0, [0.3], 20))]}  # a hybrid: OPSD's teacher scores its samples
    s = summarize(by)
    assert s["methods"]["opsd_fixed"]["kl_sampled_last"] == pytest.approx(0.1)
    assert s["methods"]["srpo"]["kl_sampled_last"] == pytest.approx(0.1)
    assert s["methods"]["kd_reference"]["kl_sampled_first"] is None and s["methods"]["kd_reference"]["kl_sampled_last"] is None
    row = next(line for line in table({"summary": s, "spec": {"eval_problems": 200}, "extract": "lenient"}).splitlines()
               if line.startswith("| KD (reference)"))
    assert "0.100" not in row and "— → —" in row


def test_grpo_below_the_base_makes_the_ratio_undefined():
    by = {"grpo": [with_base(record("grpo", 0, [0.10], 100))], "opsd_fixed": [with_base(record("opsd_fixed", 0, [0.3], 20))]}
    text = table({"summary": summarize(by), "spec": {"eval_problems": 200}, "extract": "lenient"})
    assert "token ratio is undefined" in text


def test_the_shared_step_zero_point_goes_in_front_of_every_run(tmp_path):
    spec = ComparisonSpec(seeds=1, methods=["grpo", "opsd_fixed"])
    records = [record("grpo", 0, [0.30], 100, base=True), record("opsd_fixed", 0, [0.40], 20)]
    report = write_report(spec, records, "lenient", tmp_path, 1.0)
    assert report["summary"]["base_accuracy"] == 0.2
    assert report["summary"]["methods"]["opsd_fixed"]["tokens_to_grpo_final"] == pytest.approx(0.1 / 0.2 * 100)
    assert json.loads((tmp_path / "comparison.json").read_text())["runs_done"] == 2
    assert (tmp_path / "comparison.png").stat().st_size > 0 and "GRPO" in (tmp_path / "comparison.md").read_text()


def test_every_method_has_its_overrides_and_grpo_samples_eight_at_the_sampling_temperature():
    from opsd.config import REPO_ROOT, load_config, notes
    from opsd.launch.stages import stage_configs

    spec = ComparisonSpec()
    for m in spec.methods:
        cfg = load_config(REPO_ROOT / spec.config, method_overrides(spec, m, 1, 0.7, teacher_model="/teacher"))
        assert cfg.train.steps == spec.steps and cfg.train.seed == 1 and cfg.eval.max_problems == 200
        assert (m in READS_TEACHER) == (cfg.teacher.model == "/teacher"), m
        # The harness writes today's keys: a recipe on an old key would print the rename note on every run.
        for c in [cfg] + [c for _, c in (stage_configs(cfg) if cfg.stages else [])]:
            assert not [n for n in notes(c) if "old config keys" in n], m
    grpo = load_config(REPO_ROOT / spec.config, method_overrides(spec, "grpo", 0, 0.7))
    assert (grpo.rollout.n, grpo.train.prompts_per_step, grpo.loss.temperature) == (8, 2, 0.7)
    assert grpo.rollout.n * grpo.train.prompts_per_step == spec.rows_per_step  # equal rows per step
    with pytest.raises(ValueError, match="unknown method"):
        method_overrides(spec, "ppo", 0, 0.7)


def test_runs_go_seed_by_seed_and_answer_and_shaped_come_last():
    methods = ["opsd_fixed", "opsd_answer", "opsd_none", "opsd_shaped", "contrastive"]
    finished = {("opsd_fixed", 0), ("opsd_answer", 0), ("opsd_none", 0), ("opsd_fixed", 1)}
    assert run_order(methods, 3, finished) == [
        ("contrastive", 0), ("opsd_none", 1), ("contrastive", 1),
        ("opsd_fixed", 2), ("opsd_none", 2), ("contrastive", 2),
        ("opsd_shaped", 0), ("opsd_answer", 1), ("opsd_shaped", 1), ("opsd_answer", 2), ("opsd_shaped", 2),
    ]


# --- issue 37: the SFT teacher, OPD from it, and the staged rows ---------------------------------------


def test_the_spec_key_leaves_the_finished_runs_valid_and_the_teacher_runs_one_seed():
    """The 39 finished runs' spec.json is the key of the default spec: the new methods add rows, not
    another experiment; the teacher is trained once and runs before every other run."""
    from opsd.config import REPO_ROOT

    spec = ComparisonSpec()
    saved = json.loads((REPO_ROOT / "docs" / "results" / "smollm2" / "spec.json").read_text())
    assert spec.key() == saved
    assert spec.runs_planned() == 3 * (len(spec.methods) - 1) + 1 == 52
    finished = {(m, s) for m in spec.methods[:13] for s in range(3)}
    todo = run_order(spec.methods, spec.seeds, finished)
    assert todo[0] == ("sft_teacher", 0) and ("sft_teacher", 1) not in todo
    assert todo[1:5] == [("opd_sft", 0), ("opd_sft_solution", 0), ("sft_opsd", 0), ("sft_grpo", 0)]
    assert len(todo) == 13


def stage_table(cfg) -> list[tuple]:
    from opsd.launch.stages import stage_configs

    return [(s.name, s.algo, s.first_step, s.last_step, s.teacher, c.train.steps, c.train.prompts_per_step, c.rollout.n)
            for s, c in stage_configs(cfg)]


def test_the_staged_rows_are_sft_for_a_quarter_then_opsd_or_grpo_with_the_rows_own_settings():
    from omegaconf import OmegaConf

    from opsd.config import REPO_ROOT, load_config
    from opsd.launch.stages import stage_configs

    spec = ComparisonSpec()
    config = REPO_ROOT / spec.config

    def load(method: str):
        return load_config(config, method_overrides(spec, method, 2, 0.7))

    opsd = load("sft_opsd")
    assert stage_table(opsd) == [("sft", "sft", 0, 5, "initial", 5, 16, 1),
                                 ("opsd", "opsd", 5, 20, "stage:sft", 20, 16, 1)]
    assert opsd.logging.save_batches and opsd.train.seed == 2 and opsd.model.dtype == "float32"
    # The OPSD stage is opsd_fixed's recipe: its objective, teacher and context as that row has them.
    fixed = load("opsd_fixed")
    (_, sft), (_, distil) = stage_configs(opsd)
    for key in ("objectives.opsd", "teacher", "rollout", "loss", "learner", "prompt", "eval"):
        assert OmegaConf.to_container(OmegaConf.select(distil, key)) == OmegaConf.to_container(OmegaConf.select(fixed, key)), key
    assert OmegaConf.to_container(sft.learner) == OmegaConf.to_container(load("sft").learner)

    grpo_staged = load("sft_grpo")
    assert stage_table(grpo_staged) == [("sft", "sft", 0, 5, "initial", 5, 16, 1),
                                        ("grpo", "grpo", 5, 20, "initial", 20, 2, 8)]
    # GRPO's stage has the grpo row's settings: 8 samples of 2 prompts, its objective's options
    # (temperature, old log-probs, KL) key for key.
    grpo = load("grpo")
    _, stage = stage_configs(grpo_staged)[1]
    for key in ("objectives.grpo", "rollout", "train.prompts_per_step", "loss"):
        a, b = OmegaConf.select(stage, key), OmegaConf.select(grpo, key)
        assert (OmegaConf.to_container(a) if OmegaConf.is_config(a) else a) == \
               (OmegaConf.to_container(b) if OmegaConf.is_config(b) else b), key
    assert stage.loss.temperature == 0.7 and stage.objectives.grpo.old_logprobs == "learner"
    assert stage.objectives.grpo.kl_coef == 0


def test_the_staged_and_teacher_rows_pass_validate_on_the_quick_spec(tiny_model):
    """`opsd validate` of every new row as `opsd bench learning --quick` runs it (the tiny model, the
    word problems): the stages' configs, the model, the data and the teacher's tokenizer checked."""
    from opsd.config import REPO_ROOT
    from opsd.launch.validate import validate_config

    spec = ComparisonSpec.quick()
    for method in ("sft_teacher", "opd_sft", "opd_sft_solution", "sft_opsd", "sft_grpo"):
        lines = validate_config(str(REPO_ROOT / spec.config),
                                method_overrides(spec, method, 0, 0.7, teacher_model=tiny_model))
        assert lines[-1] == "ok", (method, lines)
        if method in READS_TEACHER:
            assert any(line.startswith("teacher:") and tiny_model in line for line in lines), lines
        if method.startswith("sft_") and method != "sft_teacher":
            assert "2 stages, 2 steps (sft 1 -> " in lines[0], lines[0]


def test_the_teacher_path_flows_into_both_opd_rows_with_their_contexts():
    from opsd.config import REPO_ROOT, load_config

    spec = ComparisonSpec()
    contexts = {}
    for method in READS_TEACHER:
        cfg = load_config(REPO_ROOT / spec.config, method_overrides(spec, method, 0, 0.7, teacher_model="/t/sft-s0"))
        assert (cfg.algo, cfg.teacher.mode, cfg.teacher.model) == ("opsd", "fixed", "/t/sft-s0")
        contexts[method] = cfg.teacher.context
    assert contexts == {"opd_sft": "none", "opd_sft_solution": "solution"}
    with pytest.raises(ValueError, match="sft_teacher"):
        method_overrides(spec, "opd_sft", 0, 0.7)


def test_the_teacher_is_kept_with_the_hash_of_its_weights_and_checked_before_it_is_read(tmp_path):
    import hashlib

    run_dir = tmp_path / "run"
    hf = run_dir / "checkpoints" / "step_20" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights")
    (run_dir / "checkpoints" / "step_20" / "learner").mkdir()
    kept = keep_teacher(run_dir, 20, tmp_path / "teachers" / "sft-s0")
    assert kept["path"] == str(tmp_path / "teachers" / "sft-s0")
    assert kept["sha256"] == hashlib.sha256(b"model.safetensors\0weights").hexdigest()
    assert not (run_dir / "checkpoints").exists()  # the optimizer state is not kept
    runs = tmp_path / "runs"
    records = [{"method": "sft", "seed": 0}, {"method": "sft_teacher", "seed": 0, "teacher_model": kept}]
    assert teacher_path(teacher_of(records), runs) == kept["path"]
    with pytest.raises(SystemExit, match="run sft_teacher first"):
        teacher_path(teacher_of(records[:1]), runs)
    (tmp_path / "teachers" / "sft-s0" / "model.safetensors").write_bytes(b"other weights")
    assert weights_sha256(tmp_path / "teachers" / "sft-s0") != kept["sha256"]
    with pytest.raises(SystemExit, match="SHA-256"):
        teacher_path(kept, runs)


def test_the_report_names_the_teacher_and_the_load_beside_each_run(tmp_path):
    spec = ComparisonSpec(seeds=1, methods=["grpo", "sft_teacher"])
    teacher = {"path": "artifacts/comparison/teachers/sft-s0", "sha256": "ab" * 32}
    records = [record("grpo", 0, [0.30], 100, base=True),
               {**record("sft_teacher", 0, [0.65], 0), "teacher_model": teacher,
                "load_average_start": [2.5, 2.0, 1.75], "load_average_end": [3.0, 2.5, 2.0], "note": "tests beside"}]
    report = write_report(spec, records, "lenient", tmp_path, 1.0)
    assert report["teacher_model"] == teacher and report["runs_planned"] == 2
    md = (tmp_path / "comparison.md").read_text()
    assert "artifacts/comparison/teachers/sft-s0" in md and "ab" * 32 in md
    assert "| sft_teacher-s0 | 0.650 | 0 | 100 | 2.50 / 2.00 / 1.75 | 3.00 / 2.50 / 2.00 | tests beside |" in md
    assert "grpo-s0 |" not in md  # a run that recorded no load has no line


def test_the_load_lines_follow_the_spec_not_the_order_the_runs_were_read(tmp_path):
    spec = ComparisonSpec(seeds=2, methods=["sft_teacher", "opd_sft", "sft_opsd"])
    loaded = {"load_average_start": [1.0, 1.0, 1.0], "load_average_end": [1.0, 1.0, 1.0]}
    records = [{**record(m, seed, [0.5], 10), **loaded}
               for m, seed in (("sft_opsd", 0), ("opd_sft", 1), ("sft_teacher", 0), ("opd_sft", 0))]
    for order in (records, records[::-1]):
        report = write_report(spec, order, "lenient", tmp_path, 1.0)
        assert [r["run"] for r in report["runs_with_load"]] == ["sft_teacher-s0", "opd_sft-s0", "opd_sft-s1",
                                                                 "sft_opsd-s0"]


def test_a_chunk_run_of_some_methods_redraws_every_methods_rows(tmp_path):
    # `--methods sft_opsd` on the project's record directory: the report keeps the other rows.
    records = [record("grpo", 0, [0.30], 100, base=True), record("sft", 0, [0.60], 0),
               record("sft_opsd", 0, [0.45], 50)]
    report = write_report(ComparisonSpec(seeds=1, methods=["sft_opsd"]), records, "lenient", tmp_path, 1.0)
    assert list(report["summary"]["methods"]) == ["grpo", "sft", "sft_opsd"]
    assert report["runs_planned"] == 3 and report["runs_done"] == 3
    assert "| SFT |" in (tmp_path / "comparison.md").read_text()


def test_the_dry_run_plans_only_the_new_rows_with_the_estimates_of_their_recipes(tmp_path):
    """On the project's 39 runs from before issue 37 (copied): they are skipped, the teacher runs
    first, and each new row is sized by the slowest finished run of the recipe it shares; nothing is
    written."""
    import shutil

    from opsd.benchmarks.comparison import TEACHER_METHODS, dry_run
    from opsd.config import REPO_ROOT

    results = REPO_ROOT / "docs" / "results" / "smollm2"
    (tmp_path / "runs").mkdir()
    shutil.copy(results / "spec.json", tmp_path / "spec.json")
    for path in (results / "runs").glob("*.json"):
        if path.stem.rsplit("-s", 1)[0] not in TEACHER_METHODS:
            shutil.copy(path, tmp_path / "runs" / path.name)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    printed = []
    rows = dry_run(ComparisonSpec(), tmp_path, log=printed.append)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert "39 of 52 runs already done" in printed[0]
    assert [r["run"] for r in rows][:2] == ["sft_teacher-s0", "opd_sft-s0"] and len(rows) == 13
    walls = {p.stem: json.loads(p.read_text())["run_wall_seconds"] for p in (tmp_path / "runs").glob("*.json")}
    slowest = {m: max(w for name, w in walls.items() if name.rsplit("-s", 1)[0] == m) for m in ("sft", "opsd_fixed", "grpo")}
    expected = {"sft_teacher": slowest["sft"], "opd_sft": slowest["opsd_fixed"], "sft_grpo": slowest["grpo"]}
    assert all(r["estimated_seconds"] == expected[r["method"]] for r in rows if r["method"] in expected)


def test_the_machine_name_tells_apart_one_cpu_model_with_and_without_bf16_instructions(monkeypatch):
    import opsd.benchmarks.machine as m
    from opsd.benchmarks.comparison import machine_name

    for flags, gpu, want in ((["avx512_bf16"], None, "AMD EPYC, 2 cores, avx512_bf16"),
                             ([], None, "AMD EPYC, 2 cores, no bf16 instructions"),
                             (["amx_bf16", "avx512_bf16"], "NVIDIA H100",
                              "AMD EPYC, 2 cores, amx_bf16+avx512_bf16, NVIDIA H100")):
        info = {"cpu": "AMD EPYC", "cpus": 2, "bf16_instructions": flags} | ({"gpu": gpu} if gpu else {})
        monkeypatch.setattr(m, "machine", lambda info=info: info)
        assert machine_name() == want
