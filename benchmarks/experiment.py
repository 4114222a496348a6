"""``opsd bench learning``: OPSD vs GRPO vs SFT from one warm-started base, on the toy math set.

    opsd bench learning [--seeds 3] [--steps N] [--quick] [--out runs/bench/toy]

What it does, end to end, in one Python process with one local Ray (every run attaches to it):

1. Builds a small Qwen3-architecture model (``opsd.assets.tiny.build_tiny_model``; the tokenizer's BPE
   also sees the experiment's prompt wording, so prompts stay short) under ``artifacts/learning``.
2. Splits the toy train set: the first ``warm_rows`` rows warm-start the base model, the rest is
   what every method trains on. The toy test set is held out; nothing trains on it.
3. Warm start: ``algo=sft`` on the warm rows, each row twice, once in the student's prompt format
   and once in the teacher's (problem + reference solution in context). The toy model has never
   read a solution in context otherwise, and a teacher that cannot use the solution has nothing
   to distil (the paper's models are instruction-tuned and can).
4. Measures the base: greedy test accuracy with the student prompt and with the teacher prompt,
   and the mean log-probability of the reference solution under either context.
5. From that base, for each seed: OPSD with a fixed teacher, OPSD with a live teacher, GRPO and
   SFT, the same number of optimizer steps and the same number of rows per step, all through
   ``opsd.launch.driver.train``.
6. Writes ``learning.json`` (curves per method and seed), ``learning.png`` (test accuracy against
   generated tokens and against wall time, mean and spread over seeds; teacher-student KL and
   response length over training) and ``learning.md`` (the table) into ``--out``.

Heavy imports (ray, torch, transformers, matplotlib) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from opsd.config import REPO_ROOT

METHODS = ("opsd_fixed", "opsd_live", "grpo", "sft")
LABELS = {
    "opsd_fixed": "OPSD (fixed teacher)", "opsd_live": "OPSD (live teacher)", "grpo": "GRPO", "sft": "SFT",
}
COLORS = {"opsd_fixed": "tab:blue", "opsd_live": "tab:cyan", "grpo": "tab:red", "sft": "tab:green"}

# Shorter than the paper's wording (fewer prompt tokens on 2 cores); the same for every method.
STUDENT_INSTRUCTION = "Put the final answer in \\boxed{}."
# The teacher's user turn ends with a newline before the instruction, so that a teacher prompt
# is exactly a student prompt whose "problem" is the problem + solution block (how the warm
# start writes its teacher-format rows).
TEACHER_HEAD = "{problem}\n\nReference solution:\n{solution}\n\nRead the reference solution, then solve the problem yourself."
TEACHER_TEMPLATE = TEACHER_HEAD + "\n{instruction}"


@dataclass
class LearningSpec:
    """Everything that decides the experiment's numbers (hashed to reuse a warm start)."""

    seeds: int = 3
    steps: int = 30
    rows_per_step: int = 16  # OPSD / SFT: prompts per step; GRPO: prompts x grpo_n
    grpo_n: int = 4
    lr: float = 1e-4  # 5e-4 made every RL variant lose accuracy in a pilot (docs/RESULTS.md)
    warm_rows: int = 4000  # warm-start problems (each seen in both prompt formats)
    warm_steps: int = 500
    warm_lr: float = 3e-3
    warm_batch: int = 32
    eval_every: int = 5
    eval_problems: int = 200
    gap_problems: int = 200
    max_tokens: int = 96
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 3
    intermediate_size: int = 512
    micro_batch_size: int = 8
    beta: float = 0.5
    temperature: float = 1.0
    levels: list[int] = field(default_factory=lambda: [1, 2])
    data_seed: int = 1  # not the shipped set's seed 0: the warm start needs more problems than it has
    train_rows: int = 2000
    test_rows: int = 400
    warm_eval_every: int = 0  # evaluate during the warm start too (for tuning it)
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    @classmethod
    def quick(cls) -> "LearningSpec":
        """A smoke version: a few steps of everything, one seed, a tiny model."""
        return cls(seeds=1, steps=2, rows_per_step=4, grpo_n=2, warm_rows=64, warm_steps=2, warm_batch=8,
                   eval_every=2, eval_problems=8, gap_problems=8, max_tokens=64, hidden_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, intermediate_size=384, micro_batch_size=4)

    def base_key(self) -> str:
        # warm_steps is not in the key: a longer warm start resumes a shorter one's checkpoint.
        keys = ("levels", "data_seed", "train_rows", "test_rows", "warm_rows", "warm_lr", "warm_batch", "max_tokens", "hidden_size", "num_layers",
                "num_heads", "num_kv_heads", "intermediate_size", "micro_batch_size")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"template": TEACHER_TEMPLATE,
                                                                   "instruction": STUDENT_INSTRUCTION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


# --- data and model ------------------------------------------------------------------------------


def student_content(problem: str) -> str:
    return f"{problem}\n{STUDENT_INSTRUCTION}"


def teacher_head(problem: str, solution: str) -> str:
    return TEACHER_HEAD.format(problem=problem, solution=solution)


def write_splits(work: Path, spec: LearningSpec) -> dict[str, Path]:
    """Fresh toy problems of ``spec.levels`` (``opsd.assets.toydata.make_problem``, seed
    ``spec.data_seed``; no expression is in two splits): warm.jsonl (the warm-start problems, each
    in both prompt formats, shuffled), train.jsonl (what the methods train on) and test.jsonl
    (held out)."""
    import random

    from opsd.assets.toydata import make_problem, write_jsonl

    sizes = {"warm": spec.warm_rows, "train": spec.train_rows, "test": spec.test_rows}
    splits: dict[str, list[dict]] = {k: [] for k in sizes}
    for li, level in enumerate(spec.levels):
        # Each level: one stream of distinct problems; the splits take consecutive slices of it.
        rng = random.Random(spec.data_seed * 1000 + level)
        per = {k: n // len(spec.levels) + (li < n % len(spec.levels)) for k, n in sizes.items()}
        seen: set[str] = set()
        drawn = []
        while len(drawn) < sum(per.values()):
            p = make_problem(level, rng)
            if p.key not in seen:
                seen.add(p.key)
                drawn.append(p)
        start = 0
        for k in sizes:
            splits[k] += [{"id": f"learn-{k}-{level}-{i:05d}", "level": p.level, "problem": p.problem,
                           "solution": p.solution, "answer": p.answer}
                          for i, p in enumerate(drawn[start:start + per[k]])]
            start += per[k]
    for k in ("train", "test"):
        random.Random(spec.data_seed + len(k)).shuffle(splits[k])
    both = []
    for r in splits["warm"]:
        both.append(dict(r))
        both.append({**r, "id": r["id"] + "-teacher", "problem": teacher_head(r["problem"], r["solution"])})
    random.Random(0).shuffle(both)
    paths = {"warm": work / "warm.jsonl", "train": work / "train.jsonl", "test": work / "test.jsonl"}
    write_jsonl(both, paths["warm"])
    write_jsonl(splits["train"], paths["train"])
    write_jsonl(splits["test"], paths["test"])
    return paths


def build_model(out: Path, spec: LearningSpec) -> Path:
    """The randomly initialised model; its BPE also sees the prompt wording in chat form."""
    if (out / "config.json").exists():
        return out
    from opsd.assets.toydata import read_jsonl
    from opsd.assets.tiny import build_tiny_model

    corpus = []
    for r in read_jsonl(REPO_ROOT / "data" / "toy" / "train.jsonl"):
        corpus += [student_content(r["problem"]), r["solution"],
                   teacher_head(r["problem"], r["solution"]) + "\n" + STUDENT_INSTRUCTION, r["solution"]]
    return build_tiny_model(out, hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
                            num_kv_heads=spec.num_kv_heads, head_dim=32, intermediate_size=spec.intermediate_size,
                            corpus=corpus)


def write_config(path: Path, body: dict) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(body)))
    return path


def common_config(spec: LearningSpec, model: str, train_path: Path, test_path: Path) -> dict:
    return {
        "model": {"path": model, "dtype": "float32", "max_model_len": 512},
        "data": {"train_path": str(train_path), "test_path": str(test_path)},
        "prompt": {"student_instruction": STUDENT_INSTRUCTION, "teacher_template": TEACHER_TEMPLATE,
                   "max_prompt_len": 384},
        "rollout": {"num_workers": 1, "num_cpus_per_worker": 1, "temperature": spec.temperature,
                    "max_tokens": spec.max_tokens, "n": 1, "kv_cache_mb": 256},
        "learner": {"num_ranks": 2, "zero_stage": 2, "num_cpus_per_rank": 0.5, "lr": spec.lr,
                    "micro_batch_size": spec.micro_batch_size},
        "train": {"steps": spec.steps, "prompts_per_step": spec.rows_per_step, "checkpoint_every": 0},
        "eval": {"every": spec.eval_every, "max_problems": spec.eval_problems, "max_tokens": spec.max_tokens},
        "logging": {"progress": False, "tensorboard": False},
        "cluster": {"num_cpus": 2},
    }


def method_config(spec: LearningSpec, method: str, base: str, paths: dict[str, Path], seed: int) -> dict:
    cfg = common_config(spec, base, paths["train"], paths["test"])
    cfg["train"]["seed"] = seed
    cfg["rollout"]["seed"] = seed
    if method.startswith("opsd"):
        cfg["algo"] = "opsd"
        cfg["teacher"] = {"mode": "fixed" if method == "opsd_fixed" else "live"}
        cfg["scorer"] = {"num_workers": 1, "num_cpus_per_worker": 0.5, "topk": 64}
        cfg["learner"]["num_cpus_per_rank"] = 0.25
        cfg["objectives"] = {"opsd": {"objective": "divergence", "beta": spec.beta, "support": "topk"}}
    elif method == "grpo":
        cfg["algo"] = "grpo"
        cfg["rollout"]["n"] = spec.grpo_n
        cfg["train"]["prompts_per_step"] = max(1, spec.rows_per_step // spec.grpo_n)
        cfg["objectives"] = {"grpo": {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0}}
    elif method == "sft":
        cfg["algo"] = "sft"
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return cfg


# --- the base model's teacher-vs-student gap -------------------------------------------------------


def base_report(base: str, spec: LearningSpec, paths: dict[str, Path], cfg_path: Path) -> dict:
    """Greedy accuracy of the base under the student and the teacher prompt (vLLM, the eval code
    path of training), and the reference solution's mean token log-probability under either
    context (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.launch.cluster import ActorPool
    from opsd.launch.evaluate import evaluate_pairs
    from opsd.config import load_config
    from opsd.data import load_problems
    from opsd.prompts import PromptBuilder, PromptPair
    from opsd.workers.rollout import RolloutWorker

    cfg = load_config(cfg_path, [f"model.path={base}"])
    tok = AutoTokenizer.from_pretrained(base)
    builder = PromptBuilder(tok, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=spec.max_tokens)
    n = max(spec.eval_problems, spec.gap_problems)
    problems = load_problems(paths["test"])[:n]
    pairs, _ = builder.build(problems)
    as_teacher = [PromptPair(p.uid, p.teacher_ids, p.teacher_ids, p.answer) for p in pairs]
    pool = ActorPool("rollout", RolloutWorker, 1, {"num_cpus": 1, "num_gpus": 0}, (cfg, base), max_restarts=0)
    try:
        pool.wait_ready()
        ev = pairs[: spec.eval_problems]
        student_m, _ = evaluate_pairs(pool, ev, n=1, max_tokens=spec.max_tokens, temperature=0.0)
        teacher_m, _ = evaluate_pairs(pool, as_teacher[: spec.eval_problems], n=1, max_tokens=spec.max_tokens,
                                      temperature=0.0)
    finally:
        pool.kill()

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    lp = {"student": [], "teacher": []}
    with torch.no_grad():
        for p, pair in zip(problems[: spec.gap_problems], pairs[: spec.gap_problems]):
            ref = list(tok(p.solution, add_special_tokens=False)["input_ids"]) + [eos]
            for role, ctx in (("student", pair.student_ids), ("teacher", pair.teacher_ids)):
                ids = torch.tensor([list(ctx) + ref])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1:-1].float(), dim=-1)
                lp[role].append(logp.gather(-1, torch.tensor(ref)[:, None]).mean().item())
    return {
        "problems": len(pairs[: spec.eval_problems]),
        "student_accuracy": student_m["avg@1"], "teacher_accuracy": teacher_m["avg@1"],
        "student_format_rate": student_m["format_rate"], "teacher_format_rate": teacher_m["format_rate"],
        "student_response_len": student_m["response_len_mean"], "teacher_response_len": teacher_m["response_len_mean"],
        "reference_logprob_student": statistics.fmean(lp["student"]),
        "reference_logprob_teacher": statistics.fmean(lp["teacher"]),
        "gap_problems": len(lp["student"]),
    }


# --- curves ----------------------------------------------------------------------------------------


def read_curve(run_dir: Path, base_acc: float) -> dict:
    """Per-step series of one run, with a step-0 point (the base) on the accuracy curve."""
    from opsd.launch.loggers import read_metrics

    rows = [r for r in read_metrics(run_dir) if r["step"] > 0]  # step 0: the base, given here as base_acc
    wall = 0.0
    steps = []
    for r in rows:
        wall += r["step_seconds"]
        steps.append({
            "step": r["step"], "tokens_generated_total": r["tokens_generated_total"], "wall_seconds": wall,
            "kl_sampled": r.get("kl_sampled"), "response_len_mean": r.get("response_len_mean"),
            "reward_mean": r.get("reward_mean"), "loss": r.get("loss"),
            "eval_accuracy": r.get("eval/avg@1"), "eval_format_rate": r.get("eval/format_rate"),
            "eval_response_len": r.get("eval/response_len_mean"),
        })
    evals = [{"step": 0, "tokens": 0, "wall_seconds": 0.0, "accuracy": base_acc}]
    evals += [{"step": s["step"], "tokens": s["tokens_generated_total"], "wall_seconds": s["wall_seconds"],
               "accuracy": s["eval_accuracy"]} for s in steps if s["eval_accuracy"] is not None]
    return {"run_dir": str(run_dir), "steps": steps, "evals": evals}


def mean_curve(curves: list[dict]) -> list[dict]:
    """Mean and std over seeds at each eval step (every seed evaluates at the same steps)."""
    by_step: dict[int, list[dict]] = {}
    for c in curves:
        for e in c["evals"]:
            by_step.setdefault(e["step"], []).append(e)
    out = []
    for step in sorted(by_step):
        es = by_step[step]
        if len(es) != len(curves):
            continue
        accs = [e["accuracy"] for e in es]
        out.append({
            "step": step, "tokens": statistics.fmean(e["tokens"] for e in es),
            "wall_seconds": statistics.fmean(e["wall_seconds"] for e in es),
            "accuracy": statistics.fmean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        })
    return out


def first_reach(curve: list[dict], target: float, x: str) -> float | None:
    """The x (tokens or wall seconds) at which the mean accuracy first reaches ``target``,
    linearly interpolated between eval points; None if it never does."""
    prev = None
    for pt in curve:
        if pt["accuracy"] >= target - 1e-12:
            if prev is None:
                return pt[x]
            frac = (target - prev["accuracy"]) / max(pt["accuracy"] - prev["accuracy"], 1e-12)
            return prev[x] + frac * (pt[x] - prev[x])
        prev = pt
    return None


def summarize(results: dict) -> dict:
    methods = results["methods"]
    summary: dict[str, Any] = {}
    means = {m: mean_curve(methods[m]) for m in methods}
    grpo_final = means["grpo"][-1]["accuracy"] if "grpo" in means and means["grpo"] else None
    for m, curves in methods.items():
        finals = [c["evals"][-1]["accuracy"] for c in curves]
        kls = [s["kl_sampled"] for c in curves for s in c["steps"] if s["kl_sampled"] is not None]
        tokens = [c["steps"][-1]["tokens_generated_total"] for c in curves]
        walls = [c["steps"][-1]["wall_seconds"] for c in curves]
        row = {
            "final_accuracy_mean": statistics.fmean(finals),
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_accuracies": finals,
            "best_accuracy_mean": max(p["accuracy"] for p in means[m]),
            "tokens_generated_total_mean": statistics.fmean(tokens),
            "train_wall_seconds_mean": statistics.fmean(walls),
            "run_wall_seconds_mean": statistics.fmean(c["run_wall_seconds"] for c in curves),
            "kl_sampled_first": first_last(curves, "kl_sampled")[0],
            "kl_sampled_last": first_last(curves, "kl_sampled")[1],
            "response_len_first": first_last(curves, "response_len_mean")[0],
            "response_len_last": first_last(curves, "response_len_mean")[1],
            "kl_sampled_mean": statistics.fmean(kls) if kls else None,
        }
        if grpo_final is not None:
            row["tokens_to_grpo_final"] = first_reach(means[m], grpo_final, "tokens")
            row["wall_to_grpo_final"] = first_reach(means[m], grpo_final, "wall_seconds")
        summary[m] = row
    g = summary.get("grpo", {}).get("tokens_to_grpo_final")
    for m in summary:
        t = summary[m].get("tokens_to_grpo_final")
        summary[m]["token_ratio_vs_grpo"] = (t / g) if (t is not None and g) else None
    return {"grpo_final_accuracy_mean": grpo_final, "methods": summary}


def first_last(curves: list[dict], key: str, k: int = 5) -> tuple[float | None, float | None]:
    """Mean over seeds of the first k and the last k steps' values of ``key``."""
    firsts, lasts = [], []
    for c in curves:
        xs = [s[key] for s in c["steps"] if s.get(key) is not None]  # absent: a run from before the series
        if xs:
            firsts.append(statistics.fmean(xs[:k]))
            lasts.append(statistics.fmean(xs[-k:]))
    return (statistics.fmean(firsts) if firsts else None, statistics.fmean(lasts) if lasts else None)


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


def table(results: dict) -> str:
    s = results["summary"]
    base = results["base"]
    lines = [
        f"Base (warm start) test accuracy: {base['student_accuracy']:.3f} with the student prompt, "
        f"{base['teacher_accuracy']:.3f} with the teacher prompt (reference solution in context), "
        f"{base['problems']} problems, greedy.",
        f"GRPO final mean accuracy (the target): {fmt(s['grpo_final_accuracy_mean'])}",
    ]
    target = s["grpo_final_accuracy_mean"]
    if target is not None and target <= base["student_accuracy"]:
        lines.append(f"GRPO ended at or below the base accuracy ({base['student_accuracy']:.3f}), so every method "
                     "'reaches' it at step 0 (0 tokens) and the token ratio is undefined.")
    lines += [
        "",
        "| method | final acc (mean ± std) | per seed | best mean acc | tokens generated | tokens to GRPO final "
        "| ratio vs GRPO | train wall s | wall s to GRPO final | KL first→last | resp len first→last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in s["methods"].items():
        lines.append(
            f"| {LABELS.get(m, m)} | {r['final_accuracy_mean']:.3f} ± {r['final_accuracy_std']:.3f} "
            f"| {', '.join(f'{a:.3f}' for a in r['final_accuracies'])} | {r['best_accuracy_mean']:.3f} "
            f"| {r['tokens_generated_total_mean']:,.0f} | {fmt(r.get('tokens_to_grpo_final'), ',.0f')} "
            f"| {fmt(r.get('token_ratio_vs_grpo'), '.2f')} | {r['train_wall_seconds_mean']:.0f} "
            f"| {fmt(r.get('wall_to_grpo_final'), '.0f')} "
            f"| {fmt(r['kl_sampled_first'])} → {fmt(r['kl_sampled_last'])} "
            f"| {fmt(r['response_len_first'], '.1f')} → {fmt(r['response_len_last'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    try:
        for ax, x, xlabel in ((axes[0, 0], "tokens", "generated tokens (cumulative)"),
                              (axes[0, 1], "wall_seconds", "training wall time (s, sum of step times)")):
            for m, curves in methods.items():
                mc = mean_curve(curves)
                xs = [p[x] for p in mc]
                ys = [p["accuracy"] for p in mc]
                sd = [p["accuracy_std"] for p in mc]
                ax.plot(xs, ys, "-o", color=COLORS.get(m), label=LABELS.get(m, m), markersize=3)
                ax.fill_between(xs, [a - b for a, b in zip(ys, sd)], [a + b for a, b in zip(ys, sd)],
                                color=COLORS.get(m), alpha=0.15)
            g = results["summary"].get("grpo_final_accuracy_mean")
            if g is not None:
                ax.axhline(g, color="tab:red", ls=":", lw=1, label="GRPO final mean")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (greedy, avg@1)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        axes[0, 0].set_title("accuracy vs generated tokens (SFT generates none: x = 0)")
        axes[0, 1].set_title("accuracy vs wall time")
        for ax, key, title, ylabel in ((axes[1, 0], "kl_sampled", "sampled-token KL (student vs teacher/reference)",
                                        "nats per token"),
                                       (axes[1, 1], "response_len_mean", "training response length", "tokens")):
            for m, curves in methods.items():
                series = step_mean(curves, key)
                if series:
                    ax.plot([s for s, _ in series], [v for _, v in series], color=COLORS.get(m), label=LABELS.get(m, m))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"opsd bench learning: {results.get('seeds_done', results['spec']['seeds'])} seed(s), {results['spec']['steps']} steps, "
                     f"{results['spec']['rows_per_step']} rows/step; mean ± std over seeds")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def step_mean(curves: list[dict], key: str) -> list[tuple[int, float]]:
    by: dict[int, list[float]] = {}
    for c in curves:
        for s in c["steps"]:
            if s[key] is not None:
                by.setdefault(s["step"], []).append(s[key])
    return [(k, statistics.fmean(v)) for k, v in sorted(by.items())]


# --- the whole experiment ----------------------------------------------------------------------------


def prepare_base(spec: LearningSpec, work: Path, paths: dict[str, Path], init: Path,
                 log: Callable[[str], None] = print) -> tuple[str, dict, float]:
    """The warm start (reused when a previous run with the same settings finished it) and its
    teacher-vs-student report. Ray must be initialised. Returns (base path, report, seconds)."""
    import shutil

    from opsd.launch.driver import train

    warm_cfg = common_config(spec, str(init), paths["warm"], paths["test"])
    warm_cfg.update(algo="sft")
    # A fixed warm-up and checkpoints every 50 steps: a longer warm start resumes a shorter one
    # (same data order, optimizer state and schedule as one uninterrupted run).
    warm_cfg["learner"].update(lr=spec.warm_lr, warmup_steps=min(25, max(1, spec.warm_steps // 10)))
    warm_cfg["train"].update(steps=spec.warm_steps, prompts_per_step=spec.warm_batch,
                             checkpoint_every=min(50, spec.warm_steps))
    warm_cfg["eval"]["every"] = spec.warm_eval_every
    warm_path = write_config(work / "configs" / "warm.yaml", warm_cfg)
    warm_run = work / "runs" / "warm"
    base = warm_run / "checkpoints" / f"step_{spec.warm_steps}" / "hf"
    t0 = time.perf_counter()
    if not (base / "config.json").exists():
        from opsd.launch.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(warm_run) if warm_run.is_dir() else None
        if ckpt is not None and int(ckpt.name.split("_")[-1]) < spec.warm_steps:
            log(f"learning: resuming the warm start from {ckpt}")
            train(None, [f"train.resume={warm_run}", f"train.steps={spec.warm_steps}",
                         f"train.checkpoint_every={min(50, spec.warm_steps)}"])
        else:
            shutil.rmtree(warm_run, ignore_errors=True)
            train(str(warm_path), [f"run_dir={warm_run}"])
        log(f"learning: warm start done in {time.perf_counter() - t0:.0f}s")
    else:
        log(f"learning: reusing the warm start {base}")
    warm_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    gap = base_report(str(base), spec, paths, warm_path)
    log(f"learning: base accuracy {gap['student_accuracy']:.3f} (student prompt), "
        f"{gap['teacher_accuracy']:.3f} (teacher prompt); reference logprob/token "
        f"{gap['reference_logprob_student']:.3f} vs {gap['reference_logprob_teacher']:.3f} "
        f"({time.perf_counter() - t0:.0f}s)")
    return str(base), gap, warm_seconds


def write_results(spec: LearningSpec, key: str, work: Path, warm_seconds: float, gap: dict,
                  methods: dict[str, list[dict]], t_start: float, out_dir: Path) -> dict:
    from opsd.benchmarks.machine import machine

    done = {m: c for m, c in methods.items() if c}
    results = {
        "spec": asdict(spec), "base_key": key, "work_dir": str(work), "machine": machine(),
        "warm_start_seconds": warm_seconds, "base": gap, "methods": done,
        "seeds_done": min(len(c) for c in done.values()),
        "total_wall_seconds": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results["summary"] = summarize(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "learning.png")
    (out_dir / "learning.md").write_text(table(results))
    return results


def run_learning(spec: LearningSpec, out_dir: str | Path, work_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    from opsd.launch.cluster import init_ray, shutdown_ray
    from opsd.launch.driver import train
    from opsd.config import load_config

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    key = spec.base_key()
    work = Path(work_dir) if work_dir else REPO_ROOT / "artifacts" / "learning" / key
    work.mkdir(parents=True, exist_ok=True)
    paths = write_splits(work, spec)
    init = build_model(work / "init", spec)
    log(f"learning: work dir {work}; model {init}")

    started = init_ray(load_config(None, ["cluster.num_cpus=2"]))
    try:
        base_path, gap, warm_seconds = prepare_base(spec, work, paths, init, log)

        # 2. the methods, seed-major so that a cut-short experiment still has every method
        methods: dict[str, list[dict]] = {m: [] for m in spec.methods}
        for seed in range(spec.seeds):
            for m in spec.methods:
                cfg = method_config(spec, m, base_path, paths, seed)
                cfg_path = write_config(work / "configs" / f"{m}-s{seed}.yaml", cfg)
                run_dir = work / "runs" / f"{m}-s{seed}"
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
                t0 = time.perf_counter()
                train(str(cfg_path), [f"run_dir={run_dir}"])
                curve = read_curve(run_dir, gap["student_accuracy"])
                curve["seed"] = seed
                curve["run_wall_seconds"] = time.perf_counter() - t0
                methods[m].append(curve)
                last = curve["evals"][-1]
                log(f"learning: {m} seed {seed}: accuracy {last['accuracy']:.3f} at step {last['step']}, "
                    f"{curve['steps'][-1]['tokens_generated_total']} tokens, {curve['run_wall_seconds']:.0f}s wall")
                # Written after every run: an interrupted experiment keeps what it measured.
                results = write_results(spec, key, work, warm_seconds, gap, methods, t_start, out_dir)
    finally:
        if started:
            shutdown_ray()
    log(table(results))
    log(f"learning: wrote {out_dir / 'learning.json'}, {out_dir / 'learning.png'}, {out_dir / 'learning.md'} "
        f"({results['total_wall_seconds']:.0f}s in all)")
    return results
