"""``opsd bench learning --task sparse``: OPSD, GRPO, SFT and KD where the student's own reward is
sparse, each at its own tuned learning rate (issue 24, item 7; docs/RESULTS.md).

    opsd bench learning --task sparse [--budget-minutes 120] [--out runs/bench/sparse]
    opsd bench learning --task mbpp [--budget-minutes 120] [--out runs/bench/mbpp]

``--task mbpp`` (:meth:`SparseSpec.mbpp`) is the same harness on MBPP: OPSD, GRPO and SFT, graded
by each problem's asserts in the sandbox, its report in ``mbpp.{json,md,png}``.

Two phases, resumable run by run like ``opsd bench learning``:

1. **Sweep.** Each method at each of ``SparseSpec.lrs`` for ``sweep_steps`` steps, one seed (0),
   evaluated at its end on the validation part (never the test part). The chosen rate is the one
   with the best final validation accuracy; on a tie, the smaller rate.
2. **Runs.** Each method at its chosen rate, ``seeds`` seeds of ``steps`` steps, evaluated on the
   test part at step 0 (once, shared) and every ``eval_every`` steps, so that the generated tokens
   each method needs to reach GRPO's final accuracy are read off measured points.

Finished runs land in ``<out>/runs/sweep-<method>-lr<lr>.json`` and ``<out>/runs/<method>-s<seed>.json``
and are skipped on a rerun; ``<out>/spec.json`` keeps runs of other settings out. The report
(``sparse.json``, ``sparse.md``, ``sparse.png``) is redrawn after every run; per row it gives what issue 36
asks of each (:func:`collapse_rows`: accuracy, cut share and length at each evaluation, the mean after
step 0 against GRPO's within two standard errors or not, repetition, the stop-probability gap, and
what a guard or hybrid did).

**Appending methods to a finished experiment.** ``ADDED`` lists rows appended after the first
runs (each an :class:`AddedMethod`: a recipe of benchmarks/comparison.py plus overrides, its own
rates to sweep or another method's chosen rate, its seeds). A spec that differs from
``spec.json`` only by added methods is accepted: the runs, chosen rates and records already there
are kept and skipped, and only the new methods' runs are planned (:func:`plan`). Changing any
other setting, or anything about a method already in ``spec.json``, is refused, naming it.

**Tuning a key other than the rate.** An added method may instead take another method's chosen
rate and sweep one other config key (``tune``, ``values``: e.g. ``objectives.opsd.anchor`` at 0.1
and 1.0). Its sweep is run exactly as a rate sweep (``sweep_steps`` steps, seed 0, the validation
part), after the rate sweeps it depends on, lands in ``sweep-<method>-<last part of the key><value>.json``
and is chosen by the same rule (best final validation accuracy; a tie goes to the smaller value);
its test runs then carry ``<key>=<chosen value>``. The report shows each value's validation
accuracy and the choice. ``--dry-run`` (:func:`dry_run`) prints the runs a rerun would make, in
order, with an estimated run time, and writes nothing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from opsd.benchmarks.comparison import (LABELS, ComparisonSpec, curves_with_base, load_average,
                                        method_overrides, plot, run_record, runs_with_load, sample_std, summarize,
                                        table)
from opsd.benchmarks.experiment import first_last, fmt
from opsd.config import REPO_ROOT

METHODS = ("opsd_fixed", "grpo", "sft", "kd_reference")


LR_KEY = "learner.lr"


@dataclass
class AddedMethod:
    """A row appended to a finished experiment. ``recipe``: the method of benchmarks/comparison.py
    (``method_overrides``) it starts from; ``overrides`` go on top of it. Its learning rate is either
    swept (``lrs``, as the original methods' are) or taken from another method's chosen rate
    (``lr_from``), never both. With ``lr_from``, one other config key may be tuned instead: ``tune``
    names it and ``values`` are swept as rates are, under the same rule. ``seeds``: None, the spec's."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    lr_from: str | None = None
    seeds: int | None = None
    tune: str | None = None
    values: list = field(default_factory=list)

    def check(self, names: list[str]) -> None:
        where = f"sparse: added method {self.name!r}"
        if bool(self.lrs) == (self.lr_from is not None):
            raise ValueError(f"{where}: give its rates to sweep (lrs) or the method whose chosen rate it takes "
                             "(lr_from), not both and not neither")
        if self.lr_from is not None and self.lr_from not in names:
            raise ValueError(f"{where}: lr_from={self.lr_from!r} is not a method of the spec")
        if (self.tune is None) != (not self.values):
            raise ValueError(f"{where}: tune={self.tune!r} with values={self.values!r}: name the key to tune and "
                             "its values together, or neither")
        if self.tune is None:
            return
        if self.tune == LR_KEY or self.lrs:
            raise ValueError(f"{where}: tune={self.tune!r} tunes a key other than the rate, at lr_from's rate; "
                             "a rate to sweep goes in lrs")
        if self.tune in {o.partition("=")[0] for o in self.overrides}:
            raise ValueError(f"{where}: tune={self.tune!r} is also set in its overrides; name it in one place")
        if len(set(map(repr, self.values))) != len(self.values) or \
                not all(isinstance(v, (bool, int, float)) or isinstance(v, str) and re.fullmatch(r"[\w.+-]+", v)
                        for v in self.values):
            # Each value names its sweep run's file (sweep-<method>-<key><value>.json).
            raise ValueError(f"{where}: values={self.values!r}: expected distinct numbers, booleans or words "
                             "(letters, digits, . + - _)")


OPSD_CHOSEN_LR = 3e-6  # docs/results/sparse/sparse.json, chosen_lr["opsd_fixed"]
GRPO_CHOSEN_LR = 3e-5  # docs/results/sparse/sparse.json, chosen_lr["grpo"]

# The hybrids have GRPO's shape (1 prompt x 8 samples per step, its learner-side old log-probs at the
# sampling temperature, no KL term) and OPSD's fixed teacher scores the same samples.
_HYBRID = ["algo=mix", "teacher.mode=fixed", "logging.save_batches=true"]

# Rows added to the finished experiment of docs/RESULTS.md section 1 (issue 36). Appending one here
# and running `opsd bench learning --task sparse` again runs only its runs. Each starts from a
# finished method's recipe, so every setting it does not name is that method's (task, base model,
# test part, 40 steps, 384 tokens, seeds 0/1/2). Only what is new is tuned (at most two values, on
# the validation part): a row that distils takes OPSD's chosen rate; a hybrid sweeps OPSD's and
# GRPO's chosen rates; the KL anchor's weight is swept at OPSD's rate. OPSD's forward-KL end is
# beta = 0 (opsd/losses.py: 0 forward KL(p_T || p_S), 1 reverse KL, 0.5 the JSD the baseline ran);
# its loss is not bounded by log 2 per token as the JSD is, so OPSD's rate is reused untuned.
ADDED: tuple[AddedMethod, ...] = (
    AddedMethod("opsd_mask_truncated", "opsd_fixed", ["loss.mask_truncated=true"], lr_from="opsd_fixed"),
    AddedMethod("srpo", "grpo", [*_HYBRID, "objectives.mix.mode=route",
                                 "objectives.mix.parents={grpo: 1.0, opsd: 1.0}", "objectives.mix.correct=grpo"],
                lrs=[OPSD_CHOSEN_LR, GRPO_CHOSEN_LR]),
    AddedMethod("mix_opsd_grpo", "grpo", [*_HYBRID, "objectives.mix.mode=sum",
                                          "objectives.mix.parents={opsd: 0.5, grpo: 0.5}"],
                lrs=[OPSD_CHOSEN_LR, GRPO_CHOSEN_LR]),
    AddedMethod("opsd_anchor", "opsd_fixed", lr_from="opsd_fixed", tune="objectives.opsd.anchor", values=[0.1, 1.0]),
    AddedMethod("opsd_forward_kl", "opsd_fixed", ["objectives.opsd.beta=0.0"], lr_from="opsd_fixed"),
)


@dataclass
class SparseSpec:
    """What decides the numbers; ``<out>/spec.json`` holds it, and another spec refuses that directory."""

    # MATH levels 1-2: SmolLM2's own accuracy is sparse but not zero there (6.7% lenient, greedy) and
    # its teacher's, with the reference solution in the user turn, 4.8x that (docs/TASK.md); GSM8K
    # (2%) and reasoning-gym's gsm_symbolic (1%) are below the issue's 5-30% band.
    task: str = "math-easy"  # the training part; ``val`` and ``test`` name the others
    val: str = "math-easy-val"
    test: str = "math-easy-test"
    config: str = "configs/gsm8k.yaml"  # SmolLM2's settings for worked solutions; the data is overridden
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lrs: list[float] = field(default_factory=lambda: [3e-6, 1e-5, 3e-5])
    sweep_steps: int = 20
    steps: int = 40
    seeds: int = 3
    # Sized to the 10-hour budget by a probe here (AVX512-BF16 EPYC, 2 cores, bf16): an OPSD step of
    # 16 rows took 85-93 s (rollout 17 s, scoring 21 s, training 56 s; 270-token answers, 31%
    # cut at 384), and 60 test problems took about 35 s to evaluate. At 16 rows the 24 runs would
    # take about 20 hours; at 8, about 9. GRPO then samples one prompt x 8 per step.
    rows_per_step: int = 8
    grpo_n: int = 8
    eval_every: int = 10
    val_problems: int = 150
    test_problems: int = 300
    max_tokens: int = 384  # training samples and evaluation answers alike (docs/TASK.md measured MATH at 384)
    dtype: str = "bfloat16"
    # Lenient: the student rarely boxes its answer (0.3% strict before training, docs/TASK.md).
    overrides: list[str] = field(default_factory=lambda: ["grading.extract=lenient"])
    added: list[AddedMethod] = field(default_factory=lambda: list(ADDED))

    def __post_init__(self):
        self.added = [a if isinstance(a, AddedMethod) else AddedMethod(**a) for a in self.added]
        names = list(self.methods) + [a.name for a in self.added]
        if len(set(names)) != len(names):
            raise ValueError(f"sparse: method names must differ: {names}")
        for a in self.added:
            a.check(names)
        lr_of = {a.name: a.lr_from for a in self.added}
        for a in self.added:  # a chain of lr_from must end at a method that sweeps its rate
            seen, m = [a.name], a.lr_from
            while m in lr_of and lr_of[m] is not None:
                if m in seen:
                    raise ValueError(f"sparse: added methods take their rates from each other in a loop: {seen + [m]}")
                seen, m = seen + [m], lr_of[m]

    def all_methods(self) -> list[str]:
        return list(self.methods) + [a.name for a in self.added]

    def added_method(self, name: str) -> AddedMethod | None:
        return next((a for a in self.added if a.name == name), None)

    def lrs_of(self, method: str) -> list[float]:
        """The rates swept for ``method`` (none: it takes another method's chosen rate)."""
        a = self.added_method(method)
        return list(self.lrs) if a is None else list(a.lrs)

    def tuning_of(self, method: str) -> tuple[str, list] | None:
        """The key swept for ``method`` and its values: ``learner.lr`` and its rates, another key
        (at ``lr_from``'s rate), or None when nothing is swept."""
        a = self.added_method(method)
        if a is not None and a.tune is not None:
            return a.tune, list(a.values)
        lrs = self.lrs_of(method)
        return (LR_KEY, lrs) if lrs else None

    def seeds_of(self, method: str) -> int:
        a = self.added_method(method)
        return self.seeds if a is None or a.seeds is None else a.seeds

    @classmethod
    def mbpp(cls) -> "SparseSpec":
        """``--task mbpp`` (issue 38): OPSD, GRPO and SFT on MBPP, the same shape (3 rates swept for 20
        steps on seed 0, then 3 seeds x 40 steps at the chosen rate), graded by each problem's asserts
        in the sandbox. The probe (docs/TASK.md) put the student at 0.060 pass@1 on ``mbpp-test`` and
        its teacher, with the reference code, at 0.300. Float32, not the sparse runs' bf16: the
        machines that run it have had AVX2 only, where bf16 is ~60x slower; float32 is the exact
        arithmetic and runs anywhere, and spec.json keeps every run on it."""
        return cls(task="mbpp", val="mbpp-val", test="mbpp-test", config="configs/mbpp.yaml",
                   methods=["opsd_fixed", "grpo", "sft"], val_problems=50, test_problems=200, dtype="float32",
                   overrides=[], added=[])

    @classmethod
    def quick(cls) -> "SparseSpec":
        """Both phases in a few steps on the tiny random model and the toy set: the wiring only, with
        one appended row that tunes a key other than the rate (the anchor's weight) at OPSD's rate."""
        anchor = AddedMethod("opsd_anchor", "opsd_fixed", lr_from="opsd_fixed", tune="objectives.opsd.anchor",
                             values=[0.1, 1.0])
        return cls(task="data/toy/train.jsonl", val="data/toy/test.jsonl", test="data/toy/test.jsonl",
                   config="configs/tiny.yaml", lrs=[1e-5, 1e-4], sweep_steps=2, steps=2, seeds=1, rows_per_step=4,
                   grpo_n=2, eval_every=2, val_problems=8, test_problems=8, max_tokens=24, dtype="float32",
                   overrides=["model.max_model_len=512", "rollout.kv_cache_mb=256", "learner.micro_batch_size=4"],
                   added=[anchor])

    def runs_planned(self) -> int:
        return sum(len((self.tuning_of(m) or ("", []))[1]) + self.seeds_of(m) for m in self.all_methods())


def check_spec(saved: dict, spec: SparseSpec, where: str = "spec.json") -> None:
    """Refuse ``spec`` for a directory whose runs were made under ``saved`` (its spec.json), unless it
    only appends methods: every other setting, and every method already there, must be unchanged."""
    new = asdict(spec)
    old_added = {a["name"]: a for a in saved.get("added", [])}  # a spec.json from before appending existed
    new_added = {a["name"]: a for a in new["added"]}
    for key in sorted((set(saved) | set(new)) - {"added"}):
        if saved.get(key) != new.get(key):
            raise SystemExit(f"{where} holds runs made with {key}={saved.get(key)!r}, not {new.get(key)!r}: changing a "
                             "setting of finished runs would mix two experiments; pass another --out, or append a "
                             "method (benchmarks/sparse.py, ADDED) to add rows to this one")
    for name, old in old_added.items():
        old = asdict(AddedMethod(**old))  # a spec.json from before a field existed holds its default
        if name not in new_added:
            raise SystemExit(f"{where} holds the added method {name!r}, which this spec lacks: its runs would be "
                             "orphaned; keep it in ADDED (benchmarks/sparse.py)")
        if new_added[name] != old:
            changed = sorted(k for k in old if old[k] != new_added[name].get(k))
            raise SystemExit(f"{where}: the added method {name!r} changed ({', '.join(changed)}): its finished runs "
                             "were made without that change; add a method under a new name instead")
    if list(new_added)[: len(old_added)] != list(old_added):
        raise SystemExit(f"{where}: added methods are appended, not reordered: expected {list(old_added)} first")


def sweep_value(record: dict):
    """The value a sweep run tried: its ``value`` for a tuned key, else its rate (records from before
    other keys could be tuned hold only ``lr``)."""
    return record["value"] if "value" in record else record["lr"]


def plan(spec: SparseSpec, sweep: list[dict],
         runs: list[dict]) -> tuple[list[tuple[str, object]], list[tuple[str, int]]]:
    """The runs not finished yet: (method, value) of the sweep, the rate sweeps first and then the
    sweeps of other keys (which run at a rate another sweep chooses), then (method, seed) of the test
    part, seed-major (a cut-short experiment has every method at the seeds it reached)."""
    tunings = {m: spec.tuning_of(m) for m in spec.all_methods()}
    order = [m for m in spec.all_methods() if tunings[m] and tunings[m][0] == LR_KEY] + \
            [m for m in spec.all_methods() if tunings[m] and tunings[m][0] != LR_KEY]
    todo_sweep = [(m, v) for m in order for v in tunings[m][1]
                  if not any(r["method"] == m and sweep_value(r) == v for r in sweep)]
    todo_runs = [(m, seed) for seed in range(max(spec.seeds_of(m) for m in spec.all_methods()))
                 for m in spec.all_methods() if seed < spec.seeds_of(m)
                 and not any(r["method"] == m and r["seed"] == seed for r in runs)]
    return todo_sweep, todo_runs


def _complete(spec: SparseSpec, method: str, sweep: list[dict]) -> list[dict] | None:
    """``method``'s sweep records when every value of its sweep has one, else None."""
    tuning = spec.tuning_of(method)
    if tuning is None:
        return None
    wanted = {repr(v) for v in tuning[1]}
    rs = [r for r in sweep if r["method"] == method and repr(sweep_value(r)) in wanted]
    return rs if {repr(sweep_value(r)) for r in rs} == wanted else None


def chosen_lrs(spec: SparseSpec, sweep: list[dict]) -> dict[str, float]:
    """Each method's rate, for the methods whose sweep (or whose ``lr_from`` method's) is complete."""
    chosen = {}
    for m in spec.all_methods():
        rs = _complete(spec, m, sweep)
        if spec.lrs_of(m) and rs is not None:
            chosen[m] = choose_lr(rs)
    for _ in spec.added:  # enough passes to follow any chain of lr_from (SparseSpec refuses loops)
        for a in spec.added:
            if a.lr_from is not None and a.lr_from in chosen:
                chosen[a.name] = chosen[a.lr_from]
    return chosen


def chosen_values(spec: SparseSpec, sweep: list[dict]) -> dict[str, object]:
    """The chosen value of each method that tunes a key other than the rate, once its sweep is complete."""
    out = {}
    for a in spec.added:
        rs = _complete(spec, a.name, sweep) if a.tune is not None else None
        if rs is not None:
            out[a.name] = choose_value(rs)
    return out


def sweep_run(spec: SparseSpec, method: str, value, sweep: list[dict]) -> tuple[str, float | None, object]:
    """One sweep run of ``method`` at ``value``: its record's name, its rate (None while the rate it
    takes is not chosen yet) and the value of the other key it tunes (None for a rate sweep)."""
    key, _ = spec.tuning_of(method)
    if key == LR_KEY:
        return f"sweep-{method}-lr{value:g}", value, None
    short = f"{value:g}" if isinstance(value, float) else value_text(value)  # as the rate's: lr1e-05, anchor1
    return f"sweep-{method}-{key.rsplit('.', 1)[-1]}{short}", chosen_lrs(spec, sweep).get(method), value


def seed_run(spec: SparseSpec, method: str, seed: int, sweep: list[dict]) -> tuple[str, float | None, object]:
    """One test run: its record's name, its chosen rate and the chosen value of the other key it
    tunes (None where the method tunes none, or while its sweep is unfinished)."""
    return f"{method}-s{seed}", chosen_lrs(spec, sweep).get(method), chosen_values(spec, sweep).get(method)


def _comparison_spec(spec: SparseSpec, *, steps: int, eval_every: int, eval_problems: int) -> ComparisonSpec:
    return ComparisonSpec(config=spec.config, seeds=1, steps=steps, rows_per_step=spec.rows_per_step,
                          grpo_n=spec.grpo_n, eval_every=eval_every, eval_problems=eval_problems, dtype=spec.dtype,
                          methods=list(spec.methods), overrides=list(spec.overrides))


def value_text(value) -> str:
    """A swept value as a command-line override reads it back (a float stays a float: 1.0, not 1)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def run_overrides(spec: SparseSpec, method: str, seed: int, lr: float, *, sweep: bool, temperature: float,
                  value=None) -> list[str]:
    """One run's overrides: the comparison's per-method recipe (benchmarks/comparison.py) on this
    task, at ``lr``, evaluated on the validation part (sweep) or the test part; ``value``: that of
    the key the method tunes other than the rate (the value tried, or the chosen one)."""
    steps = spec.sweep_steps if sweep else spec.steps
    cspec = _comparison_spec(spec, steps=steps, eval_every=steps if sweep else spec.eval_every,
                             eval_problems=spec.val_problems if sweep else spec.test_problems)
    added = spec.added_method(method)
    recipe = method_overrides(cspec, method if added is None else added.recipe, seed, temperature)
    tuned = []
    if added is not None and added.tune is not None:
        if value is None:
            raise ValueError(f"sparse: {method!r} tunes {added.tune}: a run of it needs its value")
        tuned = [f"{added.tune}={value_text(value)}"]
    elif value is not None:
        raise ValueError(f"sparse: {method!r} tunes no key other than the rate; value={value!r} has nowhere to go")
    return [*recipe, *(added.overrides if added else []), *tuned, f"data.train_path={spec.task}",
            f"eval.path={spec.val if sweep else spec.test}", f"learner.lr={lr:g}", f"rollout.max_tokens={spec.max_tokens}",
            f"eval.max_tokens={spec.max_tokens}", "prompt.overlong=skip",
            # The stages run one after another: each may use both cores (configs/local.yaml).
            "rollout.num_threads=2", "scorer.num_threads=2"]


def choose_lr(sweep: list[dict]) -> float:
    """The rate with the best final validation accuracy; on a tie, the smaller."""
    return min(sweep, key=lambda r: (-r["evals"][-1]["accuracy"], r["lr"]))["lr"]


def choose_value(sweep: list[dict]):
    """The rule of :func:`choose_lr` over the swept key's values: the best final validation
    accuracy; on a tie, the smaller value (for a weight, the smaller change to the recipe)."""
    return sweep_value(min(sweep, key=lambda r: (-r["evals"][-1]["accuracy"], sweep_value(r))))


def standard_error(p: float, n: int) -> float:
    """The binomial standard error of an accuracy p measured on n problems."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def evaluated(records: list[dict], asked: int) -> int:
    """How many problems the runs' last evaluation graded: ``asked``, less the prompts that
    ``prompt.overlong=skip`` left out (a record from before the count was kept says ``asked``)."""
    counts = {r["evals"][-1].get("problems") or asked for r in records if r["evals"]}
    return min(counts) if counts else asked


# --- the report ---------------------------------------------------------------------------------------


def _cell(last: dict, n: int) -> str:
    return (f"{last['accuracy']:.3f} ({standard_error(last['accuracy'], n):.3f}; "
            f"{_percent(last.get('truncated_frac'))} cut)")


def sweep_table(spec: SparseSpec, sweep: dict[str, list[dict]], chosen: dict[str, float],
                values: dict[str, object] | None = None) -> str:
    """The rate sweep (a column per rate) and, below it, the sweeps of other keys (a row per value
    tried); ``chosen``: the rates, ``values``: the chosen values of the other keys."""
    lrs = sorted({lr for m in spec.all_methods() for lr in spec.lrs_of(m)})
    head = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |"
    n = evaluated([r for rs in sweep.values() for r in rs], spec.val_problems)
    lines = [f"Validation accuracy ({spec.val}, {n} problems, greedy) after {spec.sweep_steps} steps, "
             "seed 0; in brackets the binomial standard error and the share of answers cut at "
             f"{spec.max_tokens} tokens.",
             "", head,
             "| --- | " + " | ".join("---" for _ in lrs) + " | --- |"]
    for m in spec.all_methods():
        rate_swept = (spec.tuning_of(m) or ("",))[0] == LR_KEY
        by_lr = {r["lr"]: r["evals"][-1] for r in sweep.get(m, []) if rate_swept}
        cells = [_cell(by_lr[lr], n) if lr in by_lr else "—" for lr in lrs]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {fmt(chosen.get(m), 'g')} |")
    tuned = [a for a in spec.added if a.tune is not None]
    if tuned:
        values = values or {}
        lines += ["", "Other settings tuned the same way (same part, steps, seed and rule: the best final "
                  "validation accuracy, a tie to the smaller value), each at the rate its row takes:", "",
                  "| method | key | value | at lr | validation accuracy | chosen |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for a in tuned:
            by_value = {repr(sweep_value(r)): r for r in sweep.get(a.name, [])}
            for v in a.values:
                r = by_value.get(repr(v))
                mark = "**chosen**" if a.name in values and repr(values[a.name]) == repr(v) else ""
                lines.append(f"| {LABELS.get(a.name, a.name)} | `{a.tune}` | {value_text(v)} | "
                             f"{fmt(r['lr'] if r else chosen.get(a.name), 'g')} | "
                             f"{_cell(r['evals'][-1], n) if r else 'not run yet'} | {mark} |")
    # The sweep runs made since the steps kept the diagnostics, one row each.
    in_order = [r for rs in sweep.values() for r in sorted(rs, key=lambda r: (r["lr"], str(r.get("value"))))]
    with_series = {_run_label(r): r for r in in_order
                   if any(x.get("stop_prob_student_finished") is not None for x in r.get("steps", []))}
    if with_series:
        rows = {k: collapse_rows({r["method"]: [r]}, n)[r["method"]] for k, r in with_series.items()}
        lines += ["", diagnostics_table(rows, "the sweep runs, means over steps",
                                        labels={k: k for k in rows})]
    return "\n".join(lines) + "\n"


def _run_label(r: dict) -> str:
    """A sweep run's row name: its method and the setting it tried."""
    setting = f"{r['tuned']}={value_text(r['value'])}" if "value" in r else f"lr {r['lr']:g}"
    return f"{LABELS.get(r['method'], r['method'])}, {setting}"


def run_time_by_machine(records: list[dict]) -> dict[str, dict]:
    """Run seconds and run count per machine: an experiment finished in chunks can span several kinds
    of machine, and wall times are only comparable within one."""
    out: dict[str, dict] = {}
    for r in records:
        row = out.setdefault(r.get("machine", "unknown machine"), {"runs": 0, "run_wall_seconds": 0.0})
        row["runs"] += 1
        row["run_wall_seconds"] += r["run_wall_seconds"]
    return out


def run_time_line(by_machine: dict[str, dict]) -> str:
    parts = [f"{v['run_wall_seconds'] / 3600:.2f} h ({v['run_wall_seconds']:,.0f} s, {v['runs']} "
             f"run{'s' * (v['runs'] != 1)}) on {m}" for m, v in by_machine.items()]
    total = sum(v["run_wall_seconds"] for v in by_machine.values())
    line = f"Run time: {total / 3600:.2f} h in all: " + "; ".join(parts) + "."
    if len(by_machine) > 1:
        line += " Wall-time columns mix these machines: compare them only within one."
    return line


def _percent(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def collapse_rows(by_method: dict[str, list[dict]], n: int, against: str = "grpo") -> dict[str, dict]:
    """Per method with test runs (its records with the shared step-0 point in front), the figures
    issue 36 asks of every row, each a mean over seeds: accuracy, the share of answers cut and their
    mean length at each evaluation; each seed's mean accuracy over the evaluations after step 0; the
    repeated 4-gram rate of the training samples (means of the first and the last 5 steps) and of the
    last evaluation's answers; the teacher - student stop-probability gap at the last position of
    finished and of cut training samples (mean over steps); and what a guard or hybrid did (steps
    with no loss token, so no update; the KL to the initial policy; the share of tokens a routing mix
    sent to its parent for correct samples). Against ``against`` (GRPO): the difference of the means
    over steps after 0, with two standard errors of it: from the seeds' spread, sqrt(s_a^2/k_a +
    s_b^2/k_b), and from the problem set, sqrt(2 p(1 - p) / n) at the two rows' pooled mean p (the
    seeds of every row are graded on the same n problems, so this part does not shrink with seeds; it
    treats the two rows' grades as unpaired, an upper bound where they agree problem by problem).
    A difference is called beyond two standard errors only if it exceeds twice the larger."""
    out: dict[str, dict] = {}
    for m, rs in by_method.items():
        steps = sorted({e["step"] for r in rs for e in r["evals"]})
        at = {k: {st: _mean(e.get(k) for r in rs for e in r["evals"] if e["step"] == st) for st in steps}
              for k in ("accuracy", "truncated_frac", "response_len")}
        after = [_mean(e["accuracy"] for e in r["evals"] if e["step"] > 0) for r in rs]
        after = [a for a in after if a is not None]

        def per_run(key: str) -> list[float | None]:
            return [_mean(x.get(key) for x in r["steps"]) for r in rs]

        repeated = first_last(rs, "repeated_ngram_rate")

        row = {"seeds": [r["seed"] for r in rs], "steps": steps,
               "accuracy_at": at["accuracy"], "truncated_frac_at": at["truncated_frac"],
               "response_len_at": at["response_len"],
               "mean_after_step_0": _mean(after), "mean_after_step_0_std": sample_std(after),
               "mean_after_step_0_per_seed": after,
               "repeated_ngram_rate_first": repeated[0], "repeated_ngram_rate_last": repeated[1],
               "repeated_ngram_rate_eval_last": _mean(r["evals"][-1].get("repeated_ngram_rate") for r in rs),
               "stop_gap_finished": _mean(per_run("stop_gap_finished")),
               "stop_gap_truncated": _mean(per_run("stop_gap_truncated")),
               # of the runs that measured it: one from before the series, one under
               # loss.mask_truncated before schema 5, or one with no cut sample on any step did not
               "stop_gap_truncated_runs": sum(v is not None for v in per_run("stop_gap_truncated")),
               "stop_prob_student_finished": _mean(per_run("stop_prob_student_finished")),
               "stop_prob_teacher_finished": _mean(per_run("stop_prob_teacher_finished")),
               "updates_skipped": _mean([sum(bool(x.get("update_skipped")) for x in r["steps"]) for r in rs
                                         if any("update_skipped" in x for x in r["steps"])]),
               "anchor_kl": _mean(per_run("anchor_kl")),
               "correct_frac": _mean(per_run("correct_frac"))}
        out[m] = row
    ref = out.get(against)
    for m, row in out.items():
        if ref is None or m == against or row["mean_after_step_0"] is None or ref["mean_after_step_0"] is None:
            continue
        d = row["mean_after_step_0"] - ref["mean_after_step_0"]
        se_seeds = math.sqrt(row["mean_after_step_0_std"] ** 2 / len(row["mean_after_step_0_per_seed"])
                             + ref["mean_after_step_0_std"] ** 2 / len(ref["mean_after_step_0_per_seed"]))
        p = (row["mean_after_step_0"] + ref["mean_after_step_0"]) / 2
        se_problems = math.sqrt(2 * p * (1 - p) / n) if n else float("nan")
        row[f"vs_{against}"] = {"difference": d, "se_seeds": se_seeds, "se_problems": se_problems,
                                "beyond_two_se": abs(d) > 2 * max(se_seeds, se_problems)}
    return out


def collapse_table(rows: dict[str, dict], against: str = "grpo") -> str:
    """The markdown of :func:`collapse_rows`: one table of accuracy and length per evaluation, one of
    the diagnostics."""
    def series(xs: dict, spec: str) -> str:
        return " / ".join(fmt(v, spec) for v in xs.values())

    def pct(xs: dict) -> str:
        return " / ".join(_percent(v) for v in xs.values())

    steps = next(iter(rows.values()))["steps"] if rows else []
    at = " / ".join(str(s) for s in steps)
    lines = [f"Per row, means over seeds, at steps {at} (step 0 is the shared base point). The mean over the "
             f"steps after 0 is compared with {LABELS.get(against, against)}'s: the difference, two standard "
             "errors of it (from the seeds' spread; from the problem set, unpaired: an upper bound), and whether "
             "it exceeds twice the larger.",
             "", f"| method | seeds | accuracy at {at} | mean after step 0 (per seed) | vs {LABELS.get(against, against)}: "
             "difference (2 SE seeds; 2 SE problems) | cut at " + at + f" | answer length at {at} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in rows.items():
        v = r.get(f"vs_{against}")
        vs = (f"{v['difference']:+.3f} ({2 * v['se_seeds']:.3f}; {2 * v['se_problems']:.3f})"
              f"{' **beyond 2 SE**' if v['beyond_two_se'] else ''}") if v else "—"
        lines.append(f"| {LABELS.get(m, m)} | {len(r['seeds'])} | {series(r['accuracy_at'], '.3f')} "
                     f"| {fmt(r['mean_after_step_0'])} ({', '.join(f'{a:.3f}' for a in r['mean_after_step_0_per_seed'])}) "
                     f"| {vs} | {pct(r['truncated_frac_at'])} | {series(r['response_len_at'], '.0f')} |")
    return "\n".join(lines + ["", diagnostics_table(rows, "means over steps and seeds")])


def diagnostics_table(rows: dict[str, dict], over: str, labels: dict[str, str] | None = None) -> str:
    """The training samples' collapse diagnostics of :func:`collapse_rows`' rows (a method's test
    runs, or one sweep run each), as markdown; ``labels``: each row's name where it is not a method."""
    labels = labels or {}
    lines = ["Collapse diagnostics of the training samples (" + over + "; — where a run "
              "predates the series or the row has none): the repeated 4-gram rate (first → last 5 steps) and "
              "at the last evaluation; the student's and the teacher's probability of stopping at the last "
              "position of finished samples, and the gap teacher - student there and at cut samples (over the "
              "runs that measured it, where not all did); steps "
              "with no loss token (no update, per run); the KL to the initial policy (the anchor); the share "
              "of tokens routed to the parent for correct samples (a routing mix).", "",
              "| method | repeated 4-grams, train first → last | at the last evaluation | stop prob. student / "
              "teacher, finished | gap, finished | gap, cut | steps without update | anchor KL | routed to "
              "correct-sample parent |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in rows.items():
        routed = "—" if r["correct_frac"] is None else f"{100 * r['correct_frac']:.1f}%"
        measured, runs = r.get("stop_gap_truncated_runs", 0), len(r["seeds"])
        cut_gap = fmt(r["stop_gap_truncated"], "+.4f") + (f" ({measured} of {runs} runs)" if 0 < measured < runs else "")
        lines.append(f"| {labels.get(m) or LABELS.get(m, m)} | {fmt(r['repeated_ngram_rate_first'], '.2f')} → "
                     f"{fmt(r['repeated_ngram_rate_last'], '.2f')} | {fmt(r['repeated_ngram_rate_eval_last'], '.2f')} "
                     f"| {fmt(r['stop_prob_student_finished'])} / {fmt(r['stop_prob_teacher_finished'])} "
                     f"| {fmt(r['stop_gap_finished'], '+.3f')} | {cut_gap} "
                     f"| {fmt(r['updates_skipped'], '.1f')} | {fmt(r['anchor_kl'], '.4f')} "
                     f"| {routed} |")
    return "\n".join(lines)


def write_report(spec: SparseSpec, sweep: list[dict], runs: list[dict], extract: str, out_dir: Path,
                 experiment: str = "sparse") -> dict:
    """``<out_dir>/<experiment>.{json,md,png}`` from the finished records; ``experiment``: its
    ``--task`` (sparse, mbpp), which names the files and the title."""
    from opsd.benchmarks.machine import machine

    by_sweep = {m: [r for r in sweep if r["method"] == m] for m in spec.all_methods()}
    chosen, values = chosen_lrs(spec, sweep), chosen_values(spec, sweep)
    rate_swept = {m for m in spec.all_methods() if (spec.tuning_of(m) or ("",))[0] == LR_KEY}
    base = next((r["evals"][0] for r in runs if r["evals"] and r["evals"][0]["step"] == 0), None)
    base_point = {k: base.get(k) for k in ("accuracy", "format_rate", "response_len", "truncated_frac")} \
        if base else None
    by_method = {m: curves_with_base([r for r in runs if r["method"] == m], base_point)
                 for m in spec.all_methods() if any(r["method"] == m for r in runs)}
    n = evaluated(runs, spec.test_problems)  # the table's base line names the problems graded, not those asked
    by_machine = run_time_by_machine(sweep + runs)
    report = {"spec": asdict(spec) | {"eval_problems": n}, "extract": extract, "machine": machine(),
              "val_problems_graded": evaluated(sweep, spec.val_problems),
              "chosen_lr": chosen, "sweep": {m: {f"{r['lr']:g}": r["evals"][-1]["accuracy"] for r in rs
                                                 if m in rate_swept} for m, rs in by_sweep.items()},
              # The keys other than the rate: each value's final validation accuracy and the choice.
              "tuned": {a.name: {"key": a.tune, "lr": chosen.get(a.name), "chosen": values.get(a.name),
                                 "accuracy": {value_text(sweep_value(r)): r["evals"][-1]["accuracy"]
                                              for r in by_sweep[a.name]}}
                        for a in spec.added if a.tune is not None},
              "runs_done": len(sweep) + len(runs), "runs_planned": spec.runs_planned(),
              "run_wall_seconds_total": sum(v["run_wall_seconds"] for v in by_machine.values()),
              "run_time_by_machine": by_machine,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "title": f"opsd bench learning --task {experiment}: SmolLM2-135M-Instruct, {spec.task}; {spec.steps} "
                       f"steps x {spec.rows_per_step} rows at each method's chosen rate; mean ± std over seeds"}
    md = [sweep_table(spec, by_sweep, chosen, values), "", run_time_line(by_machine)]
    if by_method:
        by_seed = sorted(runs, key=lambda r: r["seed"])
        report["test_problems_graded"] = n
        report["summary"] = summarize(by_method)
        # The test runs' loads (a sweep run keeps its own in its record).
        report["runs_with_load"] = runs_with_load(runs, tuple(spec.all_methods()))
        for m, row in report["summary"]["methods"].items():
            row["lr"] = chosen.get(m)
            if m in values:
                row["tuned"] = {spec.added_method(m).tune: values[m]}
            row["final_accuracy_se"] = standard_error(row["final_accuracy_mean"], n)
        md += ["", f"Test ({spec.test}, {n} problems, greedy): one run's binomial standard error at "
               "accuracy p is sqrt(p(1-p)/n); at the mean final accuracies: " + ", ".join(
                   f"{LABELS.get(m, m)} {r['final_accuracy_se']:.3f}" for m, r in report["summary"]["methods"].items())
               + ".", "", table(report), "",
               f"Answers cut at {spec.max_tokens} tokens at the last evaluation, per seed: " +
               "; ".join(f"{LABELS.get(m, m)} " + ", ".join(_percent(r["evals"][-1].get("truncated_frac"))
                                                            for r in by_seed if r["method"] == m)
                         for m in by_method) + "."]
        report["collapse"] = collapse_rows(by_method, n)
        md += ["", collapse_table(report["collapse"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{experiment}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{experiment}.md").write_text("\n".join(md))
    if by_method:
        plot(report, by_method, out_dir / f"{experiment}.png")
    return report


# --- the experiment -------------------------------------------------------------------------------------


def load_records(runs_out: Path, extract: str | None = None) -> tuple[list[dict], list[dict]]:
    """The finished runs' records in ``runs_out``: (sweep, test). With ``extract``, a record from
    before the evaluations kept their counts, or before the steps kept the guards' and hybrids'
    series (``update_skipped``, ``anchor_kl``, ``correct_frac``), is completed from its own run's
    metrics, where they are still on disk, and saved; everything else in it (its wall time,
    machine, note) is kept. Without ``extract`` (a dry run) nothing is written."""
    records = []
    for path in sorted(runs_out.glob("*.json")):
        record = json.loads(path.read_text())
        old_evals = bool(record["evals"]) and "truncated_frac" not in record["evals"][-1]
        old_steps = bool(record.get("steps")) and "update_skipped" not in record["steps"][0]
        if extract is not None and (old_evals or old_steps) and (Path(record["run_dir"]) / "metrics.jsonl").is_file():
            fresh = run_record(Path(record["run_dir"]), record["method"], record["seed"], extract,
                               record["run_wall_seconds"])
            record["evals"] = fresh["evals"] if old_evals else record["evals"]
            record["steps"] = fresh["steps"] if old_steps else record["steps"]
            _save(runs_out, path.stem, record)
        records.append(record)
    return [r for r in records if r.get("phase") == "sweep"], [r for r in records if r.get("phase") == "test"]


def step_paces(done: list[dict]) -> tuple[dict[str, tuple[float, str]], str | None]:
    """Planning figures for one training step, per method, from finished runs of both phases: on the
    machine that ran most of them, the mean run time per step (evaluations included) over the
    method's test runs, or over its sweep runs before it has one (then low: test runs evaluate more
    often, on more problems); each with the phase it came from. Returns them and that machine."""
    records = [r for r in done if r.get("steps")]
    if not records:
        return {}, None
    machines = [r.get("machine", "unknown machine") for r in records]
    where = max(set(machines), key=machines.count)
    paces: dict[str, tuple[float, str]] = {}
    for phase in ("sweep", "test"):  # a method's test runs replace its sweep runs
        per_method: dict[str, list[float]] = {}
        for r, machine in zip(records, machines):
            if machine == where and r.get("phase") == phase:
                per_method.setdefault(r["method"], []).append(r["run_wall_seconds"] / r["steps"][-1]["step"])
        paces |= {m: (sum(v) / len(v), phase) for m, v in per_method.items()}
    return paces, where


def dry_run(spec: SparseSpec, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """The runs a rerun of ``run_sparse`` on ``out_dir`` would make, in order, with their settings
    and an estimated run time; runs nothing and writes nothing. A spec that ``out_dir`` would refuse
    is refused here too."""
    out_dir = Path(out_dir)
    spec_file = out_dir / "spec.json"
    if spec_file.is_file():
        check_spec(json.loads(spec_file.read_text()), spec, str(spec_file))
    sweep, runs = load_records(out_dir / "runs")
    todo_sweep, todo_runs = plan(spec, sweep, runs)
    paces, where = step_paces(sweep + runs)
    slowest = max(paces.values(), default=None)
    rows = []
    for method, tried in todo_sweep:
        name, lr, value = sweep_run(spec, method, tried, sweep)
        rows.append({"phase": "sweep", "run": name, "method": method, "seed": 0, "lr": lr, "value": value,
                     "steps": spec.sweep_steps, "eval": spec.val})
    for method, seed in todo_runs:
        name, lr, value = seed_run(spec, method, seed, sweep)
        rows.append({"phase": "test", "run": name, "method": method, "seed": seed, "lr": lr, "value": value,
                     "steps": spec.steps, "eval": spec.test})
    for row in rows:
        a = spec.added_method(row["method"])
        row["tuned"] = a.tune if a is not None else None
        pace = paces.get(row["method"], slowest)
        row["estimated_seconds"] = pace[0] * row["steps"] if pace else None
    total = sum(r["estimated_seconds"] for r in rows) if slowest else None
    planned = {r["method"] for r in rows}
    report = {"out": str(out_dir), "runs_done": len(sweep) + len(runs), "runs_planned": spec.runs_planned(),
              "plan": rows, "estimated_seconds_total": total,
              "seconds_per_step": slowest[0] if slowest else None, "paced_on": where,
              "paces": {m: {"seconds_per_step": v, "from": phase} for m, (v, phase) in paces.items()},
              "paced_by": None if slowest is None else
              "sweep" if any(paces.get(m, slowest)[1] == "sweep" for m in planned) else "test"}
    log(plan_text(report))
    return report


def plan_text(report: dict) -> str:
    """The dry run's plan as a markdown table, with what its estimate rests on."""
    def setting(r: dict) -> str:
        lr = fmt(r["lr"], "g") if r["lr"] is not None else "its sweep's choice"
        if r["tuned"] is None:
            return f"lr {lr}"
        if r["value"] is None:
            return f"lr {lr}, `{r['tuned']}` at its sweep's choice"
        return f"lr {lr}, `{r['tuned']}={value_text(r['value'])}`"

    done = f"{report['runs_done']} of {report['runs_planned']} runs done in {report['out']}"
    if not report["plan"]:
        return f"{done}: nothing left to run; without --dry-run the same command only redraws the report.\n"
    lines = [f"{done}; {len(report['plan'])} to run, in this order:", "",
             "| # | run | phase | method | seed | setting | steps | evaluated on | estimated |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(report["plan"], 1):
        est = f"{r['estimated_seconds']:,.0f} s" if r["estimated_seconds"] is not None else "?"
        lines.append(f"| {i} | {r['run']} | {r['phase']} | {LABELS.get(r['method'], r['method'])} | {r['seed']} | "
                     f"{setting(r)} | {r['steps']} | {r['eval']} | {est} |")
    if report["seconds_per_step"] is None:
        lines += ["", "No finished run to estimate the run time from."]
    else:
        total, paces = report["estimated_seconds_total"], report.get("paces", {})
        each = "; ".join(f"{LABELS.get(m, m)} {p['seconds_per_step']:.1f} s over its {p['from']} runs"
                         for m, p in sorted(paces.items()))
        unpaced = sorted({r["method"] for r in report["plan"]} - set(paces))
        if unpaced:
            each += (f"; {', '.join(LABELS.get(m, m) for m in unpaced)} at the slowest's "
                     f"{report['seconds_per_step']:.1f} s, having no finished run")
        low = "" if report.get("paced_by", "test") == "test" else (
            " A method paced by its sweep runs is costed low: test runs evaluate more often, on more problems.")
        lines += ["", f"Estimated run time: {total:,.0f} s ({total / 3600:.1f} h), at each method's mean per step, "
                  f"evaluations included, on {report['paced_on']} ({each}); on another machine scale it.{low}"]
    return "\n".join(lines) + "\n"


def _fits(done: list[dict], method: str, t_start: float, budget_minutes: float | None, key: str,
          steps: int) -> bool:
    """Whether a ``key`` run (sweep or test) of ``method``, ``steps`` long, would end within the
    budget: costed at the longest finished run of that method and phase; before there is one, as the
    dry run costs it (``step_paces``: the method's pace per step, the slowest's for a method with no
    run) times ``steps``, so a first 40-step test run is not costed as a 20-step sweep run."""
    if budget_minutes is None:
        return True
    walls = [r["run_wall_seconds"] for r in done if r["method"] == method and r.get("phase") == key]
    if walls:
        cost = max(walls)
    else:
        paces, _ = step_paces(done)
        pace = paces.get(method, max(paces.values(), default=(0.0, "")))
        cost = pace[0] * steps
    return time.perf_counter() - t_start + cost <= budget_minutes * 60


def within_budget(todo_runs: list[tuple[str, int]], fits: Callable[[str], bool],
                  passed: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """The test runs to start, in plan order, each asked ``fits(method)`` just before it starts: one
    that would not fit is passed over (appended to ``passed``) for the later runs of its seed that
    do, and no run of a later seed starts after it, so a chunk still leaves every method within one
    seed of the others."""
    for method, seed in todo_runs:
        if passed and seed != passed[0][1]:
            return
        if fits(method):
            yield method, seed
        else:
            passed.append((method, seed))


def run_sparse(spec: SparseSpec, out_dir: str | Path, work_dir: str | Path | None = None,
               budget_minutes: float | None = None, log: Callable[[str], None] = print,
               experiment: str = "sparse", note: str | None = None) -> dict:
    """Both phases (see the module docstring); returns the report. ``experiment``: its ``--task``
    (sparse, mbpp), which names the report's files and the default ``work_dir``
    (``artifacts/<experiment>``); ``note``: what else runs on the machine, kept in each record
    beside the load average at the run's start and end."""
    from opsd.config import load_config
    from opsd.launch.cluster import init_ray, shutdown_ray
    from opsd.launch.driver import train

    t_start = time.perf_counter()
    out_dir, runs_out = Path(out_dir), Path(out_dir) / "runs"
    runs_out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else REPO_ROOT / "artifacts" / experiment
    config = str(REPO_ROOT / spec.config) if not Path(spec.config).is_absolute() else spec.config
    base_cfg = load_config(config, [*spec.overrides, f"data.train_path={spec.task}"])
    spec_file = out_dir / "spec.json"
    if spec_file.is_file():
        check_spec(json.loads(spec_file.read_text()), spec, str(spec_file))
    spec_file.write_text(json.dumps(asdict(spec), indent=1) + "\n")

    sweep, runs = load_records(runs_out, base_cfg.grading.extract)
    todo_sweep, todo_runs = plan(spec, sweep, runs)
    run_log = lambda line: log(f"{experiment}: {line}")  # noqa: E731
    log(f"{experiment}: {len(sweep) + len(runs)} of {spec.runs_planned()} runs done in {runs_out}")
    started = init_ray(load_config(config, [*spec.overrides, "cluster.num_cpus=2"])) if todo_sweep or todo_runs \
        else False
    try:
        for method, tried in todo_sweep:
            name, lr, value = sweep_run(spec, method, tried, sweep)
            if not _fits(sweep + runs, method, t_start, budget_minutes, "sweep", spec.sweep_steps):
                log(f"{experiment}: stopping before {name}: it would not fit in --budget-minutes={budget_minutes:g}; "
                    "run the same command again to go on")
                return write_report(spec, sweep, runs, base_cfg.grading.extract, out_dir, experiment)
            if lr is None:  # plan() orders the rate sweeps first: only a broken spec gets here
                raise SystemExit(f"{experiment}: {name} needs the rate of {spec.added_method(method).lr_from!r}, "
                                 "whose sweep is not finished")
            record = _one_run(spec, work / "runs" / name, method, 0, lr, True, base_cfg, config, train, sweep,
                              run_log, value, note)
            _save(runs_out, name, record)
            sweep.append(record)
            write_report(spec, sweep, runs, base_cfg.grading.extract, out_dir, experiment)
        log(f"{experiment}: chosen learning rates: " +
            ", ".join(f"{m} {lr:g}" for m, lr in chosen_lrs(spec, sweep).items()))
        values = chosen_values(spec, sweep)
        if values:
            log(f"{experiment}: chosen values: " + ", ".join(f"{m} {spec.added_method(m).tune}={value_text(v)}"
                                                             for m, v in values.items()))
        passed: list[tuple[str, int]] = []
        fits = lambda method: _fits(sweep + runs, method, t_start, budget_minutes, "test", spec.steps)  # noqa: E731
        for method, seed in within_budget(todo_runs, fits, passed):
            name, lr, value = seed_run(spec, method, seed, sweep)
            record = _one_run(spec, work / "runs" / name, method, seed, lr, False, base_cfg, config,
                              train, runs, run_log, value, note)
            _save(runs_out, name, record)
            runs.append(record)
            write_report(spec, sweep, runs, base_cfg.grading.extract, out_dir, experiment)
        if passed:
            log(f"{experiment}: passed over " + ", ".join(f"{m} seed {sd}" for m, sd in passed) +
                f": each would not fit in --budget-minutes={budget_minutes:g}; run the same command again to go on")
            return write_report(spec, sweep, runs, base_cfg.grading.extract, out_dir, experiment)
    finally:
        if started:
            shutdown_ray()
    report = write_report(spec, sweep, runs, base_cfg.grading.extract, out_dir, experiment)
    log((out_dir / f"{experiment}.md").read_text())
    log(f"{experiment}: wrote " + ", ".join(str(out_dir / f"{experiment}.{x}") for x in ("json", "md", "png")) +
        f" "
        f"({time.perf_counter() - t_start:.0f}s)")
    return report


def _one_run(spec: SparseSpec, run_dir: Path, method: str, seed: int, lr: float, sweep: bool, base_cfg, config: str,
             train, done: list[dict], log: Callable[[str], None], value=None, note: str | None = None) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
    overrides = [f"run_dir={run_dir}", *run_overrides(spec, method, seed, lr, sweep=sweep,
                                                       temperature=base_cfg.rollout.temperature, value=value)]
    # The step-0 point of an evaluation set is measured once and shared: every run starts from the
    # same weights and evaluates greedily on the same problems.
    if any(r["evals"] and r["evals"][0]["step"] == 0 for r in done):
        overrides.append("eval.at_start=false")
    phase = "sweep" if sweep else "test"
    tuned = {} if value is None else {"tuned": spec.added_method(method).tune, "value": value}
    setting = f"lr {lr:g}" + (f", {tuned['tuned']}={value_text(value)}" if tuned else "")
    log(f"{phase} run {method} seed {seed} {setting}")
    t0, load_start = time.perf_counter(), load_average()
    train(config, overrides)
    record = run_record(run_dir, method, seed, base_cfg.grading.extract, time.perf_counter() - t0)
    record |= {"lr": lr, "phase": phase} | tuned
    record |= {"load_average_start": load_start, "load_average_end": load_average(), "note": note}
    last = record["evals"][-1]
    log(f"{phase} run {method} seed {seed} {setting}: accuracy {last['accuracy']:.3f} at step "
        f"{last['step']}, {record['steps'][-1]['tokens_generated_total']} tokens, {record['run_wall_seconds']:.0f}s")
    return record


def _save(runs_out: Path, name: str, record: dict) -> None:
    tmp = runs_out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.rename(runs_out / f"{name}.json")
