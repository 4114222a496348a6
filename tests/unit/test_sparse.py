"""The sparse-reward comparison's choices (benchmarks/sparse.py): which learning rate wins the
sweep, what each run is told, and the standard error it reports."""

from __future__ import annotations

import math
import random

from opsd.benchmarks.sparse import (SparseSpec, choose_lr, evaluated, run_overrides, run_time_by_machine, run_time_line,
                                    standard_error, sweep_table)


def sweep(*pairs):
    return [{"lr": lr, "evals": [{"step": 0, "accuracy": 0.05}, {"step": 20, "accuracy": acc}]} for lr, acc in pairs]


def test_the_best_final_validation_accuracy_wins_and_a_tie_goes_to_the_smaller_rate():
    assert choose_lr(sweep((3e-6, 0.10), (1e-5, 0.14), (3e-5, 0.12))) == 1e-5
    assert choose_lr(sweep((3e-5, 0.12), (1e-5, 0.12), (3e-6, 0.08))) == 1e-5
    # Against brute force: the order of the sweep's runs does not matter.
    rng = random.Random(0)
    for _ in range(200):
        runs = sweep(*[(lr, rng.choice([0.0, 0.05, 0.1])) for lr in (3e-6, 1e-5, 3e-5, 1e-4)])
        best = max(r["evals"][-1]["accuracy"] for r in runs)
        expected = min(r["lr"] for r in runs if r["evals"][-1]["accuracy"] == best)
        rng.shuffle(runs)
        assert choose_lr(runs) == expected


def overrides_as_dict(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = value  # the last one wins, as in load_config
    return out


def test_sweep_runs_see_the_validation_part_and_test_runs_the_test_part():
    spec = SparseSpec()
    sweep_run = overrides_as_dict(run_overrides(spec, "opsd_fixed", 0, 3e-6, sweep=True, temperature=0.7))
    assert sweep_run["eval.path"] == "math-easy-val" and sweep_run["learner.lr"] == "3e-06"
    assert sweep_run["train.steps"] == str(spec.sweep_steps) == sweep_run["eval.every"]
    assert sweep_run["eval.max_problems"] == str(spec.val_problems) and sweep_run["data.train_path"] == "math-easy"
    test_run = overrides_as_dict(run_overrides(spec, "grpo", 2, 1e-5, sweep=False, temperature=0.7))
    assert test_run["eval.path"] == "math-easy-test" and test_run["eval.every"] == str(spec.eval_every)
    assert test_run["train.steps"] == str(spec.steps) and test_run["train.seed"] == "2"
    # GRPO: rows_per_step / grpo_n prompts of grpo_n samples each, at the chosen rate.
    assert test_run["rollout.n"] == str(spec.grpo_n)
    assert test_run["train.prompts_per_step"] == str(spec.rows_per_step // spec.grpo_n)
    assert test_run["learner.lr"] == "1e-05" and test_run["rollout.max_tokens"] == str(spec.max_tokens)


def test_standard_error_is_the_binomial_one():
    for p, n in ((0.1, 400), (0.5, 150), (0.0, 10)):
        draws = [[1 if random.Random(i * 1000 + j).random() < p else 0 for j in range(n)] for i in range(2000)]
        means = [sum(d) / n for d in draws]
        mean = sum(means) / len(means)
        empirical = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1))
        assert math.isclose(standard_error(p, n), empirical, rel_tol=0.08, abs_tol=1e-12)


def test_the_standard_error_counts_the_problems_graded_not_those_asked():
    # prompt.overlong=skip can leave problems out of an evaluation: the error is that of the rest.
    last = {"step": 20, "accuracy": 0.1, "problems": 145, "truncated_frac": 0.45}
    graded = [{"lr": 1e-5, "method": "sft", "evals": [last]}]
    assert evaluated(graded, 150) == 145
    assert evaluated([{"evals": [{"step": 20, "accuracy": 0.1}]}], 150) == 150  # a record without the count
    assert evaluated([], 150) == 150
    table = sweep_table(SparseSpec(methods=["sft"], lrs=[1e-5], added=[]), {"sft": graded}, {"sft": 1e-5})
    assert "145 problems" in table
    assert f"0.100 ({math.sqrt(0.1 * 0.9 / 145):.3f}; 45% cut)" in table and "(0.024" not in table


def test_run_time_is_summed_per_machine_and_mixing_machines_is_said():
    records = [{"machine": "AMD EPYC, 2 cores", "run_wall_seconds": 900.0},
               {"machine": "Intel Xeon, 2 cores", "run_wall_seconds": 385.0},
               {"machine": "AMD EPYC, 2 cores", "run_wall_seconds": 450.0}]
    by = run_time_by_machine(records)
    assert by == {"AMD EPYC, 2 cores": {"runs": 2, "run_wall_seconds": 1350.0},
                  "Intel Xeon, 2 cores": {"runs": 1, "run_wall_seconds": 385.0}}
    line = run_time_line(by)
    assert line.startswith("Run time: 0.48 h in all: 0.38 h (1,350 s, 2 runs) on AMD EPYC") and "mix" in line
    assert "mix" not in run_time_line(run_time_by_machine(records[:1]))


def test_the_added_rows_change_only_what_they_name_and_load_as_configs():
    """Issue 36's rows (benchmarks/sparse.py ADDED): each a valid config on the finished comparison's
    settings, changing only what it names of its recipe, at OPSD's chosen rate or sweeping at most
    two rates."""
    from opsd.benchmarks.sparse import ADDED, OPSD_CHOSEN_LR
    from opsd.config import load_config
    from opsd.objectives import objective

    spec = SparseSpec()
    assert [a.name for a in spec.added] == ["opsd_mask_truncated", "srpo", "mix_opsd_grpo"] == [a.name for a in ADDED]
    for a in spec.added:
        assert len(a.lrs) <= 2 and (a.lr_from == "opsd_fixed") == (not a.lrs)
        for sweep in (True, False):
            items = run_overrides(spec, a.name, 1, OPSD_CHOSEN_LR, sweep=sweep, temperature=0.7)
            base = overrides_as_dict(run_overrides(spec, a.recipe, 1, OPSD_CHOSEN_LR, sweep=sweep, temperature=0.7))
            got = overrides_as_dict(items)
            changed = {k for k in got if got[k] != base.get(k)}
            assert changed <= {o.partition("=")[0] for o in a.overrides}, (a.name, changed)
            cfg = load_config(spec.config, [o for o in items if not o.startswith(("data.train_path=", "eval.path="))])
        if a.name == "opsd_mask_truncated":
            assert cfg.loss.mask_truncated and cfg.algo == "opsd"
        if a.name == "srpo":
            plan_ = objective("mix").options(cfg)
            assert (plan_.mode, plan_.correct, cfg.rollout.n) == ("route", "grpo", spec.grpo_n)


# --- appending methods to a finished experiment ---------------------------------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from opsd.benchmarks.sparse import AddedMethod, check_spec, chosen_lrs, plan  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "sparse"


def _records():
    """The finished experiment's own run records (docs/results/sparse/runs), split by phase."""
    import json

    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))]
    return [r for r in records if r["phase"] == "sweep"], [r for r in records if r["phase"] == "test"]


def test_the_finished_experiment_plans_nothing_and_its_spec_is_accepted():
    import json

    sweep, runs = _records()
    spec = SparseSpec(added=[])
    check_spec(json.loads((RESULTS / "spec.json").read_text()), spec)
    assert plan(spec, sweep, runs) == ([], [])
    assert chosen_lrs(spec, sweep) == {"opsd_fixed": 3e-6, "grpo": 3e-5, "sft": 1e-5, "kd_reference": 3e-6}


def test_a_method_appended_to_the_finished_spec_plans_exactly_its_own_runs():
    import json

    sweep, runs = _records()
    saved = json.loads((RESULTS / "spec.json").read_text())  # written before methods could be appended
    guard = AddedMethod("opsd_masked", "opsd_fixed", ["loss.mask_truncated=true"], lr_from="opsd_fixed")
    tuned = AddedMethod("mix", "grpo", ["algo=mix"], lrs=[1e-5, 3e-5], seeds=2)
    spec = SparseSpec(added=[guard, tuned])
    check_spec(saved, spec)
    assert plan(spec, sweep, runs) == (
        [("mix", 1e-5), ("mix", 3e-5)],
        [("opsd_masked", 0), ("mix", 0), ("opsd_masked", 1), ("mix", 1), ("opsd_masked", 2)])
    assert chosen_lrs(spec, sweep)["opsd_masked"] == 3e-6  # OPSD's tuned rate
    assert "mix" not in chosen_lrs(spec, sweep)  # not swept yet
    assert spec.runs_planned() == 24 + 3 + 4
    # Its sweep done: the mix's runs take its own best rate.
    done = [{"method": "mix", "lr": lr, "phase": "sweep", "evals": [{"step": 20, "accuracy": acc}]}
            for lr, acc in ((1e-5, 0.05), (3e-5, 0.04))]
    assert chosen_lrs(spec, sweep + done)["mix"] == 1e-5
    assert plan(spec, sweep + done, runs)[0] == []
    # A run reads its recipe, then its own overrides (the last one wins, as in load_config).
    o = overrides_as_dict(run_overrides(spec, "opsd_masked", 1, 3e-6, sweep=False, temperature=0.7))
    assert o["algo"] == "opsd" and o["loss.mask_truncated"] == "true" and o["train.seed"] == "1"
    assert o["eval.path"] == "math-easy-test" and o["learner.lr"] == "3e-06"


def test_changing_a_finished_setting_or_an_added_method_is_refused_with_its_name():
    import json
    from dataclasses import asdict

    saved = json.loads((RESULTS / "spec.json").read_text())
    with pytest.raises(SystemExit, match="steps=40, not 50"):
        check_spec(saved, SparseSpec(steps=50, added=[]))
    with pytest.raises(SystemExit, match="methods="):
        check_spec(saved, SparseSpec(methods=["opsd_fixed", "grpo"], added=[]))
    first = AddedMethod("opsd_anchor", "opsd_fixed", ["loss.anchor=0.1"], lr_from="opsd_fixed")
    with_first = asdict(SparseSpec(added=[first]))
    changed = AddedMethod("opsd_anchor", "opsd_fixed", ["loss.anchor=0.3"], lr_from="opsd_fixed")
    with pytest.raises(SystemExit, match="'opsd_anchor' changed \\(overrides\\)"):
        check_spec(with_first, SparseSpec(added=[changed]))
    with pytest.raises(SystemExit, match="lacks"):
        check_spec(with_first, SparseSpec(added=[]))
    second = AddedMethod("srpo", "grpo", ["algo=mix"], lr_from="grpo")
    check_spec(with_first, SparseSpec(added=[first, second]))  # appending again is fine
    with pytest.raises(SystemExit, match="appended, not reordered"):
        check_spec(asdict(SparseSpec(added=[first, second])), SparseSpec(added=[second, first]))


def test_an_added_method_names_its_rate_one_way():
    with pytest.raises(ValueError, match="not both and not neither"):
        SparseSpec(added=[AddedMethod("x", "opsd_fixed")])
    with pytest.raises(ValueError, match="lr_from='nope'"):
        SparseSpec(added=[AddedMethod("x", "opsd_fixed", lr_from="nope")])
    with pytest.raises(ValueError, match="must differ"):
        SparseSpec(added=[AddedMethod("grpo", "grpo", lr_from="grpo")])
