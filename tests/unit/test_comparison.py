"""benchmarks/comparison.py without training: the report's arithmetic on hand-made runs, and the
skip-what-is-finished bookkeeping."""

from __future__ import annotations

import json

import pytest

from opsd.benchmarks.comparison import (
    ComparisonSpec, method_overrides, run_order, summarize, table, write_report,
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
          "kd_reference": [with_base(record("kd_reference", 0, [0.3], 0))]}
    s = summarize(by)
    assert s["methods"]["opsd_fixed"]["kl_sampled_last"] == pytest.approx(0.1)
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
    from opsd.config import REPO_ROOT, load_config

    spec = ComparisonSpec()
    for m in spec.methods:
        cfg = load_config(REPO_ROOT / spec.config, method_overrides(spec, m, 1, 0.7))
        assert cfg.train.steps == spec.steps and cfg.train.seed == 1 and cfg.eval.max_problems == 200
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
