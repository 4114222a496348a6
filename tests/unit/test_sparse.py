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
    rng = random.Random(0)  # one stream: a generator per draw made this test take ~20 s
    for p, n in ((0.1, 400), (0.5, 150), (0.0, 10)):
        means = [sum(rng.random() < p for _ in range(n)) / n for _ in range(2000)]
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
    assert "s, 1 run) on" in run_time_line(run_time_by_machine(records[:1]))


def test_the_added_rows_change_only_what_they_name_and_load_as_configs():
    """Issue 36's rows (benchmarks/sparse.py ADDED): each a valid config on the finished comparison's
    settings, changing only what it names of its recipe, at OPSD's chosen rate or sweeping at most
    two rates."""
    from opsd.benchmarks.sparse import ADDED, OPSD_CHOSEN_LR
    from opsd.config import load_config
    from opsd.objectives import objective

    spec = SparseSpec()
    assert [a.name for a in spec.added] == ["opsd_mask_truncated", "srpo", "mix_opsd_grpo", "opsd_anchor",
                                            "opsd_forward_kl"] == [a.name for a in ADDED]
    for a in spec.added:
        assert len(a.lrs) <= 2 and len(a.values) <= 2 and (a.lr_from == "opsd_fixed") == (not a.lrs)
        for sweep in (True, False):
            for value in a.values or [None]:
                items = run_overrides(spec, a.name, 1, OPSD_CHOSEN_LR, sweep=sweep, temperature=0.7, value=value)
                base = overrides_as_dict(run_overrides(spec, a.recipe, 1, OPSD_CHOSEN_LR, sweep=sweep, temperature=0.7))
                got = overrides_as_dict(items)
                changed = {k for k in got if got[k] != base.get(k)}
                assert changed <= {o.partition("=")[0] for o in a.overrides} | {a.tune}, (a.name, changed)
                if sweep:  # loading is the costly part; a sweep run differs only in steps and evaluation
                    continue
                cfg = load_config(spec.config,
                                  [o for o in items if not o.startswith(("data.train_path=", "eval.path="))])
                if a.name == "opsd_anchor":
                    assert cfg.objectives.opsd.anchor == value and cfg.teacher.mode == "fixed"
                    assert objective("opsd").reference_contexts(cfg) == ("anchor",)
        if a.name == "opsd_mask_truncated":
            assert cfg.loss.mask_truncated and cfg.algo == "opsd"
        if a.name == "srpo":
            plan_ = objective("mix").options(cfg)
            assert (plan_.mode, plan_.correct, cfg.rollout.n) == ("route", "grpo", spec.grpo_n)
        if a.name == "opsd_forward_kl":
            # The forward-KL end of beta (opsd/losses.py: 0 forward KL(p_T || p_S), 1 reverse KL).
            assert cfg.objectives.opsd.beta == 0.0 and cfg.objectives.opsd.objective == "divergence"


# --- appending methods to a finished experiment ---------------------------------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from opsd.benchmarks.sparse import METHODS, AddedMethod, check_spec, chosen_lrs, plan  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "sparse"


def _first_spec() -> dict:
    """docs/results/sparse/spec.json as the 24 finished runs wrote it, before rows were appended
    (the live file gains an ``added`` list at the first run of an added row)."""
    import json

    return {k: v for k, v in json.loads((RESULTS / "spec.json").read_text()).items() if k != "added"}


def _records():
    """The 24 finished runs' records (docs/results/sparse/runs, without the added rows' runs that
    land there as they finish), split by phase."""
    import json

    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))]
    records = [r for r in records if r["method"] in METHODS]
    return [r for r in records if r["phase"] == "sweep"], [r for r in records if r["phase"] == "test"]


def _as_finished(tmp_path: Path) -> Path:
    """A copy of docs/results/sparse as the 24 runs left it: the added rows' records and spec.json's
    ``added`` taken out, so that a test of the plan does not change as those runs land."""
    import json
    import shutil

    out = tmp_path / "sparse"
    shutil.copytree(RESULTS, out)
    for path in (out / "runs").glob("*.json"):
        if json.loads(path.read_text())["method"] not in METHODS:
            path.unlink()
    (out / "spec.json").write_text(json.dumps(_first_spec(), indent=1) + "\n")
    return out


def test_the_finished_experiment_plans_nothing_and_its_spec_is_accepted():
    import json

    sweep, runs = _records()
    spec = SparseSpec(added=[])
    check_spec(_first_spec(), spec)
    check_spec(json.loads((RESULTS / "spec.json").read_text()), SparseSpec())  # the live file, with ADDED
    assert plan(spec, sweep, runs) == ([], [])
    assert chosen_lrs(spec, sweep) == {"opsd_fixed": 3e-6, "grpo": 3e-5, "sft": 1e-5, "kd_reference": 3e-6}


def test_the_dry_run_of_a_finished_experiment_says_there_is_nothing_left_instead_of_an_empty_table(tmp_path):
    printed = []
    report = dry_run(SparseSpec(added=[]), _as_finished(tmp_path), log=printed.append)
    assert report["plan"] == [] and report["runs_done"] == report["runs_planned"] == 24
    assert printed == [f"24 of 24 runs done in {tmp_path / 'sparse'}: nothing left to run; without --dry-run "
                       "the same command only redraws the report.\n"]


def test_a_method_appended_to_the_finished_spec_plans_exactly_its_own_runs():
    import json

    sweep, runs = _records()
    saved = _first_spec()
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

    saved = _first_spec()
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


# --- tuning a key other than the rate (the KL anchor's weight) -------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import asdict  # noqa: E402

from opsd.benchmarks.sparse import (choose_value, chosen_values, dry_run, load_records, seed_run,  # noqa: E402
                                    sweep_run, write_report)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _val(method, lr, accuracy, value=None, key="objectives.opsd.anchor"):
    record = {"method": method, "seed": 0, "lr": lr, "phase": "sweep", "run_wall_seconds": 600.0,
              "machine": "Intel(R) Xeon(R) Processor, 2 cores",
              "steps": [{"step": 20, "tokens_generated_total": 1}],
              "evals": [{"step": 20, "accuracy": accuracy, "problems": 145, "truncated_frac": 0.5}]}
    return record if value is None else record | {"tuned": key, "value": value}


def test_the_plan_appends_the_anchor_sweep_after_the_rate_sweeps_and_then_every_new_row_per_seed(tmp_path):
    finished = _as_finished(tmp_path)
    before = _fingerprint(finished)
    report = dry_run(SparseSpec(), finished, log=lambda _: None)
    assert _fingerprint(finished) == before  # a dry run writes nothing, not even the finished spec
    plan_ = [(r["run"], r["lr"], r["value"]) for r in report["plan"]]
    new = ["opsd_mask_truncated", "srpo", "mix_opsd_grpo", "opsd_anchor", "opsd_forward_kl"]
    assert plan_[:6] == [("sweep-srpo-lr3e-06", 3e-6, None), ("sweep-srpo-lr3e-05", 3e-5, None),
                         ("sweep-mix_opsd_grpo-lr3e-06", 3e-6, None), ("sweep-mix_opsd_grpo-lr3e-05", 3e-5, None),
                         # at OPSD's chosen rate (3e-6), known from the finished sweep
                         ("sweep-opsd_anchor-anchor0.1", 3e-6, 0.1), ("sweep-opsd_anchor-anchor1", 3e-6, 1.0)]
    assert [r for r, _, _ in plan_[6:]] == [f"{m}-s{s}" for s in range(3) for m in new]
    rates = {r: lr for r, lr, _ in plan_[6:]}
    assert rates["opsd_anchor-s1"] == rates["opsd_forward_kl-s2"] == rates["opsd_mask_truncated-s0"] == 3e-6
    assert rates["srpo-s0"] is None  # chosen by its own sweep, which has not run
    assert report["runs_done"] == 24 and report["runs_planned"] == 24 + 6 + 5 * 3 == 24 + len(plan_)
    # The estimate: the slowest finished method's mean per step (OPSD's three test runs), times each run's steps.
    opsd = [json.loads((RESULTS / "runs" / f"opsd_fixed-s{s}.json").read_text())["run_wall_seconds"] for s in range(3)]
    per_step = sum(opsd) / 3 / 40
    assert report["seconds_per_step"] == pytest.approx(per_step)
    assert report["estimated_seconds_total"] == pytest.approx(per_step * (6 * 20 + 15 * 40))

    # What the anchor's runs and the forward-KL row are told, against OPSD's own runs.
    spec = SparseSpec()
    opsd_sweep = overrides_as_dict(run_overrides(spec, "opsd_fixed", 0, 3e-6, sweep=True, temperature=0.7))
    anchor = overrides_as_dict(run_overrides(spec, "opsd_anchor", 0, 3e-6, sweep=True, temperature=0.7, value=0.1))
    assert anchor == opsd_sweep | {"objectives.opsd.anchor": "0.1"}
    assert anchor["eval.path"] == "math-easy-val" and anchor["train.steps"] == "20" and anchor["train.seed"] == "0"
    opsd_test = overrides_as_dict(run_overrides(spec, "opsd_fixed", 2, 3e-6, sweep=False, temperature=0.7))
    fkl = overrides_as_dict(run_overrides(spec, "opsd_forward_kl", 2, 3e-6, sweep=False, temperature=0.7))
    assert fkl == opsd_test | {"objectives.opsd.beta": "0.0"}
    with pytest.raises(ValueError, match="needs its value"):
        run_overrides(spec, "opsd_anchor", 0, 3e-6, sweep=True, temperature=0.7)
    with pytest.raises(ValueError, match="nowhere to go"):
        run_overrides(spec, "opsd_forward_kl", 0, 3e-6, sweep=False, temperature=0.7, value=0.1)


def test_a_finished_tuning_run_is_skipped_on_rerun_and_the_old_runs_are_untouched(tmp_path):
    out = _as_finished(tmp_path)
    before = _fingerprint(out)
    spec = SparseSpec()
    sweep, runs = load_records(out / "runs")
    name, lr, value = sweep_run(spec, "opsd_anchor", 1.0, sweep)
    assert (name, lr, value) == ("sweep-opsd_anchor-anchor1", 3e-6, 1.0)
    (out / "runs" / f"{name}.json").write_text(json.dumps(_val("opsd_anchor", lr, 0.04, value)))
    sweep, runs = load_records(out / "runs")
    todo_sweep, todo_runs = plan(spec, sweep, runs)
    assert ("opsd_anchor", 1.0) not in todo_sweep and ("opsd_anchor", 0.1) in todo_sweep
    assert [r["run"] for r in dry_run(spec, out, log=lambda _: None)["plan"]].count("sweep-opsd_anchor-anchor1") == 0
    assert "opsd_anchor" not in chosen_values(spec, sweep)  # one of its two values is still to run
    assert seed_run(spec, "opsd_anchor", 0, sweep) == ("opsd_anchor-s0", 3e-6, None)
    # The 24 finished runs: none planned again, none rewritten, and the spec still accepted.
    assert not {(m, lr) for m, lr in todo_sweep} & {(r["method"], r["lr"]) for r in sweep if "value" not in r}
    assert not {(r["method"], r["seed"]) for r in runs} & set(todo_runs)
    assert {k: v for k, v in _fingerprint(out).items() if k != f"runs/{name}.json"} == before
    check_spec(json.loads((out / "spec.json").read_text()), spec)


def test_the_tuned_value_follows_the_rate_rule_on_hand_made_validation_scores():
    spec = SparseSpec()
    finished, _ = _records()
    assert choose_value([_val("opsd_anchor", 3e-6, 0.03, 0.1), _val("opsd_anchor", 3e-6, 0.05, 1.0)]) == 1.0
    assert choose_value([_val("opsd_anchor", 3e-6, 0.05, 1.0), _val("opsd_anchor", 3e-6, 0.05, 0.1)]) == 0.1  # tie
    rng = random.Random(1)
    for _ in range(200):  # against brute force, in any order of the records
        scores = {v: rng.choice([0.02, 0.03, 0.04]) for v in (0.1, 0.3, 1.0, 3.0)}
        records = [_val("opsd_anchor", 3e-6, acc, v) for v, acc in scores.items()]
        rng.shuffle(records)
        best = max(scores.values())
        assert choose_value(records) == min(v for v, acc in scores.items() if acc == best)
    done = finished + [_val("opsd_anchor", 3e-6, 0.048, 0.1), _val("opsd_anchor", 3e-6, 0.041, 1.0)]
    assert chosen_values(spec, done) == {"opsd_anchor": 0.1}
    # A record of a value the spec does not sweep is no part of the choice.
    assert chosen_values(spec, done + [_val("opsd_anchor", 3e-6, 0.09, 0.5)]) == {"opsd_anchor": 0.1}
    # The test runs then carry the chosen weight, at OPSD's rate.
    name, lr, value = seed_run(spec, "opsd_anchor", 2, done)
    assert (name, lr, value) == ("opsd_anchor-s2", 3e-6, 0.1)
    o = overrides_as_dict(run_overrides(spec, "opsd_anchor", 2, lr, sweep=False, temperature=0.7, value=value))
    assert o["objectives.opsd.anchor"] == "0.1" and o["eval.path"] == "math-easy-test" and o["train.seed"] == "2"
    assert not [m for m, _ in plan(spec, done, [])[0] if m == "opsd_anchor"]  # both values ran: none planned


def test_the_report_shows_each_tuned_value_and_the_choice(tmp_path):
    spec = SparseSpec()
    finished, _ = _records()
    done = finished + [_val("opsd_anchor", 3e-6, 0.034, 0.1), _val("opsd_anchor", 3e-6, 0.048, 1.0)]
    report = write_report(spec, done, [], "lenient", tmp_path)
    assert report["tuned"]["opsd_anchor"] == {"key": "objectives.opsd.anchor", "lr": 3e-6, "chosen": 1.0,
                                              "accuracy": {"0.1": 0.034, "1.0": 0.048}}
    assert report["chosen_lr"]["opsd_fixed"] == 3e-6 and report["sweep"]["opsd_anchor"] == {}
    md = (tmp_path / "sparse.md").read_text()
    se = math.sqrt(0.048 * 0.952 / 145)
    assert f"| `objectives.opsd.anchor` | 1.0 | 3e-06 | 0.048 ({se:.3f}; 50% cut) | **chosen** |" in md
    assert "| `objectives.opsd.anchor` | 0.1 | 3e-06 | 0.034" in md and md.count("**chosen**") == 1
    assert json.loads((tmp_path / "sparse.json").read_text())["tuned"]["opsd_anchor"]["chosen"] == 1.0


def test_a_tuned_key_is_declared_once_and_apart_from_the_rate():
    tuned = dict(lr_from="opsd_fixed", tune="objectives.opsd.anchor", values=[0.1, 1.0])
    SparseSpec(added=[AddedMethod("a", "opsd_fixed", **tuned)])
    with pytest.raises(ValueError, match="together, or neither"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", lr_from="opsd_fixed", tune="objectives.opsd.anchor")])
    with pytest.raises(ValueError, match="together, or neither"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", lr_from="opsd_fixed", values=[0.1])])
    with pytest.raises(ValueError, match="goes in lrs"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", lr_from="opsd_fixed", tune="learner.lr", values=[1e-5])])
    with pytest.raises(ValueError, match="in one place"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", ["objectives.opsd.anchor=0.5"], **tuned)])
    with pytest.raises(ValueError, match="distinct"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", **(tuned | {"values": [0.1, 0.1]}))])
    with pytest.raises(ValueError, match="words"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", **(tuned | {"values": ["../x"]}))])
    with pytest.raises(ValueError, match="in a loop"):
        SparseSpec(added=[AddedMethod("a", "opsd_fixed", lr_from="b"), AddedMethod("b", "opsd_fixed", lr_from="a")])
    # A chain of lr_from reaches the rate it ends at.
    chained = SparseSpec(added=[AddedMethod("a", "opsd_fixed", lr_from="b"), AddedMethod("b", "opsd_fixed",
                                                                                         lr_from="opsd_fixed")])
    assert chosen_lrs(chained, _records()[0])["a"] == 3e-6


def test_a_spec_json_written_before_tuning_existed_still_accepts_its_added_methods():
    saved = _first_spec()
    first = AddedMethod("opsd_masked", "opsd_fixed", ["loss.mask_truncated=true"], lr_from="opsd_fixed")
    old_entry = {k: v for k, v in asdict(first).items() if k not in ("tune", "values")}
    check_spec(saved | {"added": [old_entry]}, SparseSpec(added=[first]))
    with pytest.raises(SystemExit, match="'opsd_masked' changed \\(tune, values\\)"):
        check_spec(saved | {"added": [old_entry]}, SparseSpec(added=[AddedMethod(
            "opsd_masked", "opsd_fixed", ["loss.mask_truncated=true"], lr_from="opsd_fixed",
            tune="objectives.opsd.anchor", values=[0.1])]))


def test_dry_run_is_refused_where_there_is_no_plan():
    from opsd.benchmarks.bench import main

    with pytest.raises(SystemExit, match="--task toy has no plan to print"):
        main(["learning", "--task", "toy", "--dry-run"])


def test_the_mbpp_experiment_is_the_sparse_shape_on_mbpp_and_each_run_loads_as_a_config(tmp_path):
    """`--task mbpp` (issue 38): OPSD, GRPO and SFT on MBPP's parts, at the sparse experiment's shape,
    in float32; every run of its plan is a valid config of configs/mbpp.yaml that trains on `mbpp`
    and is evaluated on `mbpp-val` (sweep) or `mbpp-test`."""
    from opsd.benchmarks.sparse import dry_run
    from opsd.config import load_config

    spec, sparse = SparseSpec.mbpp(), SparseSpec()
    assert (spec.task, spec.val, spec.test, spec.config) == ("mbpp", "mbpp-val", "mbpp-test", "configs/mbpp.yaml")
    assert spec.all_methods() == ["opsd_fixed", "grpo", "sft"] and spec.dtype == "float32"
    for key in ("lrs", "sweep_steps", "steps", "seeds", "rows_per_step", "grpo_n", "eval_every", "max_tokens"):
        assert getattr(spec, key) == getattr(sparse, key), key
    # mbpp-val has 50 problems and mbpp-test 200: every one is graded.
    assert (spec.val_problems, spec.test_problems) == (50, 200)

    plan_ = dry_run(spec, tmp_path / "mbpp", log=lambda _: None)["plan"]
    assert len(plan_) == spec.runs_planned() == 3 * 3 + 3 * 3
    assert [r["run"] for r in plan_[:3]] == ["sweep-opsd_fixed-lr3e-06", "sweep-opsd_fixed-lr1e-05",
                                             "sweep-opsd_fixed-lr3e-05"]
    assert not (tmp_path / "mbpp").exists()  # a dry run writes nothing
    for method in spec.all_methods():
        for sweep in (True, False):
            items = run_overrides(spec, method, 1, 1e-5, sweep=sweep, temperature=0.7)
            got = overrides_as_dict(items)
            assert got["data.train_path"] == "mbpp" and got["eval.path"] == ("mbpp-val" if sweep else "mbpp-test")
            assert got["eval.max_problems"] == str(spec.val_problems if sweep else spec.test_problems)
            cfg = load_config(spec.config, [o for o in items if not o.startswith(("data.train_path=", "eval.path="))])
            assert cfg.model.dtype == "float32" and cfg.rollout.max_tokens == cfg.eval.max_tokens == 384
            assert cfg.algo == {"opsd_fixed": "opsd", "grpo": "grpo", "sft": "sft"}[method]
            assert cfg.learner.lr == 1e-5 and cfg.train.steps == (spec.sweep_steps if sweep else spec.steps)


def test_the_mbpp_experiment_has_no_quick_version_and_says_which_does():
    from opsd.benchmarks.bench import main

    with pytest.raises(SystemExit, match="--task sparse --quick runs the same harness"):
        main(["learning", "--task", "mbpp", "--quick"])


def test_before_any_test_run_the_plan_is_paced_by_the_sweep_runs_and_says_it_is_low(tmp_path):
    import json

    from opsd.benchmarks.sparse import dry_run

    spec, runs = SparseSpec.mbpp(), tmp_path / "mbpp" / "runs"
    runs.mkdir(parents=True)
    for name, method, lr, wall in (("sweep-opsd_fixed-lr3e-06", "opsd_fixed", 3e-6, 1500.0),
                                   ("sweep-opsd_fixed-lr1e-05", "opsd_fixed", 1e-5, 1300.0),
                                   ("sweep-grpo-lr3e-06", "grpo", 3e-6, 1000.0)):
        (runs / f"{name}.json").write_text(json.dumps({
            "method": method, "seed": 0, "lr": lr, "phase": "sweep", "run_wall_seconds": wall, "machine": "m",
            "steps": [{"step": 20}], "evals": [{"step": 20, "accuracy": 0.0}]}))
    printed = []
    report = dry_run(spec, tmp_path / "mbpp", log=printed.append)
    # each method at its own mean per step over its sweep runs: OPSD (1500 + 1300) / 2 / 20 = 70, GRPO
    # 1000 / 20 = 50; SFT, with none, at the slowest's 70
    assert report["seconds_per_step"] == pytest.approx(70.0) and report["paced_by"] == "sweep"
    assert report["paces"] == {"opsd_fixed": {"seconds_per_step": pytest.approx(70.0), "from": "sweep"},
                               "grpo": {"seconds_per_step": pytest.approx(50.0), "from": "sweep"}}
    # left: OPSD 1 sweep + 3 test runs, GRPO 2 + 3, SFT 3 + 3
    assert len(report["plan"]) == 15 and report["estimated_seconds_total"] == pytest.approx(
        70.0 * (20 + 3 * 40) + 50.0 * (2 * 20 + 3 * 40) + 70.0 * (3 * 20 + 3 * 40))
    assert {r["run"]: r["estimated_seconds"] for r in report["plan"]}["grpo-s1"] == pytest.approx(50.0 * 40)
    assert "OPSD (fixed teacher) 70.0 s over its sweep runs" in printed[0] and "SFT at the slowest's 70.0 s" in printed[0]
    assert "costed low" in printed[0]

    # once GRPO has a test run, its pace comes from it, and OPSD's rows are still costed low
    (runs / "grpo-s0.json").write_text(json.dumps({
        "method": "grpo", "seed": 0, "lr": 3e-6, "phase": "test", "run_wall_seconds": 2400.0, "machine": "m",
        "steps": [{"step": 40}], "evals": [{"step": 40, "accuracy": 0.0}]}))
    report = dry_run(spec, tmp_path / "mbpp", log=printed.append)
    assert report["paces"]["grpo"] == {"seconds_per_step": pytest.approx(60.0), "from": "test"}
    assert report["paced_by"] == "sweep" and len(report["plan"]) == 14


def test_the_budget_costs_a_first_test_run_at_its_methods_pace_times_its_own_steps():
    import time

    from opsd.benchmarks.sparse import _fits

    now = time.perf_counter()
    sweep = [{"method": "opsd_fixed", "phase": "sweep", "run_wall_seconds": 1700.0, "steps": [{"step": 20}]},
             {"method": "opsd_fixed", "phase": "sweep", "run_wall_seconds": 1500.0, "steps": [{"step": 20}]},
             {"method": "grpo", "phase": "sweep", "run_wall_seconds": 1200.0, "steps": [{"step": 20}]}]
    # OPSD's mean sweep pace is 80 s a step, so a 40-step test run costs 3,200 s: 53.3 minutes
    assert _fits(sweep, "opsd_fixed", now, 54, "test", 40) and not _fits(sweep, "opsd_fixed", now, 53, "test", 40)
    # a sweep run costs its phase's longest: 1,700 s, 28.3 minutes
    assert _fits(sweep, "opsd_fixed", now, 29, "sweep", 20) and not _fits(sweep, "opsd_fixed", now, 28, "sweep", 20)
    # a method with no run yet is costed at the slowest method's pace: OPSD's 80 s a step
    assert not _fits(sweep, "sft", now, 26, "sweep", 20) and _fits(sweep, "sft", now, 27, "sweep", 20)
    # once a test run has finished, its own wall is the cost
    done = sweep + [{"method": "opsd_fixed", "phase": "test", "run_wall_seconds": 4000.0, "steps": [{"step": 40}]}]
    assert not _fits(done, "opsd_fixed", now, 66, "test", 40) and _fits(done, "opsd_fixed", now, 67, "test", 40)
    # and GRPO's first test run is at GRPO's own pace, 60 s a step: 40 minutes
    assert not _fits(done, "grpo", now, 39.9, "test", 40) and _fits(done, "grpo", now, 40.1, "test", 40)
    assert _fits([], "grpo", now, 0.5, "sweep", 20) and _fits(sweep, "grpo", now, None, "test", 40)


def test_a_run_that_would_not_fit_is_passed_over_for_later_runs_of_its_seed_only():
    from opsd.benchmarks.sparse import within_budget

    todo = [(m, s) for s in range(3) for m in ("opsd_fixed", "grpo", "sft")]
    asked, passed = [], []
    minutes_left = {"t": 100.0}
    cost = {"opsd_fixed": 60.0, "grpo": 50.0, "sft": 20.0}

    def fits(method):
        asked.append(method)
        return cost[method] <= minutes_left["t"]

    started = []
    for method, seed in within_budget(todo, fits, passed):
        started.append((method, seed))
        minutes_left["t"] -= cost[method]  # the run takes its cost before the next is asked
    # OPSD s0 fits (40 left); GRPO s0 does not and is passed over; SFT s0 fits (20 left); nothing of seed 1
    assert started == [("opsd_fixed", 0), ("sft", 0)] and passed == [("grpo", 0)]
    assert asked == ["opsd_fixed", "grpo", "sft"]  # seed 1's first run is not even asked

    passed = []
    assert list(within_budget(todo, lambda m: True, passed)) == todo and passed == []
    assert list(within_budget(todo, lambda m: False, passed)) == [] and passed == todo[:3]


def test_a_record_from_before_the_guard_series_is_completed_from_its_own_metrics_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ev = {"eval/accuracy_lenient": 0.1, "eval/format_rate": 0.5, "eval/response_len_mean": 200.0, "eval/problems": 10,
          "eval/truncated_frac": 0.3, "eval/repeated_ngram_rate": 0.2}
    rows = [{"step": 0, **ev},
            {"step": 1, "step_seconds": 30.0, "tokens_generated_total": 100, "correct_frac": 0.25, "update_skipped": False,
             "no_loss_tokens": False},
            {"step": 2, "step_seconds": 40.0, "tokens_generated_total": 250, "correct_frac": 0.0, "update_skipped": True,
             "no_loss_tokens": True, **ev, "eval/accuracy_lenient": 0.2}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from opsd.benchmarks.comparison import run_record

    fresh = run_record(run_dir, "srpo", 0, "lenient", 99.0)
    # The record as the harness wrote it before the steps kept these series: everything else must stay.
    old = {"method": "srpo", "seed": 0, "lr": 3e-6, "phase": "sweep", "run_dir": str(run_dir), "run_wall_seconds": 123.0,
           "machine": "another machine", "note": "what ran beside it", "evals": fresh["evals"],
           "steps": [{k: v for k, v in s.items() if k not in ("update_skipped", "no_loss_tokens", "anchor_kl",
                                                               "correct_frac")} for s in fresh["steps"]]}
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "sweep-srpo-lr3e-06.json").write_text(json.dumps(old))
    (runs / "gone.json").write_text(json.dumps(old | {"run_dir": str(tmp_path / "nowhere")}))  # metrics lost
    before = _fingerprint(runs)
    load_records(runs)  # a dry run's read writes nothing
    assert _fingerprint(runs) == before
    sweep, _ = load_records(runs, extract="lenient")
    done = json.loads((runs / "sweep-srpo-lr3e-06.json").read_text())
    assert [s["correct_frac"] for s in done["steps"]] == [0.25, 0.0]
    assert [s["update_skipped"] for s in done["steps"]] == [False, True] and done["steps"][0]["anchor_kl"] is None
    assert [s["wall_seconds"] for s in done["steps"]] == [30.0, 70.0]
    assert {k: v for k, v in done.items() if k != "steps"} == {k: v for k, v in old.items() if k != "steps"}
    assert json.loads((runs / "gone.json").read_text()) == old | {"run_dir": str(tmp_path / "nowhere")}
    assert sorted(r["run_dir"] for r in sweep) == sorted([str(run_dir), str(tmp_path / "nowhere")])
    again = _fingerprint(runs)
    load_records(runs, extract="lenient")
    assert _fingerprint(runs) == again  # completed once


def test_the_collapse_rows_match_a_by_hand_computation_and_the_two_se_rule():
    from opsd.benchmarks.sparse import collapse_rows, collapse_table

    def run(method, seed, accs, cuts, lens, steps):
        evals = [{"step": 10 * i, "accuracy": a, "truncated_frac": c, "response_len": ln, "repeated_ngram_rate": 0.1 * i}
                 for i, (a, c, ln) in enumerate(zip(accs, cuts, lens))]
        return {"method": method, "seed": seed, "evals": evals, "steps": steps}

    plain = [{"step": i + 1} for i in range(10)]  # a run from before the diagnostics: no series at all
    diag = [{"step": i + 1, "repeated_ngram_rate": i / 10, "stop_gap_finished": -0.1 * (i % 2),
             "stop_gap_truncated": 0.0, "stop_prob_student_finished": 0.6, "stop_prob_teacher_finished": 0.5,
             "update_skipped": i in (3, 7), "correct_frac": 0.25 if i < 5 else 0.0} for i in range(10)]
    by_method = {
        "grpo": [run("grpo", s, [0.04, a, a], [0.4, 0.3, 0.3], [280, 250, 240], plain)
                 for s, a in enumerate((0.05, 0.04, 0.06))],
        "srpo": [run("srpo", s, [0.04, a, b], [0.4, 0.5, 0.6], [280, 300, 320], diag)
                 for s, (a, b) in enumerate(((0.20, 0.30), (0.22, 0.28), (0.18, 0.32)))],
    }
    rows = collapse_rows(by_method, n=300)
    g, h = rows["grpo"], rows["srpo"]
    assert g["accuracy_at"] == {0: 0.04, 10: pytest.approx(0.05), 20: pytest.approx(0.05)}
    assert h["truncated_frac_at"] == pytest.approx({0: 0.4, 10: 0.5, 20: 0.6}) and h["response_len_at"][20] == 320
    assert g["mean_after_step_0_per_seed"] == pytest.approx([0.05, 0.04, 0.06])
    assert h["mean_after_step_0"] == pytest.approx(0.25) and h["mean_after_step_0_std"] == 0.0
    # Brute force: the difference, its two standard errors and the rule.
    d = 0.25 - 0.05
    se_seeds = math.sqrt(0.01 ** 2 / 3 + 0.0)  # GRPO's sample std over seeds is 0.01, SRPO's 0
    se_problems = math.sqrt(2 * 0.15 * 0.85 / 300)
    v = h["vs_grpo"]
    assert (v["difference"], v["se_seeds"], v["se_problems"]) == (pytest.approx(d), pytest.approx(se_seeds),
                                                                     pytest.approx(se_problems))
    assert v["beyond_two_se"] is True and "vs_grpo" not in g
    # The training diagnostics: first and last 5 steps, means over steps; a run with none shows none.
    assert h["repeated_ngram_rate_first"] == pytest.approx(0.2) and h["repeated_ngram_rate_last"] == pytest.approx(0.7)
    assert h["repeated_ngram_rate_eval_last"] == pytest.approx(0.2)
    assert h["stop_gap_finished"] == pytest.approx(-0.05) and h["updates_skipped"] == 2
    assert h["correct_frac"] == pytest.approx(0.125) and h["anchor_kl"] is None
    assert g["repeated_ngram_rate_first"] is None and g["updates_skipped"] is None and g["stop_gap_finished"] is None
    # A small difference is within two standard errors.
    close = collapse_rows({"grpo": by_method["grpo"], "x": [run("x", 0, [0.04, 0.06, 0.06], [0.4] * 3, [280] * 3, plain)]},
                          n=300)
    assert close["x"]["vs_grpo"]["beyond_two_se"] is False
    md = collapse_table(rows)
    assert "+0.200" in md and "**beyond 2 SE**" in md and "| 40% / 50% / 60% |" in md and "| 12.5% |" in md
    assert h["stop_gap_truncated_runs"] == 3 and " of 3 runs)" not in md  # all measured it: no count
    # One run of three measured the gap at cut samples (the others, under loss.mask_truncated before
    # schema 5, could not): the mean is that run's, and the table says over how many runs.
    unmeasured = [{k: v for k, v in s.items() if k != "stop_gap_truncated"} for s in diag]
    partial = [run("srpo", s, [0.04, 0.2, 0.3], [0.4] * 3, [280] * 3, steps)
               for s, steps in enumerate((unmeasured, [s | {"stop_gap_truncated": -0.02} for s in diag], unmeasured))]
    part = collapse_rows({"srpo": partial}, n=300)["srpo"]
    assert part["stop_gap_truncated"] == pytest.approx(-0.02) and part["stop_gap_truncated_runs"] == 1
    assert "| -0.0200 (1 of 3 runs) |" in collapse_table({"srpo": part})


def test_the_sweep_table_lists_the_diagnostics_of_each_sweep_run_that_has_them():
    spec = SparseSpec()
    steps = [{"step": i + 1, "stop_prob_student_finished": 0.6, "stop_prob_teacher_finished": 0.5,
              "stop_gap_finished": -0.1, "correct_frac": 0.05, "update_skipped": False} for i in range(4)]
    old = _val("srpo", 3e-5, 0.03)  # a record from before the series: no row
    new = _val("srpo", 3e-6, 0.01) | {"steps": steps}
    anchor = _val("opsd_anchor", 3e-6, 0.02, value=1.0) | {"steps": [{k: v for k, v in s.items() if k != "correct_frac"} | {"anchor_kl": 0.002}
                                                                          for s in steps]}
    table = sweep_table(spec, {"srpo": [old, new], "opsd_anchor": [anchor]}, {"opsd_fixed": 3e-6})
    rows = [ln for ln in table.splitlines() if ln.startswith("| SRPO (correct: GRPO, wrong: OPSD), ")
            or ln.startswith("| OPSD + KL anchor to the initial policy, ")]
    assert rows == [
        "| SRPO (correct: GRPO, wrong: OPSD), lr 3e-06 | — → — | — | 0.600 / 0.500 | -0.100 | — | 0.0 | — | 5.0% |",
        "| OPSD + KL anchor to the initial policy, objectives.opsd.anchor=1.0 | — → — | — | 0.600 / 0.500 | -0.100 "
        "| — | 0.0 | 0.0020 | — |"]
