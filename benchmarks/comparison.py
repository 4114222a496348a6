"""``opsd bench learning``: the paper's comparison on SmolLM2-135M-Instruct and data/wordproblems.

    opsd bench learning [--seeds 3] [--budget-minutes 45] [--out runs/bench/smollm2]
    opsd bench learning --quick --out /tmp/q     # smoke version, tiny model (tests, marked slow)
    opsd bench learning --task toy               # the earlier tiny-model experiment (benchmarks/experiment.py)

Every method starts from the same model (the default recipe, configs/local.yaml: SmolLM2-135M-
Instruct, here pinned to float32, the word-problem set, its prompts, sampling at T = 0.7, 64 new
tokens) and runs
the same number of optimizer steps on the same number of rows per step, through
``opsd.launch.driver.train``:

    opsd_fixed       OPSD, the teacher frozen at the initial weights (the default recipe)
    opsd_ema         OPSD, the teacher an EMA of the student (teacher.ema_decay)
    opsd_fixed_tail  OPSD, fixed teacher, objectives.opsd.support=topk_tail instead of topk
    grpo             GRPO, 8 samples per prompt, the learner's own old log-probs at T = 0.7
    sft              cross-entropy on the reference solutions
    kd_reference     off-policy distillation: the teacher's targets along the reference solution
    kd_samples       off-policy distillation: along samples drawn from the teacher prompt

and the teacher contexts and loss shapings of OPSD's successors (issue 23), each otherwise the
recipe of opsd_fixed:

    opsd_answer      the teacher reads the final answer only (teacher.context=answer)
    opsd_none        the teacher reads nothing more than the student (teacher.context=none)
    opsd_other       the teacher reads another problem's worked solution (other_problem, OP²SD)
    opsd_majority    solution-free: the majority of the student's own 8 samples of the prompt, on
                     the training set with its solutions and answers removed (majority, U-OPSD);
                     2 prompts x 8 samples per step, as GRPO
    contrastive      RLCSD: GRPO's advantage moved by the teacher's contrast between the correct
                     hint and 4 wrong samples of the prompt; 2 prompts x 8 samples, as GRPO
    opsd_shaped      the reference solution with PW-OPSD's position weights and the OPSD authors'
                     per-token divergence clip (pointwise, 0.05)

and a stronger teacher than the student, or SFT before the student's own objective (issue 37):

    sft_teacher      the SFT teacher: ``sft``'s recipe, seed 0 only, its final weights kept as a
                     model directory (``<work>/teachers/sft-s0/``, named in the report with the
                     SHA-256 of its weights); it runs before every row that reads it
    opd_sft          on-policy distillation from that model as an external teacher
                     (teacher.model=<its directory>), reading nothing more than the student
                     (teacher.context=none): plain OPD, otherwise opsd_fixed's recipe
    opd_sft_solution the same teacher reading the reference solution (teacher.context=solution)
    sft_opsd         one staged run: SFT for the first quarter of the steps (5 of 20), then OPSD
                     (opsd_fixed's recipe) for the rest. The OPSD stage's teacher is the SFT
                     stage's final weights (``stage:sft``), not the initial ones: OPSD's teacher is
                     the student itself with the solution in view, and after the SFT stage the
                     student is the SFT model: the two then differ only by what the teacher reads.
                     The initial weights write in the base model's way (1.5% of its answers boxed,
                     against 100% after 20 SFT steps), so a divergence to them would
                     first undo the form SFT taught (docs/RESULTS.md, section 2, issue 37).
    sft_grpo         one staged run: SFT for 5 steps, then GRPO for 15 (grpo's recipe in its stage:
                     8 samples per prompt, 2 prompts per step, the learner's old log-probs at the
                     sampling temperature, no KL term)

A staged run's config carries its ``stages:`` as one command-line override (the list as JSON,
which is YAML), so the run is one ``opsd train`` command like every other row's.

Every run record notes what else ran on the machine: the load average (1, 5 and 15 minutes) when
the run started and when it ended, and ``--note`` when given, so that wall times can be read
against the load they ran under.

Resumable in chunks: each finished (method, seed) run writes ``<out>/runs/<method>-s<seed>.json``;
a rerun skips those, redraws the report (``comparison.json``, ``comparison.png``,
``comparison.md``) and goes on with the rest. ``--budget-minutes`` stops before a run that
would not fit (the estimate is the slowest finished run of that method, else of the method whose
recipe it shares (ESTIMATE_FROM), else of any).

The base's held-out accuracy (step 0) is measured once, by the first run, and shared: every run
starts from the same weights and evaluates greedily on the same problems.

Heavy imports (ray, torch, transformers, matplotlib) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from opsd.benchmarks.experiment import first_last, fmt, step_mean, first_reach, mean_curve
from opsd.config import REPO_ROOT

METHODS = ("opsd_fixed", "opsd_ema", "opsd_fixed_tail", "grpo", "sft", "kd_reference", "kd_samples")
CONTEXT_METHODS = ("opsd_answer", "opsd_none", "opsd_other", "opsd_majority", "contrastive", "opsd_shaped")
TEACHER_METHODS = ("sft_teacher", "opd_sft", "opd_sft_solution", "sft_opsd", "sft_grpo")
ALL_METHODS = METHODS + CONTEXT_METHODS + TEACHER_METHODS
# Run before any other method: the rows that read the SFT teacher need its weights.
RUN_FIRST = ("sft_teacher",)
# One seed: the teacher is trained once (sft's seed 0), then fixed for every seed of its students.
SEEDS = {"sft_teacher": 1}
# The rows whose teacher is the SFT teacher's final weights (teacher.model).
READS_TEACHER = ("opd_sft", "opd_sft_solution")
# The recipe a method's runs take as long as, for --budget-minutes until one of its own has run.
ESTIMATE_FROM = {"sft_teacher": "sft", "opd_sft": "opsd_fixed", "opd_sft_solution": "opsd_fixed",
                 "sft_opsd": "opsd_fixed", "sft_grpo": "grpo"}
# Run after every other method has all its seeds (issue 23 ranks none, other_problem, majority and
# contrastive first when the budget cannot hold them all).
RUN_LAST = ("opsd_answer", "opsd_shaped")
LABELS = {
    "opsd_fixed": "OPSD (fixed teacher)", "opsd_ema": "OPSD (EMA teacher)",
    "opsd_fixed_tail": "OPSD (fixed, topk_tail)", "grpo": "GRPO", "sft": "SFT",
    "kd_reference": "KD (reference)", "kd_samples": "KD (teacher samples)",
    "opsd_answer": "OPSD, answer only", "opsd_none": "OPSD, no privileged context",
    "opsd_other": "OPSD, another problem's solution", "opsd_majority": "OPSD, majority (no solutions)",
    "contrastive": "RLCSD (contrastive)", "opsd_shaped": "OPSD + position weight + clip",
    "opsd_mask_truncated": "OPSD + truncated samples masked", "srpo": "SRPO (correct: GRPO, wrong: OPSD)",
    "mix_opsd_grpo": "0.5 OPSD + 0.5 GRPO", "opsd_anchor": "OPSD + KL anchor to the initial policy",
    "opsd_forward_kl": "OPSD, forward KL (beta 0)",
    "sft_teacher": "SFT teacher (seed 0, kept)", "opd_sft": "OPD from the SFT teacher",
    "opd_sft_solution": "OPD from the SFT teacher + solution", "sft_opsd": "SFT 5 → OPSD 15 (staged)",
    "sft_grpo": "SFT 5 → GRPO 15 (staged)",
}
COLORS = {
    "opsd_fixed": "tab:blue", "opsd_ema": "tab:cyan", "opsd_fixed_tail": "tab:purple", "grpo": "tab:red",
    "sft": "tab:green", "kd_reference": "tab:orange", "kd_samples": "tab:brown",
    "opsd_answer": "tab:olive", "opsd_none": "tab:gray", "opsd_other": "tab:pink", "opsd_majority": "gold",
    "contrastive": "darkred", "opsd_shaped": "navy", "opsd_mask_truncated": "teal", "srpo": "magenta",
    "mix_opsd_grpo": "saddlebrown", "opsd_anchor": "darkcyan", "opsd_forward_kl": "darkorange",
    "sft_teacher": "lime", "opd_sft": "slategray", "opd_sft_solution": "darkgreen", "sft_opsd": "mediumblue",
    "sft_grpo": "crimson",
}
# The methods that train on the student's own samples with a teacher's per-token targets: their
# sampled-token gap estimates KL(student || teacher), and their saved batches are read for it. The
# hybrids (srpo, mix_opsd_grpo) are among them: OPSD's teacher scores every one of their samples.
OPSD = ("opsd_fixed", "opsd_ema", "opsd_fixed_tail", "opsd_answer", "opsd_none", "opsd_other", "opsd_majority",
        "opsd_shaped", "opsd_mask_truncated", "opsd_anchor", "opsd_forward_kl", "opd_sft", "opd_sft_solution",
        "sft_opsd", "srpo", "mix_opsd_grpo")
# A staged method's stage that trains on the student's samples with teacher targets: only its
# steps count in the per-position gap (the SFT stage before it has no teacher).
DISTIL_STAGE = {"sft_opsd": "opsd"}


@dataclass
class ComparisonSpec:
    """What decides the numbers; a changed spec does not reuse the finished runs of another."""

    config: str = "configs/local.yaml"
    seeds: int = 3
    steps: int = 20
    rows_per_step: int = 16  # GRPO: rows_per_step / grpo_n prompts, grpo_n samples each
    grpo_n: int = 8
    eval_every: int = 10
    eval_problems: int = 200
    # Pinned rather than model.dtype=auto, so that runs finished on different machines (with and
    # without fast bf16 matmuls) belong to one experiment.
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    overrides: list[str] = field(default_factory=list)  # applied to every run (the quick model)

    @classmethod
    def quick(cls) -> "ComparisonSpec":
        """Every method for two steps, one seed, the tiny random model: the wiring, not a result."""
        return cls(seeds=1, steps=2, rows_per_step=4, grpo_n=2, eval_every=2, eval_problems=8,
                   overrides=["model.path=tiny", "model.dtype=float32", "model.max_model_len=512",
                              # the tiny tokenizer spends more tokens than SmolLM2's: another
                              # problem's solution in the teacher prompt (opsd_other) needs room
                              "prompt.max_prompt_len=448",
                              "rollout.kv_cache_mb=256", "learner.micro_batch_size=4"])

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("seeds", "methods")}

    def seeds_of(self, method: str) -> int:
        return min(self.seeds, SEEDS.get(method, self.seeds))

    def runs_planned(self) -> int:
        return sum(self.seeds_of(m) for m in self.methods)


def grpo_recipe(spec: ComparisonSpec, temperature: float) -> dict:
    """GRPO's settings, as the ``grpo`` row and the GRPO stage of ``sft_grpo`` both take them: the
    sampler's own policy gradient, old log-probs from the learner at its temperature, no KL term,
    as many rows per step as every other method."""
    return {"rollout.n": spec.grpo_n, "train.prompts_per_step": max(1, spec.rows_per_step // spec.grpo_n),
            "loss.temperature": temperature, "objectives.grpo.old_logprobs": "learner", "objectives.grpo.kl_coef": 0}


def staged(spec: ComparisonSpec, second: dict) -> str:
    """The ``stages=`` override of a staged row: SFT for the first quarter of the steps, then
    ``second`` (a stage entry without its steps) for the rest. The list is written as JSON, which
    the command line's YAML reads as it is."""
    if spec.steps < 2:
        raise ValueError(f"a staged run needs at least 2 steps (one per stage); the spec has {spec.steps}")
    warm = max(1, spec.steps // 4)
    return "stages=" + json.dumps([{"name": "sft", "algo": "sft", "steps": warm},
                                   {**second, "steps": spec.steps - warm}])


def method_overrides(spec: ComparisonSpec, method: str, seed: int, temperature: float,
                     bare_train: str | None = None, teacher_model: str | None = None) -> list[str]:
    """The command-line overrides of one run on top of spec.config; ``bare_train``: the training
    set without solutions and answers (opsd_majority); ``teacher_model``: the SFT teacher's
    weights (a model directory), which READS_TEACHER's rows need."""
    if method in READS_TEACHER and not teacher_model:
        raise ValueError(f"method {method!r} distils from the SFT teacher: give its weights (teacher_model), "
                         "which the sft_teacher run leaves")
    common = [
        f"train.steps={spec.steps}", f"train.prompts_per_step={spec.rows_per_step}", f"train.seed={seed}",
        f"rollout.seed={seed}", "train.checkpoint_every=0", f"eval.every={spec.eval_every}",
        f"eval.max_problems={spec.eval_problems}", "logging.progress=false", "logging.tensorboard=false",
        f"model.dtype={spec.dtype}",
        # One thread per actor, as the runs finished before the num_threads keys existed had.
        "rollout.num_threads=1", "scorer.num_threads=1", "learner.num_threads=1", *spec.overrides,
    ]
    per = {
        "opsd_fixed": ["algo=opsd", "teacher.mode=fixed", "logging.save_batches=true"],
        "opsd_ema": ["algo=opsd", "teacher.mode=ema", "logging.save_batches=true"],
        "opsd_fixed_tail": ["algo=opsd", "teacher.mode=fixed", "objectives.opsd.support=topk_tail", "logging.save_batches=true"],
        "grpo": ["algo=grpo", *(f"{k}={v}" for k, v in grpo_recipe(spec, temperature).items())],
        "sft": ["algo=sft"],
        "kd_reference": ["algo=kd", "objectives.kd.source=reference", "teacher.mode=fixed"],
        "kd_samples": ["algo=kd", "objectives.kd.source=teacher_samples", "teacher.mode=fixed"],
        "opsd_answer": ["algo=opsd", "teacher.mode=fixed", "teacher.context=answer", "logging.save_batches=true"],
        "opsd_none": ["algo=opsd", "teacher.mode=fixed", "teacher.context=none", "logging.save_batches=true"],
        "opsd_other": ["algo=opsd", "teacher.mode=fixed", "teacher.context=other_problem", "logging.save_batches=true"],
        "opsd_majority": ["algo=opsd", "teacher.mode=fixed", "teacher.context=majority", f"rollout.n={spec.grpo_n}",
                          f"train.prompts_per_step={max(1, spec.rows_per_step // spec.grpo_n)}",
                          f"data.train_path={bare_train}", "logging.save_batches=true"],
        # GRPO's settings (the learner's own old log-probs at the sampling temperature), with
        # RLCSD's contrast between the correct hint and up to 4 wrong samples of the prompt.
        "contrastive": ["algo=contrastive", "teacher.mode=fixed", "teacher.context=contrastive",
                        "teacher.wrong_contexts=4", f"rollout.n={spec.grpo_n}",
                        f"train.prompts_per_step={max(1, spec.rows_per_step // spec.grpo_n)}",
                        f"loss.temperature={temperature}", "objectives.contrastive.old_logprobs=learner",
                        "objectives.contrastive.kl_coef=0"],
        "opsd_shaped": ["algo=opsd", "teacher.mode=fixed", "loss.position_weight=true",
                        "objectives.opsd.divergence_clip=0.05", "objectives.opsd.divergence_clip_mode=pointwise",
                        "logging.save_batches=true"],
        # sft's recipe, with a checkpoint (and its Hugging Face export) at the last step: the
        # weights the harness keeps as the teacher.
        "sft_teacher": ["algo=sft", f"train.checkpoint_every={spec.steps}", "train.export_hf=true"],
        "opd_sft": ["algo=opsd", "teacher.mode=fixed", f"teacher.model={teacher_model}", "teacher.context=none",
                    "logging.save_batches=true"],
        "opd_sft_solution": ["algo=opsd", "teacher.mode=fixed", f"teacher.model={teacher_model}",
                             "teacher.context=solution", "logging.save_batches=true"],
        "sft_opsd": [staged(spec, {"name": "opsd", "algo": "opsd", "teacher": "stage:sft",
                                   "overrides": {"teacher.mode": "fixed"}}), "logging.save_batches=true"],
        "sft_grpo": [staged(spec, {"name": "grpo", "algo": "grpo", "overrides": grpo_recipe(spec, temperature)})],
    }
    if method not in per:
        raise ValueError(f"unknown method {method!r}; expected one of {ALL_METHODS}")
    return common + per[method]


# --- one run -----------------------------------------------------------------------------------------


def machine_name() -> str:
    """CPU model, core count, the CPU's bf16 matmul instructions and the GPU: wall times are only
    comparable on one kind of machine, and one CPU model name covers parts with and without
    AVX512-BF16 (bf16 about 60x slower without; docs/BENCHMARKS.md). Records from before 2026-12-07
    name the CPU and cores only."""
    from opsd.benchmarks.machine import machine

    m = machine()
    bf16 = "+".join(m.get("bf16_instructions") or []) or "no bf16 instructions"
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu', 'unknown CPU')}, {m['cpus']} cores, {bf16}{gpu}"


def run_record(run_dir: Path, method: str, seed: int, extract: str, wall: float) -> dict:
    """What the report needs of one finished run: per-step series, evaluations, diagnostics."""
    from opsd.launch.loggers import read_metrics

    rows = read_metrics(run_dir)
    stage = DISTIL_STAGE.get(method)
    distilled = {r["step"] for r in rows if r.get("stage") == stage} if stage else None

    def point(r: dict, tokens: int, wall: float) -> dict:
        return {"step": r["step"], "tokens": tokens, "wall_seconds": wall, "accuracy": r[f"eval/accuracy_{extract}"],
                "format_rate": r["eval/format_rate"], "response_len": r["eval/response_len_mean"],
                "problems": r.get("eval/problems"), "truncated_frac": r.get("eval/truncated_frac"),
                "repeated_ngram_rate": r.get("eval/repeated_ngram_rate")}

    steps, evals, clock = [], [], 0.0
    for r in rows:
        if r["step"] == 0:
            evals.append(point(r, 0, 0.0))
            continue
        clock += r["step_seconds"]
        steps.append({k: r.get(k) for k in (
            "step", "tokens_generated_total", "kl_sampled", "response_len_mean", "reward_mean", "loss",
            "truncated_frac", "clip_frac", "engine_mismatch", "clip_frac_rollout", "rollout_seconds",
            "score_seconds", "train_seconds", "sync_seconds", "step_seconds",
            # what a context or an objective left out or moved (majority, contrastive)
            "samples", "context_skipped", "moved_frac", "movable_frac", "grad_norm",
            # guards and hybrids (issue 36): a step with no loss token skips its update; the KL to the
            # initial policy (objectives.opsd.anchor); the share of tokens a routing mix sent to the
            # parent for correct samples (objectives.mix.mode=route)
            "update_skipped", "no_loss_tokens", "anchor_kl", "correct_frac",
            # collapse diagnostics (opsd/diagnostics.py)
            "repeated_ngram_rate", "stop_gap_truncated", "stop_gap_finished", "stop_prob_teacher_truncated",
            "stop_prob_student_truncated", "stop_prob_teacher_finished", "stop_prob_student_finished", "stage")}
            | {"wall_seconds": clock})
        if f"eval/accuracy_{extract}" in r:
            evals.append(point(r, r["tokens_generated_total"], clock))
    record = {"method": method, "seed": seed, "run_dir": str(run_dir), "run_wall_seconds": wall,
              "machine": machine_name(), "steps": steps, "evals": evals}
    if method in OPSD:
        record["positions"] = position_diagnostics(run_dir, steps=distilled)
    return record


def load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes (what else ran beside a run)."""
    return [round(x, 2) for x in os.getloadavg()]


def position_diagnostics(run_dir: Path, *, max_positions: int = 64, top: int = 12,
                         steps: set[int] | None = None) -> dict:
    """From the saved batches of an OPSD run: the per-token gap log p_S(y) - log p_T(y) of the
    sampled token (its mean is the sampled-token KL estimate) by response position, for the first
    and the last quarter of the steps, and the tokens where the teacher disagrees most.
    ``steps``: only these steps' batches (a staged run's distillation stage)."""
    import numpy as np
    from transformers import AutoTokenizer

    from opsd.batch import read_ipc

    paths = sorted((run_dir / "batches").glob("step_*.arrow"))
    if steps is not None:
        paths = [p for p in paths if int(p.stem.removeprefix("step_")) in steps]
    if not paths:
        return {}
    cfg_text = (run_dir / "config.yaml").read_text()
    from omegaconf import OmegaConf

    from opsd.assets.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(OmegaConf.create(cfg_text).model.path))
    quarter = max(1, len(paths) // 4)
    by_pos = {"first": [[] for _ in range(max_positions)], "last": [[] for _ in range(max_positions)]}
    per_token: dict[int, list[float]] = {}
    for i, path in enumerate(paths):
        for row in read_ipc(path).select(["response_ids", "rollout_logprobs", "teacher_token_logprobs"]).to_pylist():
            gap = np.asarray(row["rollout_logprobs"]) - np.asarray(row["teacher_token_logprobs"])
            for pos, (t, g) in enumerate(zip(row["response_ids"], gap)):
                if pos < max_positions:
                    if i < quarter:
                        by_pos["first"][pos].append(float(g))
                    if i >= len(paths) - quarter:
                        by_pos["last"][pos].append(float(g))
                per_token.setdefault(int(t), []).append(float(g))
    worst = sorted(((statistics.fmean(v), t, len(v)) for t, v in per_token.items() if len(v) >= 5), reverse=True)
    return {
        "gap_by_position_first": [statistics.fmean(v) if v else None for v in by_pos["first"]],
        "gap_by_position_last": [statistics.fmean(v) if v else None for v in by_pos["last"]],
        "steps_per_quarter": quarter,
        "most_disagreed_tokens": [{"token": tok.decode([t]), "id": t, "mean_gap": g, "count": n}
                                  for g, t, n in worst[:top]],
    }


# --- the report ---------------------------------------------------------------------------------------


def curves_with_base(records: list[dict], base: dict | None) -> list[dict]:
    """Each run's evaluations with the shared step-0 point in front."""
    out = []
    for r in records:
        evals = list(r["evals"])
        if base is not None and (not evals or evals[0]["step"] != 0):
            evals.insert(0, {"step": 0, "tokens": 0, "wall_seconds": 0.0, **base})
        out.append({**r, "evals": evals})
    return out


def sample_std(xs: list[float]) -> float:
    """The sample standard deviation (n - 1); 0.0 for fewer than two values, which have no spread."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _mean_pm(mean: float, std: float, n: int, spec: str) -> str:
    """'0.328 ± 0.033'; one value alone has no spread to show (its sample std is undefined)."""
    return f"{mean:{spec}} ± {std:{spec}}" if n > 1 else f"{mean:{spec}}"


def summarize(by_method: dict[str, list[dict]]) -> dict:
    """Final accuracy over seeds; generated tokens (and wall time) to reach GRPO's final mean
    accuracy, on the mean curves; and the OPSD/GRPO token ratio seed by seed (seed s of a method
    against seed s of GRPO, each to GRPO seed s's final accuracy)."""
    means = {m: mean_curve(rs) for m, rs in by_method.items()}
    grpo = by_method.get("grpo", [])
    target = means["grpo"][-1]["accuracy"] if grpo and means["grpo"] else None
    grpo_by_seed = {r["seed"]: r for r in grpo}
    base = next((r["evals"][0]["accuracy"] for rs in by_method.values() for r in rs if r["evals"]), None)
    out: dict[str, Any] = {"grpo_final_accuracy_mean": target, "base_accuracy": base, "methods": {}}
    for m, rs in by_method.items():
        finals = [r["evals"][-1]["accuracy"] for r in rs]
        row = {
            "seeds": [r["seed"] for r in rs],
            "final_accuracy_mean": statistics.fmean(finals), "final_accuracy_std": sample_std(finals),
            "final_accuracies": finals,
            "final_format_rate_mean": statistics.fmean(r["evals"][-1]["format_rate"] for r in rs),
            "tokens_generated_total_mean": statistics.fmean(r["steps"][-1]["tokens_generated_total"] for r in rs),
            "train_wall_seconds_mean": statistics.fmean(r["steps"][-1]["wall_seconds"] for r in rs),
            "run_wall_seconds_mean": statistics.fmean(r["run_wall_seconds"] for r in rs),
        }
        for key in ("kl_sampled", "response_len_mean", "reward_mean", "engine_mismatch", "clip_frac_rollout"):
            row[f"{key}_first"], row[f"{key}_last"] = first_last(rs, key)
        if m not in OPSD:
            # The sampled-token gap estimates KL(student || teacher) only along the student's own
            # samples; KD's tokens are the reference's or the teacher's, where it is no KL at all.
            row["kl_sampled_first"] = row["kl_sampled_last"] = None
        if target is not None and row["tokens_generated_total_mean"] == 0:
            # SFT and KD from references generate nothing: no token count to compare.
            row["tokens_to_grpo_final"], row["token_ratio_per_seed"] = None, []
            row["wall_to_grpo_final"] = first_reach(means[m], target, "wall_seconds")
        elif target is not None:
            row["tokens_to_grpo_final"] = first_reach(means[m], target, "tokens")
            row["wall_to_grpo_final"] = first_reach(means[m], target, "wall_seconds")
            ratios = []
            for r in rs:
                g = grpo_by_seed.get(r["seed"])
                if g is None:
                    continue
                goal = g["evals"][-1]["accuracy"]
                mine, theirs = first_reach(r["evals"], goal, "tokens"), first_reach(g["evals"], goal, "tokens")
                if mine is not None and theirs:
                    ratios.append(mine / theirs)
            row["token_ratio_per_seed"] = ratios
        out["methods"][m] = row
    g = out["methods"].get("grpo", {}).get("tokens_to_grpo_final")
    for row in out["methods"].values():
        t = row.get("tokens_to_grpo_final")
        row["token_ratio_vs_grpo"] = t / g if (t is not None and g) else None
    return out


def table(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"Base held-out accuracy (step 0, {report['spec']['eval_problems']} problems, greedy, "
        f"{report['extract']}): {fmt(s['base_accuracy'])}. GRPO's final mean accuracy (the target of the "
        f"token columns): {fmt(s['grpo_final_accuracy_mean'])}.",
    ]
    target, base = s["grpo_final_accuracy_mean"], s["base_accuracy"]
    if target is not None and base is not None and target <= base:
        lines.append("GRPO ended at or below the base, so every method reaches its final accuracy at step 0: the "
                     "token ratio is undefined.")
    lines += [
        "",
        "| method | seeds | final acc (mean ± std) | per seed | format | tokens generated | tokens to GRPO final "
        "| ratio vs GRPO (mean curve) | ratio per seed | train wall s | KL first→last | resp len first→last "
        "| reward first→last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = ["", "KL: the mean sampled-token estimate of KL(student || teacher), shown for the rows that "
             "distil along the student's own samples (OPSD and OPD; a staged row: its OPSD stage), since it is a KL "
             "only along those samples; GRPO, SFT and KD have none. first→last: the means of "
             "each run's first 5 and last 5 steps, then over seeds. ± std: the sample standard deviation over "
             "seeds (n - 1)."]
    for m, r in s["methods"].items():
        ratios = r.get("token_ratio_per_seed") or []
        per_seed = (f"{_mean_pm(statistics.fmean(ratios), sample_std(ratios), len(ratios), '.2f')} ({len(ratios)})"
                    if ratios else "—")
        lines.append(
            f"| {LABELS.get(m, m)} | {len(r['seeds'])} | {_mean_pm(r['final_accuracy_mean'], r['final_accuracy_std'], len(r['seeds']), '.3f')} "
            f"| {', '.join(f'{a:.3f}' for a in r['final_accuracies'])} | {r['final_format_rate_mean']:.2f} "
            f"| {r['tokens_generated_total_mean']:,.0f} | {fmt(r.get('tokens_to_grpo_final'), ',.0f')} "
            f"| {fmt(r.get('token_ratio_vs_grpo'), '.2f')} | {per_seed} | {r['train_wall_seconds_mean']:.0f} "
            f"| {fmt(r['kl_sampled_first'])} → {fmt(r['kl_sampled_last'])} "
            f"| {fmt(r['response_len_mean_first'], '.1f')} → {fmt(r['response_len_mean_last'], '.1f')} "
            f"| {fmt(r['reward_mean_first'], '.2f')} → {fmt(r['reward_mean_last'], '.2f')} |"
        )
    teacher = report.get("teacher_model")
    if teacher:
        notes += ["", f"The SFT teacher's weights (the `SFT teacher` row; `teacher.model` of the OPD rows): "
                      f"`{teacher['path']}`, SHA-256 of its weights `{teacher['sha256']}`."]
    if report.get("runs_with_load"):
        notes += ["", "Runs that recorded the machine's load (load average over 1, 5, 15 minutes at the run's start "
                      "and end; the note given with `--note`):", "",
                  "| run | final acc | tokens generated | run wall s | load at start | load at end | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["runs_with_load"]:
            notes.append(f"| {r['run']} | {r['accuracy']:.3f} | {r['tokens']:,} | {r['wall']:.0f} "
                         f"| {' / '.join(f'{x:.2f}' for x in r['load_start'])} "
                         f"| {' / '.join(f'{x:.2f}' for x in r['load_end'])} | {r['note'] or '—'} |")
    return "\n".join(lines + notes) + "\n"


def runs_with_load(records: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """One line per run that recorded the load beside it (issue 37 on): what the table's wall times ran
    under; in the report's method order, then by seed (not in the order the records were read, which
    depends on which runs a session did)."""
    kept = sorted((r for r in records if r.get("load_average_start") is not None),
                  key=lambda r: (methods.index(r["method"]) if r["method"] in methods else len(methods), r["seed"]))
    return [{"run": f"{r['method']}-s{r['seed']}", "accuracy": r["evals"][-1]["accuracy"],
             "tokens": r["steps"][-1]["tokens_generated_total"], "wall": r["run_wall_seconds"],
             "load_start": r["load_average_start"], "load_end": r["load_average_end"], "note": r.get("note")}
            for r in kept]


def plot(report: dict, by_method: dict[str, list[dict]], out: Path) -> Path:
    """Accuracy against tokens and wall time, reward, KL, length, the per-position gap; then a row of
    collapse diagnostics (opsd/diagnostics.py): the truncated share, the evaluation's response
    length, and the repetition and stop-probability gap of the runs that measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 13.5), dpi=100)
    try:
        for ax, x, xlabel in ((axes[0, 0], "tokens", "generated tokens (cumulative; SFT and KD (reference): none)"),
                              (axes[0, 1], "wall_seconds", "training wall time (s, sum of step times)")):
            for m, rs in by_method.items():
                mc = mean_curve(rs)
                xs, ys, sd = [p[x] for p in mc], [p["accuracy"] for p in mc], [p["accuracy_std"] for p in mc]
                ax.plot(xs, ys, "-o", color=COLORS.get(m), label=LABELS.get(m, m), markersize=3)
                ax.fill_between(xs, [a - b for a, b in zip(ys, sd)], [a + b for a, b in zip(ys, sd)],
                                color=COLORS.get(m), alpha=0.12)
            g = report["summary"]["grpo_final_accuracy_mean"]
            if g is not None:
                ax.axhline(g, color="tab:red", ls=":", lw=1, label="GRPO final mean")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"held-out accuracy ({report['extract']}, greedy)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
        axes[0, 0].set_title("accuracy vs generated tokens")
        axes[0, 1].set_title("accuracy vs wall time")
        for ax, key, title in ((axes[1, 0], "kl_sampled", "sampled-token KL to the teacher (nats/token)"),
                               (axes[1, 1], "response_len_mean", "training response length (tokens)"),
                               (axes[0, 2], "reward_mean", "training reward (on-track rate of the samples)")):
            for m, rs in by_method.items():
                series = step_mean_with_gaps(rs, key) if (key != "kl_sampled" or m in OPSD) else None
                if series:
                    ax.plot([s for s, _ in series], [v for _, v in series], color=COLORS.get(m), label=LABELS.get(m, m))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
        ax = axes[1, 2]
        for m in OPSD:
            recs = [r["positions"] for r in by_method.get(m, []) if r.get("positions")]
            for part, style in (("first", ":"), ("last", "-")):
                series = _position_mean(recs, f"gap_by_position_{part}")
                if series:
                    ax.plot([p for p, _ in series], [v for _, v in series], style, color=COLORS[m],
                            label=f"{LABELS[m]}, {part} quarter of steps")
        ax.set_title("log p_S - log p_T of the sampled token, by response position")
        ax.set_xlabel("response position")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
        _collapse_panels(axes[2], by_method, report.get("spec", {}).get("max_tokens"))
        spec = report["spec"]
        fig.suptitle(report.get("title") or f"opsd bench learning: SmolLM2-135M-Instruct, word problems; "
                     f"{spec['steps']} steps x {spec['rows_per_step']} rows; mean ± std over seeds")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def step_mean_with_gaps(curves: list[dict], key: str) -> list[tuple[int, float]]:
    """The mean over seeds of ``key`` at every step, NaN (a gap in a drawn line, not a point at 0)
    where no seed measured it. A step where every sample was left out of the loss (a majority
    teacher without a majority) measured no KL: records written before the metrics row said so
    hold 0 there, which is read as missing too."""
    by: dict[int, list[float]] = {}
    for c in curves:
        for s in c["steps"]:
            v = s.get(key)
            if key == "kl_sampled" and s.get("samples") and (s.get("context_skipped") or 0) >= s["samples"]:
                v = None
            by.setdefault(s["step"], [])
            if v is not None:
                by[s["step"]].append(v)
    return [(k, statistics.fmean(v) if v else math.nan) for k, v in sorted(by.items())]


def eval_mean(curves: list[dict], key: str) -> list[tuple[int, float]]:
    """The mean over seeds of an evaluation's ``key`` at each evaluated step (seeds that did not
    record it are left out of that step's mean)."""
    by: dict[int, list[float]] = {}
    for c in curves:
        for e in c["evals"]:
            if e.get(key) is not None:
                by.setdefault(e["step"], []).append(e[key])
    return [(k, statistics.fmean(v)) for k, v in sorted(by.items())]


def _collapse_panels(axes, by_method: dict[str, list[dict]], max_tokens: int | None) -> None:
    """The collapse diagnostics' row: truncated share (evaluation solid, training samples dotted),
    the evaluation's mean response length, and the repeated 4-gram rate (solid) and the teacher -
    student stop probability at truncated answers' last positions (dashed), where measured."""
    cap = f" at {max_tokens} tokens" if max_tokens else ""
    panels = ((axes[0], f"truncated share{cap} (evaluation solid, training dotted)",
               [("truncated_frac", "eval", "-o"), ("truncated_frac", "steps", ":")]),
              (axes[1], "evaluation response length (tokens)", [("response_len", "eval", "-o")]),
              (axes[2], "repeated 4-gram rate (solid), stop gap teacher - student at cut answers (dashed)",
               [("repeated_ngram_rate", "steps", "-"), ("stop_gap_truncated", "steps", "--")]))
    for ax, title, series in panels:
        drawn = False
        for m, rs in by_method.items():
            labelled = False
            # SFT and KD along the reference sample nothing: their "training responses" are references.
            samples = any(s.get("tokens_generated_total") for r in rs for s in r["steps"])
            for key, where, style in series:
                if where == "steps" and not samples:
                    continue
                pts = eval_mean(rs, key) if where == "eval" else step_mean_with_gaps(rs, key)
                if any(math.isfinite(v) for _, v in pts):
                    ax.plot([p for p, _ in pts], [v for _, v in pts], style, color=COLORS.get(m), markersize=3,
                            label=None if labelled else LABELS.get(m, m))
                    labelled = drawn = True
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "not measured in these runs (added in issue 36)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")


def _position_mean(recs: list[dict], key: str) -> list[tuple[int, float]]:
    cols: dict[int, list[float]] = {}
    for rec in recs:
        for pos, v in enumerate(rec.get(key, [])):
            if v is not None:
                cols.setdefault(pos, []).append(v)
    return [(p, statistics.fmean(v)) for p, v in sorted(cols.items())]


def write_report(spec: ComparisonSpec, records: list[dict], extract: str, out_dir: Path, elapsed: float) -> dict:
    from opsd.benchmarks.machine import machine

    base = next((r["evals"][0] for r in records if r["evals"] and r["evals"][0]["step"] == 0), None)
    base_point = {k: base[k] for k in ("accuracy", "format_rate", "response_len")} if base else None
    # Every method with records, in ALL_METHODS' order: a chunk run with --methods redraws the whole
    # report (it is the project's record in docs/results), not its own methods' rows alone.
    recorded = {r["method"] for r in records}
    shown = [m for m in ALL_METHODS if m in spec.methods or m in recorded]
    shown += [m for m in spec.methods if m not in shown]
    by_method = {m: curves_with_base([r for r in records if r["method"] == m], base_point)
                 for m in shown if m in recorded}
    report = {"spec": asdict(spec), "extract": extract, "machine": machine(),
              "runs_done": len(records), "runs_planned": replace(spec, methods=shown).runs_planned(),
              "teacher_model": teacher_of(records),
              "run_wall_seconds_total": sum(r["run_wall_seconds"] for r in records),
              "this_session_seconds": elapsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report["summary"] = summarize(by_method)
    report["runs_with_load"] = runs_with_load(records, tuple(shown))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "comparison.md").write_text(table(report))
    plot(report, by_method, out_dir / "comparison.png")
    return report


# --- the whole experiment -------------------------------------------------------------------------------


def bare_training_set(cfg: Any, work: Path) -> Path:
    """The training set with its solutions and answers removed: what a solution-free teacher
    (opsd_majority) trains on. Rows keep their ids, so that sample ids match the other runs'."""
    from opsd.launch.problems import read_problems

    out = work / "data" / "train_bare.jsonl"
    if not out.is_file():
        problems = read_problems(cfg, cfg.data.train_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"id": p.uid, "problem": p.problem}) + "\n" for p in problems))
        tmp.rename(out)
    return out



def run_order(methods: list[str], seeds: int, finished: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """The (method, seed) runs still to do. Seed-major, so that a cut-short experiment has every
    method at the seeds it reached; RUN_FIRST's methods (the teacher others read) before all others,
    RUN_LAST's after all the others' seeds; a method runs at most SEEDS[method] seeds."""
    groups = ([m for m in methods if m in RUN_FIRST], [m for m in methods if m not in RUN_FIRST + RUN_LAST],
              [m for m in methods if m in RUN_LAST])
    return [(m, s) for group in groups for s in range(seeds) for m in group
            if s < SEEDS.get(m, seeds) and (m, s) not in finished]


# --- the SFT teacher's weights ----------------------------------------------------------------------

TEACHER_DIR = Path("teachers") / "sft-s0"  # under the work directory


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over a model directory's weight files (``*.safetensors``, by name, each name then its bytes)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weight files")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (records stay valid in another checkout)."""
    try:
        return str(path.absolute().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def keep_teacher(run_dir: Path, steps: int, dest: Path) -> dict:
    """Move the sft_teacher run's final weights (the Hugging Face export of its checkpoint at its
    last step) to ``dest`` and drop the rest of that checkpoint (the learner's optimizer state);
    returns what the record keeps: the directory and the SHA-256 of its weights."""
    hf = run_dir / "checkpoints" / f"step_{steps}" / "hf"
    if not (hf / "config.json").is_file():
        raise RuntimeError(f"the sft_teacher run left no Hugging Face weights at {hf}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(hf), str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"path": _shown(dest), "sha256": weights_sha256(dest)}


def teacher_of(records: list[dict]) -> dict | None:
    """The kept SFT teacher ({"path", "sha256"}) of the finished runs, if its run has finished."""
    return next((r["teacher_model"] for r in records if r["method"] == "sft_teacher" and r.get("teacher_model")), None)


def teacher_path(teacher: dict | None, runs_out: Path) -> str:
    """The SFT teacher's directory, checked against its record's hash before a run reads it."""
    record = runs_out / "sft_teacher-s0.json"
    if teacher is None:
        raise SystemExit(f"learning: {', '.join(READS_TEACHER)} distil from the SFT teacher, and {record} does not "
                         "exist: run sft_teacher first (it is in the default methods; with --methods, name it too)")
    path = Path(teacher["path"])
    path = path if path.is_absolute() else REPO_ROOT / path
    again = f"remove {record} to train the teacher again"
    if not path.is_dir():
        raise SystemExit(f"learning: the SFT teacher's weights are not at {path} (named by {record}); {again}")
    found = weights_sha256(path)
    if found != teacher["sha256"]:
        raise SystemExit(f"learning: the SFT teacher's weights at {path} have SHA-256 {found[:16]}..., its record "
                         f"{record} says {teacher['sha256'][:16]}...; {again}")
    return str(path)


def estimate(method: str, done: list[dict]) -> tuple[float | None, str | None]:
    """(seconds, the run it rests on): the slowest finished run of ``method``, else of the method
    whose recipe it shares (ESTIMATE_FROM), else of any; (None, None) before any run has finished."""
    for pool in ([r for r in done if r["method"] == method],
                 [r for r in done if r["method"] == ESTIMATE_FROM.get(method)], done):
        if pool:
            slowest = max(pool, key=lambda r: r["run_wall_seconds"])
            return slowest["run_wall_seconds"], f"{slowest['method']}-s{slowest['seed']}"
    return None, None


def dry_run(spec: ComparisonSpec, out_dir: str | Path, log: Callable[[str], None] = print) -> list[dict]:
    """The runs a rerun of ``run_comparison`` on ``out_dir`` would make, in order, each with the
    estimate ``--budget-minutes`` uses; runs nothing, writes nothing. A spec that ``out_dir`` would
    refuse is refused here too."""
    out_dir = Path(out_dir)
    spec_file = out_dir / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != spec.key():
        raise SystemExit(f"{out_dir} holds runs of other settings ({spec_file}); pass another --out or remove it")
    done = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    todo = run_order(spec.methods, spec.seeds, {(r["method"], r["seed"]) for r in done})
    rows = [{"run": f"{m}-s{s}", "method": m, "seed": s, **dict(zip(("estimated_seconds", "like"), estimate(m, done)))}
            for m, s in todo]
    lines = [f"learning: {spec.runs_planned() - len(todo)} of {spec.runs_planned()} runs already done in {out_dir / 'runs'}; "
             f"{len(todo)} to go, in this order:", "",
             "| # | run | method | estimated s | as the slowest of |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i} | {r['run']} | {LABELS.get(r['method'], r['method'])} | {fmt(r['estimated_seconds'], ',.0f')} "
              f"| {r['like'] or '—'} |" for i, r in enumerate(rows, 1)]
    known = [r["estimated_seconds"] for r in rows if r["estimated_seconds"] is not None]
    if known:
        lines += ["", f"Estimated run time: {sum(known):,.0f} s ({sum(known) / 3600:.1f} h)"
                  + ("" if len(known) == len(rows) else f" for the {len(known)} runs with an estimate")]
    log("\n".join(lines))
    return rows


def run_comparison(spec: ComparisonSpec, out_dir: str | Path, work_dir: str | Path | None = None,
                   budget_minutes: float | None = None, log: Callable[[str], None] = print,
                   note: str | None = None) -> dict:
    """Every (method, seed) run not finished in ``out_dir``, in run_order; ``note``: what else runs on
    the machine, kept in each record beside the load averages."""
    from opsd.launch.cluster import init_ray, shutdown_ray
    from opsd.launch.driver import train
    from opsd.config import load_config

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    runs_out = out_dir / "runs"
    runs_out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else REPO_ROOT / "artifacts" / "comparison"
    config = str(REPO_ROOT / spec.config) if not Path(spec.config).is_absolute() else spec.config
    base_cfg = load_config(config, list(spec.overrides))
    extract = base_cfg.grading.extract

    spec_file = out_dir / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != spec.key():
        raise SystemExit(f"{out_dir} holds runs of other settings ({spec_file}); pass another --out or remove it")
    spec_file.write_text(json.dumps(spec.key(), indent=1) + "\n")

    def load_done() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(runs_out.glob("*.json"))]

    done = load_done()
    finished = {(r["method"], r["seed"]) for r in done}
    todo = run_order(spec.methods, spec.seeds, finished)
    planned_done = spec.runs_planned() - len(todo)  # of this command's methods (--methods: a subset)
    log(f"learning: {planned_done} of {spec.runs_planned()} runs already done in {runs_out}; "
        f"{len(todo)} to go")
    if any(m in READS_TEACHER for m, _ in todo) and not any(m == "sft_teacher" for m, _ in todo):
        teacher_path(teacher_of(done), runs_out)  # refused now, not after the runs before it
    report = write_report(spec, done, extract, out_dir, 0.0) if done else None
    if not todo:
        log(table(report))
        return report
    started = init_ray(load_config(config, [*spec.overrides, "cluster.num_cpus=2"]))
    try:
        for method, seed in todo:
            has_base = any(r["evals"] and r["evals"][0]["step"] == 0 for r in done)
            if budget_minutes is not None:
                need = estimate(method, done)[0] or 0.0
                if time.perf_counter() - t_start + need > budget_minutes * 60:
                    log(f"learning: stopping before {method} seed {seed}: it would not fit in --budget-minutes="
                        f"{budget_minutes:g} (about {need:.0f}s); run the same command again to go on")
                    break
            run_dir = work / "runs" / f"{method}-s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
            teacher = teacher_path(teacher_of(done), runs_out) if method in READS_TEACHER else None
            overrides = [f"run_dir={run_dir}", *method_overrides(spec, method, seed, base_cfg.rollout.temperature,
                                                                 str(bare_training_set(base_cfg, work)), teacher)]
            if has_base:
                overrides.append("eval.at_start=false")  # the shared step-0 point is measured already
            planned_done += 1
            log(f"learning: {method} seed {seed} ({planned_done} of {spec.runs_planned()})")
            load_start = load_average()
            t0 = time.perf_counter()
            train(config, overrides)
            record = run_record(run_dir, method, seed, extract, time.perf_counter() - t0)
            record.update(load_average_start=load_start, load_average_end=load_average(), note=note)
            if method == "sft_teacher":
                record["teacher_model"] = keep_teacher(run_dir, spec.steps, work / TEACHER_DIR)
                log(f"learning: the SFT teacher's weights: {record['teacher_model']['path']} "
                    f"(SHA-256 {record['teacher_model']['sha256']})")
            elif (run_dir / "checkpoints").is_dir():
                # A staged run checkpoints at each stage's end (1.6 GB of optimizer state each in
                # fp32), which nothing reads once the record is written; its stages' weights stay.
                shutil.rmtree(run_dir / "checkpoints")
            tmp = runs_out / f".{method}-s{seed}.json.tmp"
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.rename(runs_out / f"{method}-s{seed}.json")
            done.append(record)
            last = record["evals"][-1]
            log(f"learning: {method} seed {seed}: accuracy {last['accuracy']:.3f} at step {last['step']}, "
                f"{record['steps'][-1]['tokens_generated_total']} tokens, {record['run_wall_seconds']:.0f}s")
            report = write_report(spec, done, extract, out_dir, time.perf_counter() - t_start)
    finally:
        if started:
            shutdown_ray()
    log(table(report))
    left = len(run_order(spec.methods, spec.seeds, {(r["method"], r["seed"]) for r in done}))
    log(f"learning: {len(done)} runs done, {left} left; wrote {out_dir / 'comparison.json'}, "
        f"{out_dir / 'comparison.png'}, {out_dir / 'comparison.md'} ({time.perf_counter() - t_start:.0f}s)")
    return report
