"""Evaluation: generate n answers per problem with the rollout workers, grade them with
opsd/verify.py, and summarise them as avg@n, pass@n, maj@n and format rate (opsd/evaluation.py).

One code path for both callers: ``opsd eval`` (:func:`run_eval`, its own Ray actors on a saved
model) and the periodic evaluation inside ``opsd train`` (``Trainer.evaluate``, the training
run's rollout workers on the current weights). Both go through :func:`evaluate_pairs`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from opsd.config import REPO_ROOT, Config, ConfigError, check, load_config
from opsd.evaluation import CODE, Graded, grade, mean_accuracy, summarize
from opsd.verify import EXTRACTORS
from opsd.prompts import PromptPair

DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
# Sampling temperature of `opsd eval --n N` (N > 1) when neither --temperature nor the config's
# eval.temperature says otherwise: n greedy samples would be n copies of one answer.
DEFAULT_SAMPLING_TEMPERATURE = 0.6


class EvalError(ValueError):
    """A model or data argument of `opsd eval` that cannot be used; the message says why."""


@dataclass
class ProblemResult(Graded):
    """One problem's graded answers plus what the samples looked like."""

    response_lens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    ngram_rates: list[float | None] = field(default_factory=list)  # opsd.diagnostics.repeated_ngram_rate


def eval_seed(seed: int, uid: str) -> int:
    """The sampling seed of one evaluation prompt; equals the driver's ``sample_seed(seed, -1,
    uid)``, so ``opsd eval`` and the in-training eval draw the same samples from the same weights."""
    from opsd.launch.cluster import sample_seed

    return sample_seed(seed, -1, uid)


def evaluate_pairs(
    rollouts: Any,
    pairs: Sequence[PromptPair],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int = 0,
    expect_version: int | None = None,
    chunk_size: int | None = None,
    first_chunk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    extract: str = "strict",
    sandbox: Any = None,
) -> tuple[dict[str, float], list[ProblemResult]]:
    """Generate ``n`` answers for every pair on the pool's actors and grade them.

    ``rollouts`` is a :class:`opsd.launch.cluster.ActorPool` of RolloutWorkers. Pairs are dealt to
    the actors round-robin; with ``chunk_size`` they go in rounds of at most that many prompts
    per actor (the first round at most ``first_chunk``, so that a first estimate of the time comes
    early), and ``progress(done, total)`` is called after each round. Answers are read with
    ``extract`` (opsd.verify.EXTRACTORS); code rows' responses run with their tests in the config's
    sandbox (``sandbox``: a config's ``sandbox`` section, opsd.sandbox.shared), here in the
    driver's own sandbox processes, never in this one. Returns the summary (``problems``, ``n``, ``avg@n``,
    ``pass@n``, ``maj@n``, ``format_rate``, ``accuracy_strict`` and ``accuracy_lenient`` (avg@n
    under each extraction), ``response_len_mean``, ``truncated_frac``) and the per-problem results
    in the order of ``pairs``.
    """
    if not pairs:
        raise ValueError("nothing to evaluate: no prompts")
    if n > 1 and temperature <= 0:
        raise ValueError(f"n={n} samples at temperature {temperature}: greedy samples are identical; use temperature > 0")
    from opsd.diagnostics import repeated_ngram_rate
    from opsd.launch.cluster import round_robin, unshard

    box = None
    if any(p.verifier == CODE for p in pairs):
        from opsd.sandbox import shared

        if sandbox is None:
            raise ValueError("code problems to evaluate and no sandbox settings (the config's sandbox section)")
        box = shared(sandbox)
    nw = len(rollouts.actors)
    per_round = len(pairs) if chunk_size is None else max(1, chunk_size) * nw
    first_round = per_round if first_chunk is None else min(per_round, max(1, first_chunk) * nw)
    starts = [0, *range(first_round, len(pairs), per_round)] if pairs else []
    results: list[ProblemResult] = []
    for start, stop in zip(starts, [*starts[1:], len(pairs)]):
        chunk = list(pairs[start:stop])
        # chunk[i::nw] is non-empty exactly for i < len(chunk): a round smaller than the pool
        # goes to the first actors only (map() calls actor i with argument tuple i).
        shards = [s for s in round_robin(chunk, nw) if s]
        outs = rollouts.map(
            "generate", [([p.student_ids for p in s], [eval_seed(seed, p.uid) for p in s]) for s in shards],
            n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            expect_version=expect_version,
        )
        for pair, samples in zip(chunk, unshard(outs, len(chunk))):  # the caller's order, not the shards'
            g = grade(pair.uid, [s.text for s in samples], pair.answer, extract, pair.verifier, box)
            results.append(ProblemResult(
                g.uid, g.answers, g.correct, g.gold, g.verifier,
                response_lens=[len(s.response_ids) for s in samples],
                finish_reasons=[s.finish_reason for s in samples],
                responses=[s.text for s in samples],
                ngram_rates=[repeated_ngram_rate(s.response_ids) for s in samples],
            ))
        if progress is not None:
            progress(len(results), len(pairs))
    return summarize_results(results, extract), results


def summarize_results(results: Sequence[ProblemResult], extract: str = "strict") -> dict[str, float]:
    """opsd.evaluation.summarize, the accuracy under every extraction, the mean response length,
    the truncated fraction and the mean repeated 4-gram rate (None when no answer has a 4-gram)."""
    metrics = summarize(results, [r.responses for r in results])
    for mode in EXTRACTORS:
        # a code row's grade does not depend on how answers are extracted: its programs ran once
        regraded = results if mode == extract else [r if r.verifier == CODE else grade(r.uid, r.responses, r.gold, mode,
                                                                                        r.verifier) for r in results]
        metrics[f"accuracy_{mode}"] = mean_accuracy(regraded)
    lens = [x for r in results for x in r.response_lens]
    reasons = [x for r in results for x in r.finish_reasons]
    metrics["response_len_mean"] = sum(lens) / max(len(lens), 1)
    metrics["truncated_frac"] = sum(x == "length" for x in reasons) / max(len(reasons), 1)
    rates = [x for r in results for x in r.ngram_rates if x is not None]
    metrics["repeated_ngram_rate"] = sum(rates) / len(rates) if rates else None
    return metrics


# --- `opsd eval` -----------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    path: str  # what vLLM and transformers load
    run_dir: Path | None = None  # when a run directory (or one of its checkpoints) was given
    checkpoint: Path | None = None


def resolve_eval_model(model: str) -> ResolvedModel:
    """``tiny``, an HF model directory, a run directory (its latest complete checkpoint's hf/), a
    checkpoint directory (``RUN/checkpoints/step_N``), or a hub id such as ``Qwen/Qwen3-1.7B``."""
    from opsd.assets.models import MODELS, check_hub_reachable, hub_snapshot, resolve_model_path

    if model in MODELS or model.endswith(".gguf"):
        return ResolvedModel(resolve_model_path(model))
    p = Path(model).expanduser()
    if not p.exists():
        # "org/name" is a hub id unless "org" is a local folder (then it is a mistyped path).
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not p.parent.exists():
            if hub_snapshot(model) is None:
                check_hub_reachable(model, key="--model")  # else a minute of retries and a traceback
            return ResolvedModel(model)  # a hub id: vLLM and transformers fetch it
        raise EvalError(f"--model {model}: no such file or directory (expected 'tiny', an HF model directory, "
                        "a run directory, or a hub id like Qwen/Qwen3-1.7B)")
    if not p.is_dir():
        raise EvalError(f"--model {model}: is a file; expected a directory (HF model or run directory)")
    if (p / "config.json").is_file():
        return ResolvedModel(str(p))
    if (p / "driver_state.json").is_file() and p.parent.name == "checkpoints":  # RUN/checkpoints/step_N
        return _checkpoint_hf(p, run_dir=p.parent.parent)
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file():
        from opsd.launch.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise EvalError(
                f"--model {model}: a run directory with no complete checkpoint (no checkpoints/step_N holding "
                "driver_state.json); train longer or with train.checkpoint_every > 0, or pass an HF model directory"
            )
        return _checkpoint_hf(ckpt, run_dir=p)
    raise EvalError(f"--model {model}: neither an HF model directory (no config.json) nor a run directory "
                    "(no config.yaml or checkpoints/)")


def _checkpoint_hf(ckpt: Path, *, run_dir: Path) -> ResolvedModel:
    hf = ckpt / "hf"
    if not (hf / "config.json").is_file():
        raise EvalError(f"checkpoint {ckpt} has no HF weights (hf/ is missing: the run had train.export_hf=false); "
                        "evaluate a checkpoint that has them or export one")
    return ResolvedModel(str(hf), run_dir=run_dir, checkpoint=ckpt)


def _dataset_names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p.split("::")[0]).stem + (f"::{p.split('::')[1]}" if "::" in p else "") for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


def _load_eval_problems(path: str, cfg: Config):
    """Problems with ``answer`` (or a boxed answer in the solution); an id column is used when the
    file has one, else rows are numbered. Solutions are dropped: only the student prompt is used."""
    from opsd.launch.problems import read_problems

    problems = read_problems(cfg, path, require_solution=False)
    return [dataclasses.replace(p, solution="") for p in problems]


def eval_config(
    model: ResolvedModel, *, config: str | None, overrides: Sequence[str], n: int | None,
    temperature: float | None, max_tokens: int | None,
) -> Config:
    """The config of an eval: --config, else the run directory's saved config, else local.yaml;
    overrides on top; then --n / --temperature / --max-tokens into the eval section."""
    if config is None:
        saved = model.run_dir / "config.yaml" if model.run_dir is not None else None
        config = str(saved) if saved is not None and saved.is_file() else str(DEFAULT_CONFIG)
    cfg = load_config(config, list(overrides))
    n_eff = n if n is not None else cfg.eval.n
    if temperature is not None:
        temp_eff = temperature
    elif n_eff > 1 and cfg.eval.temperature == 0:
        temp_eff = DEFAULT_SAMPLING_TEMPERATURE
    else:
        temp_eff = cfg.eval.temperature
    cfg.eval.n = n_eff
    cfg.eval.temperature = float(temp_eff)
    if max_tokens is not None:
        cfg.eval.max_tokens = max_tokens
    cfg.model.path = model.path
    cfg.train.resume = None
    check(cfg)  # eval.n > 1 at temperature 0 is refused here, naming the keys
    return cfg


def run_eval(
    model: str,
    data: Sequence[str],
    *,
    n: int | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    limit: int | None = None,
    save_responses: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict, Path]:
    """``opsd eval``: evaluate ``model`` on each file of ``data``; returns (report, report path)."""
    from opsd.launch.cluster import init_ray, shutdown_ray

    if not data:
        raise EvalError("no --data files given")
    resolved = resolve_eval_model(model)
    cfg = eval_config(resolved, config=config, overrides=overrides, n=n, temperature=temperature, max_tokens=max_tokens)
    ev = cfg.eval
    built = _eval_sets(resolved, cfg, list(data), limit)
    if any(p.verifier == CODE for _, _, pairs, _ in built for p in pairs):
        from opsd.sandbox import shared

        shared(cfg.sandbox, log=log)  # its isolation said now; less than sandbox.isolation stops here
    out_path = Path(out) if out else default_report_path(resolved, [name for name, *_ in built], ev.n)
    total = sum(len(p) for _, _, p, _ in built)
    log(f"opsd eval: {resolved.path}: {total} problems in {len(built)} dataset(s), n={ev.n}, "
        f"temperature={ev.temperature}, max_tokens={ev.max_tokens}, {cfg.rollout.num_workers} rollout worker(s)")
    report: dict[str, Any] = {
        "model": model, "model_path": resolved.path,
        "run_dir": str(resolved.run_dir) if resolved.run_dir else None,
        "checkpoint": str(resolved.checkpoint) if resolved.checkpoint else None,
        "sampling": {"n": ev.n, "temperature": ev.temperature, "top_p": 1.0, "max_tokens": ev.max_tokens, "seed": seed},
        "grading": cfg.grading.extract,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "datasets": {},
    }
    started = init_ray(cfg)
    try:
        report["datasets"] = _evaluate_sets(cfg, resolved.path, built, seed=seed, save_responses=save_responses,
                                            gradings=eval_gradings(cfg, [path for _, path, *_ in built], overrides),
                                            log=log)
    finally:
        if started:
            shutdown_ray()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    log(format_table(report))
    log(f"report: {out_path}")
    return report, out_path


def _eval_sets(resolved: ResolvedModel, cfg: Config, data: list[str], limit: int | None) -> list[tuple]:
    """(name, path, prompt pairs, skipped uids) per data file: every row read and checked, and its
    prompts built, before any actor starts."""
    from opsd.assets.models import load_tokenizer
    from opsd.prompts import PromptBuilder

    tokenizer = load_tokenizer(resolved.path, trust_remote_code=cfg.model.trust_remote_code)
    builder = PromptBuilder(tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.eval.max_tokens)
    built = []
    for name, path in zip(_dataset_names(data), data):
        problems = _load_eval_problems(path, cfg)
        if limit:
            problems = problems[:limit]
        # Only the student's prompt is evaluated: no teacher prompt is built or length-checked.
        pairs, skipped = builder.build(problems, source=str(path), teacher=lambda problem: None)
        if not pairs:
            raise EvalError(f"{path}: all {len(problems)} problems skipped as over-long (prompt.overlong=skip)")
        built.append((name, path, pairs, skipped))
    return built


def eval_gradings(cfg: Config, paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """How each set's answers are read: a named set's own way (GSM8K lenient, MATH strict), unless
    ``grading.extract=...`` is given on the command line; any other set by the config's."""
    from opsd.config import default_grading

    if any(o.split("=", 1)[0].strip() == "grading.extract" for o in overrides):
        return [cfg.grading.extract] * len(paths)
    return [default_grading(str(p)) if named_dataset(str(p)) else cfg.grading.extract for p in paths]


def named_dataset(path: str) -> bool:
    from opsd.assets.datasets import named
    from opsd.data import DataError

    try:
        return named(path) is not None
    except DataError:
        return False


def _evaluate_sets(cfg: Config, model_path: str, built: list[tuple], *, seed: int, save_responses: bool,
                   gradings: Sequence[str], log: Callable[[str], None]) -> dict[str, dict]:
    """Rollout workers of their own generate and grade every set; the report's datasets section."""
    from opsd.launch.cluster import ActorPool
    from opsd.workers.rollout import RolloutWorker

    ev = cfg.eval
    gpu = 1 if cfg.cluster.device == "cuda" else 0
    pool = ActorPool(
        "rollout", RolloutWorker, cfg.rollout.num_workers,
        {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu * cfg.rollout.tensor_parallel_size},
        (cfg, model_path), max_restarts=cfg.train.max_actor_restarts,
    )
    datasets = {}
    try:
        t0 = time.perf_counter()
        pool.wait_ready()
        log(f"opsd eval: {len(pool.actors)} vLLM worker(s) ready in {time.perf_counter() - t0:.0f}s")
        for (name, path, pairs, skipped), extract in zip(built, gradings):
            t0 = time.perf_counter()

            def progress(done: int, of: int, name=name, t0=t0) -> None:
                log(f"opsd eval: {name}: {progress_line(done, of, time.perf_counter() - t0)}")

            # A first round of 4 prompts per worker: its time per problem gives an estimate of the
            # whole set's within minutes (a MATH problem at 256 tokens takes ~35 s on 2 CPU cores).
            metrics, results = evaluate_pairs(
                pool, pairs, n=ev.n, max_tokens=ev.max_tokens, temperature=ev.temperature, seed=seed,
                chunk_size=64, first_chunk=4, progress=progress, extract=extract, sandbox=cfg.sandbox,
            )
            metrics["seconds"] = time.perf_counter() - t0
            datasets[name] = {
                "path": str(path), "grading": extract, "metrics": metrics, "skipped": list(skipped),
                "problems": [_problem_record(r, save_responses) for r in results],
            }
    finally:
        pool.kill()
    return datasets


def progress_line(done: int, total: int, seconds: float) -> str:
    """"24/500 problems (3m12s; about 1h03m left)": the time left at the pace so far (the first
    round is small, so the estimate errs long at first: larger rounds batch better)."""
    def clock(s: float) -> str:
        m = round(s) // 60
        return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{round(s) % 60:02d}s"

    left = f"; about {clock(seconds / done * (total - done))} left" if 0 < done < total else ""
    return f"{done}/{total} problems ({clock(seconds)}{left})"


def _problem_record(r: ProblemResult, save_responses: bool) -> dict:
    rec = {
        "uid": r.uid, "gold": r.gold, "answers": r.answers, "correct": r.correct,
        "response_lens": r.response_lens, "finish_reasons": r.finish_reasons,
    }
    if save_responses:
        rec["responses"] = r.responses
    return rec


def default_report_path(model: ResolvedModel, names: Sequence[str], n: int) -> Path:
    if model.run_dir is None:
        return Path("eval_report.json")
    tag = re.sub(r"[^\w.+-]+", "_", "+".join(names))[:80]
    return model.run_dir / "eval" / f"{model.checkpoint.name}_{tag}_n{n}.json"


def format_table(report: dict) -> str:
    rows = [("dataset", "problems", "n", "graded", "avg@n ± se", "pass@n ± se", "maj@n ± se", "strict", "lenient",
             "format", "len")]
    for name, d in report["datasets"].items():
        m = d["metrics"]
        k = int(m["n"])
        rows.append((name, str(m["problems"]), str(k), d.get("grading", report.get("grading", "?")), *(f"{m[f'{s}@{k}']:.3f} ± {m.get(f'{s}@{k}_se', 0.0):.3f}"
                                                         for s in ("avg", "pass", "maj")),
                     f"{m['accuracy_strict']:.3f}", f"{m['accuracy_lenient']:.3f}",
                     f"{m['format_rate']:.3f}", f"{m['response_len_mean']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main_eval(args: Any) -> int:
    """The body of ``opsd eval`` (launch/cli.py parses the arguments)."""
    from opsd.data import DataError
    from opsd.prompts import PromptTooLongError

    # `--data a.jsonl rollout.num_workers=2`: nargs="+" took the overrides along with the files.
    data = [d for d in args.data if not ("=" in d and not Path(d).exists())]
    overrides = [d for d in args.data if d not in data] + list(args.overrides)
    try:
        run_eval(
            args.model, data, n=args.n, config=args.config, overrides=overrides, out=args.out,
            temperature=args.temperature, max_tokens=args.max_tokens, limit=args.limit,
            save_responses=args.responses, seed=args.seed,
        )
    except (EvalError, DataError, PromptTooLongError, FileNotFoundError) as exc:
        print(f"opsd eval: {exc}", file=sys.stderr)
        return 2
    except ConfigError:
        raise  # the CLI prints config errors
    return 0
