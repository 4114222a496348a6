"""``opsd bench``: measurements that the docs quote (docs/BENCHMARKS.md).

    opsd bench sync  [--params-m 100] [--bucket-mb 16 64 256]   weight-push bandwidth (object_store, gloo)
    opsd bench train [CONFIG] [key=value ...]                    wall time and per-step split of a run
    opsd bench loss  [--vocab 151936 --tokens 2048 --chunk 1024] chunked vs unchunked loss memory/time
    opsd bench learning [--seeds 3] [--steps N] [--quick]         OPSD vs GRPO vs SFT learning curves
                                                                  (benchmarks/experiment.py, docs/RESULTS.md)

Only the standard library is imported at module level: ``bench loss`` must run on a GPU machine
that has torch but no ray, vllm or deepspeed (scripts/gpu_check.sh), and ``opsd --help`` stays
fast. Each ``bench_*`` function prints its figures and returns them as a dict; no test asserts
a time. ``python -m opsd.benchmarks.bench loss ...`` works without omegaconf (``opsd.launch.cli`` needs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from opsd.benchmarks.figures import MB, mean, median
from opsd.benchmarks.machine import machine


# --- helpers ---------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds.

    For CPU tensors, which tracemalloc does not see. Large torch buffers are mmapped and handed
    back to the OS on free, so consecutive measurements in one process do not leak into each
    other; the sampling can miss a peak shorter than ``interval``.
    """

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        return self.peak - self.base


# --- bench loss ------------------------------------------------------------------------------


def _loss_inputs(vocab: int, tokens: int, hidden: int, k: int, device: str, dtype, seed: int = 0):
    """Random student hidden states and head, and teacher top-k targets with distinct ids per row."""
    import torch

    from opsd.losses import TokenTargets

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) / hidden**0.25).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.25).to(device, dtype)
    stride = max(1, vocab // k)
    start = torch.randint(0, vocab, (tokens, 1), generator=g)
    topk_ids = ((start + torch.arange(k) * stride) % vocab).to(device)
    # Teacher logprobs over the full vocabulary: the top-k hold 90 % of the mass.
    topk_lp = (torch.log_softmax(torch.randn(tokens, k, generator=g) * 2, dim=-1) + torch.log(torch.tensor(0.9)))
    targets = TokenTargets(
        sampled_ids=topk_ids[:, 0].clone(),
        weight=torch.ones(tokens, device=device),
        topk_ids=topk_ids,
        topk_logprobs=topk_lp.to(device),
        teacher_logprobs=topk_lp[:, 0].to(device),
    )
    return h, w, targets


def loss_forward_backward(h, w, targets, chunk: int, *, beta: float = 0.5, support: str = "topk"):
    """One chunked_loss forward + backward; returns (loss, grad of hidden, grad of head weight)."""
    from opsd.losses import LossSpec, chunked_loss
    from opsd.objectives.opsd import OpsdOptions

    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    spec = LossSpec(chunk_size=chunk, options=OpsdOptions(beta=beta, support=support))
    loss, _ = chunked_loss(h, lambda x: x @ w.t(), targets, spec, normalizer=float(h.shape[0]))
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes above the level before the call)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return out, seconds, torch.cuda.max_memory_allocated() - base
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, rss.delta_bytes


def bench_loss(vocab: int = 151936, tokens: int = 2048, chunk: int = 1024, hidden: int = 1024, k: int = 64,
               device: str | None = None, dtype: str = "float32", repeats: int | None = None,
               out: Callable[[str], None] = print) -> dict:
    """Peak memory and time of chunked_loss forward+backward, chunked vs one chunk of all tokens.

    Peak memory is measured above what the inputs already hold; it includes the head's weight
    gradient ([V, H], the same in both variants). CPU: resident-set sampling; CUDA:
    torch.cuda.max_memory_allocated. Times are the minimum over ``repeats`` runs (CUDA: after a
    warm-up run).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if repeats is None:
        repeats = 3 if device == "cuda" else 1
    # Warm-up on a small problem: one-time costs (lazy initialisation, thread pools, kernels)
    # would otherwise land in whichever variant runs first.
    loss_forward_backward(*_loss_inputs(min(vocab, 4096), 64, hidden, k, device, tdtype), 32)
    h, w, targets = _loss_inputs(vocab, tokens, hidden, k, device, tdtype)
    results: dict[str, dict] = {}
    losses = {}
    for name, size in (("chunked", chunk), ("unchunked", max(tokens, chunk))):
        if device == "cuda":  # warm-up: kernels, allocator
            loss_forward_backward(h, w, targets, size)
            torch.cuda.synchronize()
        times, peaks = [], []
        for _ in range(repeats):
            (loss, _, _), seconds, peak = _measure(lambda: loss_forward_backward(h, w, targets, size), device)
            times.append(seconds)
            peaks.append(peak)
        losses[name] = float(loss)
        results[name] = {"chunk_size": size, "seconds": min(times), "peak_mb": max(peaks) / MB}
    logits_mb = tokens * vocab * 4 / MB
    report = {
        "device": device, "dtype": dtype, "vocab": vocab, "tokens": tokens, "hidden": hidden, "k": k,
        "chunk": chunk, "repeats": repeats, "fp32_logits_mb": logits_mb,
        "chunked": results["chunked"], "unchunked": results["unchunked"],
        "memory_ratio": results["unchunked"]["peak_mb"] / max(results["chunked"]["peak_mb"], 1e-9),
        "time_ratio": results["unchunked"]["seconds"] / max(results["chunked"]["seconds"], 1e-12),
        "loss_chunked": losses["chunked"], "loss_unchunked": losses["unchunked"],
        "loss_abs_diff": abs(losses["chunked"] - losses["unchunked"]),
    }
    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out(f"bench loss: V={vocab} T={tokens} H={hidden} k={k} {dtype} on {where} "
        f"(full fp32 logits would be {logits_mb:.0f} MB)")
    for name in ("chunked", "unchunked"):
        r = results[name]
        out(f"  {name:9s} chunk_size={r['chunk_size']:6d}  fwd+bwd {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB")
    out(f"  peak memory unchunked / chunked = {report['memory_ratio']:.2f}x; "
        f"time unchunked / chunked = {report['time_ratio']:.2f}x; |loss diff| = {report['loss_abs_diff']:.2e}")
    return report


# --- bench train -----------------------------------------------------------------------------

PHASES = ("rollout", "score", "train", "sync", "step")


def summarize_metrics(rows: list[dict]) -> dict:
    """Per-phase mean and median seconds over the steps after the first (which pays warm-up), and
    generation throughput. With a single step, that step is used."""
    steady = rows[1:] if len(rows) > 1 else rows
    phases = {}
    for p in PHASES:
        xs = [r[f"{p}_seconds"] for r in steady if f"{p}_seconds" in r]
        phases[p] = {"mean": mean(xs), "median": median(xs)}
    gen = sum(r.get("tokens_generated", 0) for r in steady)
    rollout_s = sum(r.get("rollout_seconds", 0.0) for r in steady)
    step_s = sum(r.get("step_seconds", 0.0) for r in steady)
    return {
        "steps": len(rows), "steady_steps": len(steady), "phases": phases,
        "first_step_seconds": rows[0].get("step_seconds") if rows else None,
        "tokens_per_rollout_second": gen / rollout_s if rollout_s else float("nan"),
        "tokens_per_step_second": gen / step_s if step_s else float("nan"),
        "tokens_generated_per_step": gen / len(steady) if steady else float("nan"),
    }


class _Stopwatch:
    """Times calls of functions and methods that the driver makes, by wrapping them for a while."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        orig = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


OUTSIDE = (("setup", "config, tokenizer, prompts"), ("ray_start", "start or attach to Ray"),
           ("actors_start", "vLLM, scorer and DeepSpeed actors"), ("checkpoints", "checkpoints"),
           ("shutdown", "actors stopped"))


def bench_train(config: str | None, overrides: list[str], out: Callable[[str], None] = print) -> dict:
    """Run `opsd train` (opsd.launch.driver.train) and break its wall time down: per-step phases from
    metrics.jsonl, and the time outside the steps by timing the driver's own calls."""
    import opsd.launch.driver as driver

    watch = _Stopwatch()
    watch.wrap(driver.Trainer, "__init__", "setup")
    watch.wrap(driver, "init_ray", "ray_start")
    watch.wrap(driver.Trainer, "start", "actors_start")
    watch.wrap(driver.Trainer, "save_checkpoint", "checkpoints")
    watch.wrap(driver.Trainer, "evaluate", "evaluation")
    watch.wrap(driver.Trainer, "shutdown", "shutdown")
    t0 = time.perf_counter()
    try:
        run_dir = driver.train(config, overrides)
    finally:
        watch.restore()
    wall = time.perf_counter() - t0
    from opsd.launch.loggers import read_metrics

    rows = [r for r in read_metrics(run_dir) if r["step"] > 0]  # step 0 is the baseline evaluation
    summary = summarize_metrics(rows)
    steps_total = sum(r.get("step_seconds", 0.0) for r in rows)
    outside = {k: watch.seconds.get(k, 0.0) for k, _ in OUTSIDE}
    outside["other"] = wall - steps_total - sum(outside.values())
    report = {"run_dir": str(run_dir), "wall_seconds": wall, "steps_seconds": steps_total,
              "outside_steps": outside, "evaluation_seconds": watch.seconds.get("evaluation", 0.0), **summary}
    out(f"bench train: {run_dir}")
    out(f"  wall {wall:.1f} s for {len(rows)} steps: {steps_total:.1f} s in steps (evaluation "
        f"{report['evaluation_seconds']:.1f} s of it), {wall - steps_total:.1f} s outside them:")
    for key, what in OUTSIDE + (("other", "Ray shutdown, imports, the rest"),):
        out(f"    {key:13s} {outside[key]:7.1f} s  ({what})")
    out(f"  first step {summary['first_step_seconds']:.2f} s; per step over steps 2..{len(rows)} "
        f"(mean / median seconds):")
    ph = summary["phases"]
    for p in PHASES:
        share = ph[p]["mean"] / ph["step"]["mean"] if ph["step"]["mean"] else float("nan")
        out(f"    {p:8s} {ph[p]['mean']:7.3f} / {ph[p]['median']:7.3f}  ({share:5.1%} of a step)")
    rest = ph["step"]["mean"] - sum(ph[p]["mean"] for p in PHASES if p != "step")
    out(f"    (the rest of a step, {rest:.3f} s mean, is evaluation on eval.every steps and the driver's own work)")
    out(f"  tokens generated per step {summary['tokens_generated_per_step']:.0f}; "
        f"{summary['tokens_per_rollout_second']:.0f} tok/s in rollout, "
        f"{summary['tokens_per_step_second']:.0f} tok/s over whole steps")
    return report


# --- command line ----------------------------------------------------------------------------


def bench_task(config: str, overrides: list[str], problems: int) -> dict:
    from opsd.launch.cluster import init_ray, shutdown_ray
    from opsd.benchmarks.task_report import task_report
    from opsd.config import load_config

    cfg = load_config(config, overrides)
    started = init_ray(cfg)
    try:
        return task_report(cfg, problems)
    finally:
        if started:
            shutdown_ray()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommands (shared by ``opsd bench`` and ``python -m opsd.benchmarks.bench``)."""
    from opsd.benchmarks.comparison import ALL_METHODS as COMPARISON_METHODS  # no torch: `opsd --help` stays fast
    from opsd.benchmarks.sync import TRANSPORTS as SYNC_TRANSPORTS

    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sync", help="weight-push bandwidth of each transport between two actors (benchmarks/sync.py)")
    s.add_argument("--params-m", type=float, default=100, help="model size in millions of parameters")
    s.add_argument("--bucket-mb", type=float, nargs="+", default=[16, 64, 256])
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--no-vllm", action="store_true", help="skip the vLLM in-place load of the tiny model")
    s.add_argument("--transports", nargs="+", choices=SYNC_TRANSPORTS, default=list(SYNC_TRANSPORTS),
                   help="in_place: what object_store pushes become on one host with sync.shared_memory (receivers "
                   "copy from the sender's memory)")
    s = sub.add_parser("step", help="opsd's training step against a single-process loop (HF generate, teacher "
                       "forward, AdamW step) on the same model and batch (benchmarks/step.py)")
    s.add_argument("config", nargs="?", help="YAML config (default: configs/local.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument("--steps", type=int, help="measured steps on each side, after one warm-up step (default 3; "
                   "--scaling: 2 per setting)")
    s.add_argument("--staleness", type=int, nargs="+", metavar="S", help="instead: opsd's throughput at "
                   "rollout.max_staleness = each S (e.g. 0 1 2), with the ratio of each to the first")
    s.add_argument("--overlap", choices=("on", "off", "both"), default="on", help="with --staleness: "
                   "scorer.overlap for S > 0 (both: each S > 0 with the next batch scored while the learner trains, "
                   "and scored in its own step)")
    s.add_argument("--scaling", nargs="*", metavar="PROMPTSxTOKENS", help="instead: opsd's step time and tokens/s "
                   "at 8/16/32 prompts per step (64 new tokens) and 64/128/256 new tokens (8 prompts); or at the "
                   "settings given, e.g. --scaling 8x64 32x64")
    s.add_argument("--head-paths", nargs="+", metavar="PATH", choices=("auto", "fused", "module"),
                   help="instead: opsd's step at model.lm_head_path = each PATH, one run each in this invocation "
                   "(module: the learner's head and loss before issue 40; a path may repeat, e.g. module auto "
                   "module auto, to interleave them), with the ratio of each to the first")
    s = sub.add_parser("head", help="the teacher's targets with a bf16 LM head, an fp32 one and in fp32 throughout: "
                       "differences and time (benchmarks/head.py)")
    s.add_argument("config", nargs="?", help="YAML config (default: configs/local.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument("--rows", type=int, default=2, help="first N test problems, their reference solutions as responses")
    s = sub.add_parser("train", help="run `opsd train` and split its time per phase")
    s.add_argument("config", nargs="?", help="YAML config (default: configs/local.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s = sub.add_parser("soak", help="a long run (1,000 tiny steps by default) sampling every actor's memory and file "
                       "descriptors, /dev/shm and the run directory (benchmarks/soak.py)")
    s.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    s.add_argument("--sample-every", type=int, default=25, help="sample every N steps (default 25)")
    s.add_argument("--out", default="runs/bench/soak", help="where soak.json and soak.png go (default: runs/bench/soak, "
                   "untracked; the project's own record is docs/bench/soak: name it to update it)")
    s = sub.add_parser("task", help="student vs teacher prompt on a task before training: greedy accuracy (strict "
                       "and lenient) and the reference's log-prob per token (benchmarks/task_report.py)")
    s.add_argument("config", nargs="?", help="YAML config (default: configs/local.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.add_argument("--problems", type=int, default=400, help="first N problems of the test set (default 400)")
    s = sub.add_parser("loss", help="chunked vs unchunked loss: peak memory and time")
    s.add_argument("--vocab", type=int, default=151936)
    s.add_argument("--tokens", type=int, default=2048)
    s.add_argument("--chunk", type=int, default=1024)
    s.add_argument("--hidden", type=int, default=1024)
    s.add_argument("--topk", type=int, default=64)
    s.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--repeats", type=int, help="default: 3 on CUDA, 1 on CPU")
    s = sub.add_parser("learning", help="OPSD vs GRPO vs SFT vs KD on SmolLM2 and the word problems, resumable "
                       "(benchmarks/comparison.py); --task toy: the tiny warm-started model (benchmarks/experiment.py)")
    s.add_argument("--task", choices=LEARNING_TASKS, default="smollm2",
                   help="smollm2 (default): SmolLM2-135M-Instruct on data/wordproblems; sparse: OPSD, GRPO, SFT and KD "
                   "at tuned learning rates where rewards are sparse (benchmarks/sparse.py); mbpp: OPSD, GRPO and SFT "
                   "the same way on MBPP, graded by its tests in the sandbox; toy: the earlier experiment")
    s.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick: 1)")
    s.add_argument("--steps", type=int, help="optimizer steps per run (default 20, toy 30; --quick: 2)")
    s.add_argument("--quick", action="store_true", help="a smoke version: tiny model, a few steps, one seed")
    s.add_argument("--lr", type=float, help="toy: learning rate of every method after the warm start (default 1e-4)")
    s.add_argument("--methods", nargs="+", help="a subset of the methods (smollm2: " + ", ".join(COMPARISON_METHODS)
                   + "; toy: opsd_fixed, opsd_live, grpo, sft)")
    s.add_argument("--budget-minutes", type=float, help="smollm2, sparse, mbpp: start no run that would end after this "
                   "many minutes (sparse, mbpp: a test run that would not is passed over for a later one of its "
                   "seed that would); rerun the same command to go on (finished runs are skipped)")
    s.add_argument("--out", help="where the report goes (default: runs/bench/<task>, untracked; the project's own "
                   "records are docs/results/{smollm2,sparse,mbpp} and docs/results for toy: name one to update it)")
    s.add_argument("--dry-run", action="store_true", help="smollm2, sparse, mbpp: print the runs a rerun on --out "
                   "would make, in order, with an estimated run time (sparse, mbpp: and their settings); run nothing, "
                   "write nothing")
    s.add_argument("--work-dir", help="run directories (default: artifacts/comparison; sparse, mbpp: "
                   "artifacts/<task>; toy: artifacts/learning/<hash of the settings>, where a finished warm start is "
                   "reused)")
    s.add_argument("--note", metavar="TEXT", help="smollm2, sparse, mbpp: what else runs on the machine, kept in each "
                   "run's record beside the load average at its start and end (wall times are read against them)")
    s = sub.add_parser("sandbox", help="programs graded per second by the sandbox's pool, and its cost against the "
                       "same passing programs run bare (benchmarks/sandbox.py)")
    s.add_argument("--programs", type=int, default=100, help="MBPP reference solutions to run (default 100)")
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes (default 1 2)")
    for s in sub.choices.values():
        s.add_argument("--json", metavar="FILE", help="also write the figures (and the machine) as JSON")


# Where `opsd bench learning` writes by default: an untracked folder (runs/ is git-ignored), so a
# user's run never overwrites the project's records in docs/results/ unless --out names them.
LEARNING_TASKS = ("smollm2", "sparse", "mbpp", "toy")
LEARNING_OUT = {task: f"runs/bench/{task}" for task in LEARNING_TASKS}


def _learning_spec(spec: Any, args: argparse.Namespace, methods: tuple[str, ...]) -> Any:
    """--seeds, --steps and --methods onto either experiment's spec."""
    if args.seeds is not None:
        spec.seeds = args.seeds
    if args.steps is not None:
        spec.steps = args.steps
        spec.eval_every = max(1, min(spec.eval_every, args.steps))
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise SystemExit(f"opsd bench learning --task {args.task}: unknown method(s) {unknown}; expected some of "
                             f"{list(methods)}")
        spec.methods = list(args.methods)
    return spec


def _settings(given: list[str]) -> tuple[tuple[int, int], ...]:
    """``--scaling 8x64 16x64`` -> ((8, 64), (16, 64)); none given: the default table."""
    from opsd.benchmarks.step import SCALING

    out = []
    for g in given:
        try:
            prompts, tokens = (int(x) for x in g.lower().split("x"))
        except ValueError:
            raise SystemExit(f"opsd bench step --scaling: {g!r} is not PROMPTSxTOKENS (e.g. 16x64)") from None
        out.append((prompts, tokens))
    return tuple(out) or SCALING


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "dry_run", False) and args.task == "toy":
        raise SystemExit("opsd bench learning --dry-run: --task toy has no plan to print (smollm2, sparse and mbpp do)")
    if getattr(args, "note", None) is not None and args.task == "toy":
        raise SystemExit("opsd bench learning --note: --task toy keeps no note in its records (smollm2, sparse and "
                         "mbpp do)")
    if args.bench == "learning" and args.task == "smollm2":
        from opsd.benchmarks.comparison import ALL_METHODS as COMPARISON_METHODS
        from opsd.benchmarks.comparison import ComparisonSpec, dry_run, run_comparison

        spec = _learning_spec(ComparisonSpec.quick() if args.quick else ComparisonSpec(), args, COMPARISON_METHODS)
        if args.dry_run:
            return {"plan": dry_run(spec, args.out or LEARNING_OUT["smollm2"])}
        report = run_comparison(spec, args.out or LEARNING_OUT["smollm2"], args.work_dir, args.budget_minutes,
                                note=args.note)
    elif args.bench == "learning" and args.task in ("sparse", "mbpp"):
        from opsd.benchmarks.sparse import METHODS as SPARSE_METHODS
        from opsd.benchmarks.sparse import SparseSpec, dry_run, run_sparse

        if args.quick and args.task == "mbpp":
            raise SystemExit("opsd bench learning --task mbpp has no --quick version; --task sparse --quick runs the "
                             "same harness on the tiny model in minutes")
        spec = SparseSpec.quick() if args.quick else SparseSpec.mbpp() if args.task == "mbpp" else SparseSpec()
        spec = _learning_spec(spec, args, SPARSE_METHODS)
        out = args.out or LEARNING_OUT[args.task]
        if args.dry_run:
            report = dry_run(spec, out)
        else:
            report = run_sparse(spec, out, args.work_dir, args.budget_minutes, experiment=args.task, note=args.note)
    elif args.bench == "learning":
        from opsd.benchmarks.experiment import METHODS, LearningSpec, run_learning

        spec = _learning_spec(LearningSpec.quick() if args.quick else LearningSpec(), args, METHODS)
        if args.lr is not None:
            spec.lr = args.lr
        report = run_learning(spec, args.out or LEARNING_OUT["toy"], args.work_dir)
    elif args.bench == "loss":
        report = bench_loss(args.vocab, args.tokens, args.chunk, args.hidden, args.topk, args.device, args.dtype,
                            args.repeats)
    elif args.bench == "sandbox":
        from opsd.benchmarks.sandbox import bench_sandbox

        report = bench_sandbox(args.programs, tuple(args.workers))
    elif args.bench == "sync":
        from opsd.benchmarks.sync import bench_sync

        report = bench_sync(args.params_m, args.bucket_mb, args.repeats, vllm=not args.no_vllm,
                            transports=args.transports)
    else:
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not Path(config).exists():
            overrides.insert(0, config)
            config = None
        if config is None:
            from opsd.config import REPO_ROOT

            config = str(REPO_ROOT / "configs" / ("tiny.yaml" if args.bench == "soak" else "local.yaml"))
        if args.bench == "task":
            report = bench_task(config, overrides, args.problems)
        elif args.bench == "soak":
            from opsd.benchmarks.soak import bench_soak

            report = bench_soak(config, overrides, steps=args.steps, sample_every=args.sample_every, out_dir=Path(args.out))
        elif args.bench == "step":
            from opsd.benchmarks.step import bench_head_paths, bench_scaling, bench_staleness, bench_step

            if args.head_paths:
                report = bench_head_paths(config, overrides, args.steps or 3, tuple(args.head_paths))
            elif args.scaling is not None:
                report = bench_scaling(config, overrides, args.steps or 2, _settings(args.scaling))
            elif args.staleness:
                report = bench_staleness(config, overrides, args.steps or 3, tuple(args.staleness), args.overlap)
            else:
                report = bench_step(config, overrides, args.steps or 3)
        elif args.bench == "head":
            from opsd.benchmarks.head import bench_head

            report = bench_head(config, overrides, args.rows)
        else:
            report = bench_train(config, overrides)
    report["machine"] = machine()
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opsd.benchmarks.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
