"""`opsd bench step`: opsd's training step against the single-process loop a user could write.

The loop is what one would write without Ray, actors or a weight push: in one Python process,
with as many torch threads as the cluster has CPUs, it samples the step's answers with
transformers' ``generate``, runs the teacher (the scorer's own code, ``ScorerWorker.teacher_targets``,
called in-process), and takes an AdamW step through the learner's own loss module
(``PolicyLoss`` and ``opsd.losses.chunked_loss``), micro-batch by micro-batch. Same model, dtype,
prompts per step, new tokens, micro-batch size and loss as the opsd run beside it.

Both sides are measured in one invocation, one after the other, and the first step of each is left
out (warm-up). Reported: per-stage seconds, the whole-step wall, generated tokens per second of
step, ``overhead = opsd step wall / sum of its stage times`` and
``vs_single_process = opsd step / reference step`` (and the same in tokens per second, since the two
samplers draw different answers of different lengths).

``--scaling``, ``--staleness`` and ``--head-paths`` instead run opsd alone, once per setting, in one
invocation: ``--head-paths module auto`` compares the learner's LM head and loss before issue 40
(the head module per chunk) with the default (opsd.losses.resolve_head_path).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from opsd.benchmarks.figures import mean

STAGES = ("rollout", "score", "train", "sync")


def reference_steps(cfg: Any, model_path: str, steps: int, *, threads: int,
                    out: Callable[[str], None] = print) -> list[dict]:
    """``steps`` OPSD steps (fixed teacher) in this process; per step the seconds of each stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.dtypes import torch_dtype
    from opsd.lora import peft_config
    from opsd.losses import fp32_lm_head
    from opsd.scoring import teacher_targets
    from opsd.workers.learner_training import PolicyLoss, loss_spec
    from opsd.workers.scorer import ScorerWorker

    if cfg.algo != "opsd" or cfg.teacher.mode not in ("fixed", "live") or cfg.rollout.n != 1:
        raise ValueError("the single-process reference is the OPSD step with a fixed or live teacher and "
                         f"rollout.n=1; got algo={cfg.algo}, teacher.mode={cfg.teacher.mode}, rollout.n={cfg.rollout.n}")
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_step = cfg.train.prompts_per_step
    pairs = _reference_prompts(cfg, tok, per_step * steps)
    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(cfg.model.dtype))
    if cfg.model.fp32_lm_head:
        fp32_lm_head(student.get_output_embeddings())
    lora = cfg.model.lora.enabled
    if lora:
        from peft import get_peft_model

        student = get_peft_model(student, peft_config(cfg.model.lora))
    # A fixed teacher: its own frozen copy, as in opsd (with LoRA: the student with its adapters
    # off, as the engines serve it with model.lora.serve=adapter); a live one is the student itself.
    scorer = ScorerWorker(cfg, model_path) if cfg.teacher.mode == "fixed" and not lora else None
    torch.set_num_threads(threads)  # ScorerWorker set its own (scorer.num_threads)
    lc = cfg.learner
    # The same AdamW as the learner on CPU (its fused kernel; opsd.workers.learner.deepspeed_config).
    trainable = [p for p in student.parameters() if p.requires_grad]  # with LoRA, the adapters
    opt = torch.optim.AdamW(trainable, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay,
                            fused=cfg.cluster.device == "cpu")
    policy = PolicyLoss(student, loss_spec(cfg), cfg.model.lm_head_path)
    times = []
    for step in range(steps):
        batch = pairs[step * per_step : (step + 1) * per_step]
        t0 = time.perf_counter()
        responses = _generate(cfg, student, batch, pad_id, tok.eos_token_id)
        t1 = time.perf_counter()
        if scorer is not None:
            targets = scorer.teacher_targets([p.teacher_ids for p in batch], responses)
        else:
            student.eval()
            with student.disable_adapter() if lora and cfg.teacher.mode == "fixed" else nullcontext():
                targets = teacher_targets(student, [p.teacher_ids for p in batch], responses, k=cfg.scorer.topk,
                                          temperature=cfg.loss.temperature, chunk_size=cfg.loss.chunk_size,
                                          max_tokens=cfg.scorer.max_tokens_per_forward, pad_id=pad_id)
        t2 = time.perf_counter()
        loss_sum = _train(cfg, student, policy, opt, batch, responses, targets, pad_id)
        t3 = time.perf_counter()
        times.append({"rollout_seconds": t1 - t0, "score_seconds": t2 - t1, "train_seconds": t3 - t2,
                      "sync_seconds": 0.0, "step_seconds": t3 - t0, "loss": loss_sum,
                      "tokens_generated": sum(len(r) for r in responses)})
        out(f"  reference step {step + 1}/{steps}: {t3 - t0:.1f} s (generate {t1 - t0:.1f}, teacher {t2 - t1:.1f}, "
            f"train {t3 - t2:.1f}), {times[-1]['tokens_generated']} tokens")
    return times


def _reference_prompts(cfg: Any, tok: Any, needed: int) -> list:
    from opsd.launch.problems import read_problems
    from opsd.prompts import PromptBuilder

    builder = PromptBuilder(tok, cfg.prompt, max_model_len=cfg.model.max_model_len,
                            max_new_tokens=cfg.rollout.max_tokens)
    d = cfg.data
    problems = read_problems(cfg, d.train_path)
    pairs, _ = builder.build(problems[:needed], source=d.train_path)
    if len(pairs) < needed:
        raise ValueError(f"{d.train_path}: {len(pairs)} usable prompts, the reference needs {needed}")
    return pairs


def _generate(cfg: Any, student: Any, batch: list, pad_id: int, eos: int) -> list[list[int]]:
    """HF generate on the student prompts (left-padded), each response cut after its EOS."""
    import torch

    student.eval()
    width = max(len(p.student_ids) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p.student_ids)) + p.student_ids for p in batch])
    mask = torch.tensor([[0] * (width - len(p.student_ids)) + [1] * len(p.student_ids) for p in batch])
    with torch.no_grad():
        gen = student.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k if cfg.rollout.top_k > 0 else None,
            max_new_tokens=cfg.rollout.max_tokens, pad_token_id=pad_id,
        )[:, width:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in gen]


def _train(cfg: Any, student: Any, policy: Any, opt: Any, batch: list, responses: list, targets: list,
           pad_id: int) -> float:
    """One AdamW step on the loss summed over micro-batches (the global token mean); the loss."""
    import torch

    from opsd.prompts import response_loss_mask

    lc = cfg.learner
    student.train()
    opt.zero_grad(set_to_none=True)
    masks = [response_loss_mask(len(r), skip_first=cfg.loss.skip_first) for r in responses]
    total = sum(sum(m) for m in masks)
    loss_sum = 0.0
    for start in range(0, len(batch), lc.micro_batch_size):
        idx = range(start, min(start + lc.micro_batch_size, len(batch)))
        inputs = policy_loss_inputs([batch[i].student_ids for i in idx], [responses[i] for i in idx],
                                    [targets[i] for i in idx], [masks[i] for i in idx], pad_id)
        loss, _ = policy(*inputs, float(max(total, 1)))
        loss.backward()
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(student.parameters(), lc.grad_clip)
    opt.step()
    return loss_sum


def policy_loss_inputs(prompts: list, responses: list, targets: list, masks: list, pad_id: int) -> tuple:
    """``PolicyLoss``'s inputs for rows of prompt + response: the padded ids and attention mask,
    the (row, column) of each position that predicts a loss token (``masks``, per response token),
    and the teacher's targets there (``targets`` per row, as ``ScorerWorker.teacher_targets``
    returns them: top-k ids, top-k logprobs, sampled-token logprob; top-k may be None)."""
    import torch

    from opsd.losses import TokenTargets
    from opsd.scoring import pad_right

    rows, cols, keep = [], [], []
    for j, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        m = torch.tensor(m, dtype=torch.bool)
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(r))[m]
        rows.append(torch.full((len(pos),), j, dtype=torch.long))
        cols.append(pos)
        keep.append(m)

    def at_loss_tokens(k: int, dtype: Any) -> Any:
        if targets[0][k] is None:
            return None
        return torch.cat([torch.as_tensor(t[k])[m] for t, m in zip(targets, keep)]).to(dtype)

    sampled = torch.cat([torch.as_tensor(r)[m] for r, m in zip(responses, keep)]).long()
    t = TokenTargets(sampled_ids=sampled, weight=torch.ones(len(sampled)), topk_ids=at_loss_tokens(0, torch.long),
                     topk_logprobs=at_loss_tokens(1, torch.float32), teacher_logprobs=at_loss_tokens(2, torch.float32))
    input_ids, attn = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    return input_ids, attn, torch.cat(rows), torch.cat(cols), t


def _summary(rows: list[dict]) -> dict:
    steady = rows[1:] if len(rows) > 1 else rows
    s = {f"{k}_seconds": mean([r[f"{k}_seconds"] for r in steady]) for k in (*STAGES, "step")}
    s["tokens_per_step"] = mean([r["tokens_generated"] for r in steady])
    s["tokens_per_second"] = s["tokens_per_step"] / s["step_seconds"]
    s["steady_steps"] = len(steady)
    s["sync_mb"] = steady[-1].get("sync_mb", 0.0)  # the same every push
    s["score_overlapped"] = sum(bool(r.get("score_overlapped")) for r in steady)  # scored while the last step trained
    return s


def _opsd_run(config: str, overrides: list[str], extra: list[str], steps: int) -> dict:
    """One short opsd run (no evaluation, no checkpoints): its steady-state step summary."""
    from opsd.launch.driver import train
    from opsd.launch.loggers import read_metrics

    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        run_overrides = [*overrides, *extra, f"train.steps={steps + 1}", "eval.every=0", "eval.at_start=false",
                         "train.checkpoint_every=0", "logging.progress=false", "logging.tensorboard=false",
                         f"run_dir={Path(tmp) / 'run'}"]
        with ActorMemory() as memory:
            run = train(config, run_overrides)
        return {**_summary([r for r in read_metrics(run) if r["step"] > 0]), "actor_peak_mb": memory.peak_mb()}


class ActorMemory:
    """Peak resident and proportional memory (RSS, PSS) of this process's Ray actors, by actor class,
    summed over the actors of a class at each sample: what each role holds (PSS shares a shared
    library's pages among the processes that map it)."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval = interval
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        from opsd.benchmarks.soak import proc_name

        now: dict[str, dict[str, float]] = {}
        for proc in psutil.Process().children(recursive=True):
            name = proc_name(proc.pid)
            if not name.startswith("ray::") or name.startswith("ray::IDLE"):
                continue
            role = name[5:].split(".")[0]
            try:
                mem = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # gone between the listing and the read
            agg = now.setdefault(role, {"rss": 0.0, "pss": 0.0})
            agg["rss"] += mem.rss / 2**20
            agg["pss"] += getattr(mem, "pss", 0) / 2**20
        for role, agg in now.items():
            peak = self.peaks.setdefault(role, {"rss": 0.0, "pss": 0.0})
            for k in agg:
                peak[k] = max(peak[k], agg[k])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self) -> dict[str, dict[str, float]]:
        return {role: {k: round(v, 1) for k, v in p.items()} for role, p in sorted(self.peaks.items())}


def bench_step(config: str, overrides: list[str], steps: int = 3, out: Callable[[str], None] = print) -> dict:
    """opsd's step and the single-process reference, side by side (the first step of each is warm-up)."""
    from opsd.config import load_config
    from opsd.assets.models import resolve_model_path

    n = steps + 1
    cfg = load_config(config, [*overrides, f"train.steps={n}"])
    out(f"bench step: {cfg.model.path} ({cfg.model.dtype}), {cfg.train.prompts_per_step} prompts x at most "
        f"{cfg.rollout.max_tokens} new tokens per step, {n} steps each (the first is warm-up), "
        f"{cfg.cluster.num_cpus} CPUs")
    o = _opsd_run(config, overrides, [], steps)
    model_path = resolve_model_path(cfg.model.path)
    ref_rows = reference_steps(cfg, model_path, n, threads=int(cfg.cluster.num_cpus or 1), out=out)
    r = _summary(ref_rows)
    stage_sum = sum(o[f"{k}_seconds"] for k in STAGES)
    report = {
        "config": config, "overrides": overrides, "model": cfg.model.path, "dtype": cfg.model.dtype,
        "prompts_per_step": cfg.train.prompts_per_step, "max_tokens": cfg.rollout.max_tokens,
        "opsd": o, "reference": r,
        "overhead": o["step_seconds"] / stage_sum,
        "vs_single_process": o["step_seconds"] / r["step_seconds"],
        "vs_single_process_tokens_per_second": o["tokens_per_second"] / r["tokens_per_second"],
    }
    out(f"  {'stage':9s} {'opsd s':>8s} {'reference s':>12s}")
    for k, label in (("rollout", "rollout"), ("score", "teacher"), ("train", "train"), ("sync", "sync"),
                     ("step", "step")):
        out(f"  {label:9s} {o[f'{k}_seconds']:8.2f} {r[f'{k}_seconds']:12.2f}")
    out(f"  tokens/s  {o['tokens_per_second']:8.1f} {r['tokens_per_second']:12.1f}  "
        f"({o['tokens_per_step']:.0f} and {r['tokens_per_step']:.0f} tokens per step)")
    out("  Ray processes' peak memory, MiB (RSS / PSS): " + ", ".join(
        f"{role} {m['rss']:.0f} / {m['pss']:.0f}" for role, m in o["actor_peak_mb"].items()))
    out(f"  overhead (opsd step / sum of its stages) {report['overhead']:.3f}; opsd step / reference step "
        f"{report['vs_single_process']:.2f}x; reference tokens/s / opsd tokens/s "
        f"{1 / report['vs_single_process_tokens_per_second']:.2f}x")
    return report


SCALING = ((8, 64), (16, 64), (32, 64), (8, 128), (8, 256))


def bench_scaling(config: str, overrides: list[str], steps: int = 2, settings=SCALING,
                  out: Callable[[str], None] = print) -> dict:
    """opsd's step time and tokens/s against prompts per step and against new tokens: one short
    run per (prompts, max new tokens) setting, the first step of each left out (warm-up)."""
    from opsd.config import load_config

    base = load_config(config, overrides)
    rows = []
    out(f"bench step --scaling: {len(settings)} settings, {steps + 1} steps each (the first is warm-up)")
    for prompts, tokens in settings:
        # Room for the longest (teacher) prompt and the new tokens.
        ctx = max(base.model.max_model_len, base.prompt.max_prompt_len + tokens)
        s = _opsd_run(config, overrides, [f"train.prompts_per_step={prompts}", f"rollout.max_tokens={tokens}",
                                          f"model.max_model_len={ctx}"], steps)
        s.update(prompts_per_step=prompts, max_tokens=tokens)
        rows.append(s)
    out(f"  {'prompts':>7s} {'max new':>7s} {'tokens/step':>11s} {'step s':>7s} {'tokens/s':>8s} "
        f"{'rollout':>7s} {'score':>6s} {'train':>6s} {'sync':>5s}")
    for s in rows:
        out(f"  {s['prompts_per_step']:7d} {s['max_tokens']:7d} {s['tokens_per_step']:11.0f} {s['step_seconds']:7.1f} "
            f"{s['tokens_per_second']:8.1f} {s['rollout_seconds']:7.1f} {s['score_seconds']:6.1f} "
            f"{s['train_seconds']:6.1f} {s['sync_seconds']:5.1f}")
    return {"config": config, "overrides": overrides, "model": base.model.path, "dtype": base.model.dtype,
            "scaling": rows}


def bench_staleness(config: str, overrides: list[str], steps: int = 3, values=(0, 1, 2), overlap: str = "on",
                    out: Callable[[str], None] = print) -> dict:
    """Throughput at rollout.max_staleness = s for each s, side by side in one invocation, and
    the ratio of each to the first (serial at s = 0). ``overlap``: scorer.overlap for s > 0
    ("on", "off", or "both": each s > 0 twice, the next batch scored while the learner trains
    and scored in its own step)."""
    from opsd.config import load_config

    if overlap not in ("on", "off", "both"):
        raise ValueError(f"--overlap must be on, off or both, not {overlap!r}")
    base = load_config(config, overrides)
    runs = [(v, o) for v in values for o in ((True, False) if overlap == "both" and v > 0 else (overlap != "off",))]
    out(f"bench step --staleness: s = {', '.join(map(str, values))} (scorer.overlap {overlap}), {steps + 1} steps "
        "each (the first is warm-up)")
    rows = []
    for v, o in runs:
        s = _opsd_run(config, overrides, [f"rollout.max_staleness={v}", f"scorer.overlap={str(o).lower()}"], steps)
        s["max_staleness"], s["score_overlap"] = v, o
        rows.append(s)
    first = rows[0]
    out(f"  {'s':>2s} {'overlap':>7s} {'step s':>7s} {'tokens/s':>8s} {'vs first':>8s} {'rollout':>7s} {'score':>6s} "
        f"{'train':>6s} {'sync':>5s} {'scored ahead':>12s}")
    for s in rows:
        s["throughput_ratio"] = s["tokens_per_second"] / first["tokens_per_second"]
        s["step_ratio"] = first["step_seconds"] / s["step_seconds"]
        out(f"  {s['max_staleness']:2d} {'on' if s['score_overlap'] else 'off':>7s} {s['step_seconds']:7.1f} "
            f"{s['tokens_per_second']:8.1f} {s['throughput_ratio']:7.2f}x {s['rollout_seconds']:7.1f} "
            f"{s['score_seconds']:6.1f} {s['train_seconds']:6.1f} {s['sync_seconds']:5.1f} "
            f"{s.get('score_overlapped', 0):12.0f}")
    return {"config": config, "overrides": overrides, "model": base.model.path, "dtype": base.model.dtype,
            "staleness": rows}


def bench_head_paths(config: str, overrides: list[str], steps: int = 3, paths=("module", "auto"),
                     out: Callable[[str], None] = print) -> dict:
    """opsd's step at model.lm_head_path = each of ``paths`` (issue 40: "module" is the learner's
    LM head and loss before the fused function, "auto" the default), one short run each in this
    invocation, the first step of each left out; each run's step and train seconds against the
    first run's."""
    from opsd.config import load_config

    base = load_config(config, overrides)
    out(f"bench step --head-paths: {' '.join(paths)}, {steps + 1} steps each (the first is warm-up), "
        f"{base.model.path} ({base.model.dtype}) on {base.cluster.device}")
    rows = []
    for path in paths:
        s = _opsd_run(config, overrides, [f"model.lm_head_path={path}"], steps)
        s["lm_head_path"] = path
        rows.append(s)
    first = rows[0]
    out(f"  {'path':>7s} {'step s':>7s} {'train s':>7s} {'step vs first':>13s} {'train vs first':>14s} {'tokens/s':>8s}")
    for s in rows:
        s["step_ratio"] = s["step_seconds"] / first["step_seconds"]
        s["train_ratio"] = s["train_seconds"] / first["train_seconds"]
        out(f"  {s['lm_head_path']:>7s} {s['step_seconds']:7.2f} {s['train_seconds']:7.2f} {s['step_ratio']:12.3f}x "
            f"{s['train_ratio']:13.3f}x {s['tokens_per_second']:8.1f}")
    return {"config": config, "overrides": overrides, "model": base.model.path, "dtype": base.model.dtype,
            "device": base.cluster.device, "head_paths": rows}
