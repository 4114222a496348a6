"""The training driver. ``Trainer.train_one_step`` reads as the data flow of DESIGN.md:

    sample prompts -> rollouts (vLLM actors) -> teacher scores (Arrow batch) -> train (ZeRO group)
    -> sync weights -> evaluate every eval.every steps -> checkpoint every train.checkpoint_every
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import OmegaConf

from opsd.batch import Sample, build_batch, concat_batches, from_ipc_bytes, write_ipc
from opsd.config import (
    Config, ConfigError, check, distills, dtype_note, load_config, resolve_path, to_yaml, trains_on_references,
    uses_scorer,
)
from opsd.data import DataError, EpochSampler, load_problems
from opsd.prompts import PromptBuilder, PromptPair, response_loss_mask
from opsd.launch.checkpoints import CheckpointError, latest_checkpoint, write_manifest
from opsd.launch.cluster import ActorPool, Pending, actor_errors, custom_parts, init_ray, round_robin, sample_seed, torch_threads, unshard
from opsd.launch.loggers import MetricsLogger, read_metrics
from opsd.launch.stopping import ActorLost, BadSteps, LearnerLost, StopSignals, Stopped
from opsd.launch.validate import actor_resources, custom_resource_needs, resource_needs
from opsd.launch.weights import WeightSync
from opsd.workers.learner import LearnerGroup
from opsd.workers.rollout import RolloutWorker
from opsd.workers.scorer import ScoreRequest, ScorerWorker

METRIC_FIELDS = (
    "step", "policy_version", "teacher_version", "loss", "kl_sampled", "grad_norm", "lr", "reward_mean",
    "response_len_mean", "truncated_frac", "tokens_generated", "tokens_generated_total", "samples",
    "dropped_stale", "rollout_seconds", "score_seconds", "train_seconds", "sync_seconds", "step_seconds",
    "update_skipped", "score_overlapped", "sync_in_place",
)


@dataclass
class InFlight:
    """One later step's batch whose rollouts are running (rollout.max_staleness > 0)."""

    indices: list[int]  # its prompts, as the sampler drew them (a checkpoint records them)
    pairs: list[PromptPair]
    rollouts: Pending
    # Once the rollouts are back and being scored while the learner trains (scorer.overlap): the
    # rows sent to the scorers and their calls, and how many were too stale for the step that
    # will train on them.
    scoring: tuple[list[dict], Pending] | None = None
    dropped: int = 0


def resolve_model(cfg: Config) -> str:
    """A named model (made on first use), a .gguf file (imported once), a directory or a hub id."""
    from opsd.assets.models import resolve_model_path

    return resolve_model_path(cfg.model.path)


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file = path / "metrics.jsonl"
        self.batches = path / "batches"
        self.checkpoints = path / "checkpoints"

    def truncate_metrics(self, last_step: int) -> None:
        """Forget steps after the checkpoint being resumed from: they will be redone."""
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError):
                pass  # a line torn by the interruption
        self.metrics_file.write_text("".join(ln + "\n" for ln in kept))


class Trainer:
    def __init__(self, cfg: Config):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.model_path = resolve_model(cfg)
        from opsd.assets.models import check_model_dir

        check_model_dir(self.model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=cfg.model.trust_remote_code)
        check(cfg, vocab_size=len(self.tokenizer))
        self.builder = PromptBuilder(
            self.tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=cfg.rollout.max_tokens
        )
        train_path = resolve_path(cfg.data.train_path)
        problems = load_problems(train_path, **self._columns())
        if cfg.data.max_rows:
            problems = problems[: cfg.data.max_rows]
        self.pairs, self.skipped = self.builder.build(problems, source=str(train_path))
        self.solutions = {p.uid: p.solution for p in problems}
        if not self.pairs:
            raise DataError(
                f"{train_path}: no usable problems (all {len(problems)} skipped as over-long); raise "
                "model.max_model_len or prompt.max_prompt_len"
            )
        # drop_last: a batch never spans two epochs, so no prompt appears twice in one batch (its
        # samples would share a sample_id and, for GRPO, a group).
        if len(self.pairs) < cfg.train.prompts_per_step:
            raise ConfigError(
                f"train.prompts_per_step={cfg.train.prompts_per_step} is more than the {len(self.pairs)} usable "
                f"problems in {train_path}"
            )
        self.sampler = EpochSampler(len(self.pairs), seed=cfg.train.seed, shuffle=cfg.data.shuffle, drop_last=True)
        self.eval_pairs: list[PromptPair] = []
        if cfg.eval.every:
            eval_path = resolve_path(cfg.eval.path or cfg.data.test_path)
            eval_problems = load_problems(eval_path, **self._columns())[: cfg.eval.max_problems]
            # Evaluation answers get eval.max_tokens, so its prompts get the rest of the context.
            eval_builder = PromptBuilder(
                self.tokenizer, cfg.prompt, max_model_len=cfg.model.max_model_len, max_new_tokens=cfg.eval.max_tokens
            )
            self.eval_pairs, _ = eval_builder.build(eval_problems, source=str(eval_path))
        self.step = 0
        self.policy_version = 0
        self.teacher_version = 0
        self.tokens_total = 0
        # Prompt batches to redo first after a resume: those in flight at the checkpoint, oldest first.
        self.pending_indices: list[list[int]] = []
        self.bad_steps: list[int] = []  # the latest steps in a row whose update was skipped
        self.learner_restarts = 0
        self.initial_sampler = self.sampler.state_dict()  # where a learner lost before any checkpoint restarts
        # Rollouts running for the next steps (rollout.max_staleness = s > 0: up to s batches),
        # oldest first.
        self.inflight: list[InFlight] = []

    def _columns(self) -> dict:
        d = self.cfg.data
        return dict(problem_key=d.problem_key, solution_key=d.solution_key, answer_key=d.answer_key, id_key=d.id_key)

    # --- set-up ------------------------------------------------------------------------------

    def start(self, *, local_cluster: bool = True) -> None:
        cfg = self.cfg
        check_capacity(cfg, strict=local_cluster)
        t0 = time.perf_counter()
        scorers = f"{cfg.scorer.num_workers} scorer(s), " if uses_scorer(cfg) else ""
        _say(f"starting {cfg.rollout.num_workers} rollout worker(s) (vLLM), {scorers}{cfg.learner.num_ranks} "
             f"learner rank(s) (ZeRO-{cfg.learner.zero_stage}) on {self.model_path}, {cfg.model.dtype}")
        note = dtype_note(cfg)
        if note:
            _say(f"warning: {note}")
        gpu = 1 if cfg.cluster.device == "cuda" else 0
        restarts = cfg.train.max_actor_restarts
        timeout = cfg.cluster.place_timeout_s
        self.rollouts = ActorPool(
            "rollout", RolloutWorker, cfg.rollout.num_workers,
            {"num_cpus": cfg.rollout.num_cpus_per_worker, "num_gpus": gpu * cfg.rollout.tensor_parallel_size,
             **_resources(cfg.rollout.resources)},
            (cfg, self.model_path), max_restarts=restarts, place_timeout=timeout,
        )
        self.scorers = None
        if uses_scorer(cfg):
            self.scorers = ActorPool(
                "scorer", ScorerWorker, cfg.scorer.num_workers,
                {"num_cpus": cfg.scorer.num_cpus_per_worker, "num_gpus": cfg.scorer.num_gpus_per_worker,
                 **_resources(cfg.scorer.resources)},
                (cfg, self.model_path), max_restarts=restarts, place_timeout=timeout,
            )
        self.learner = LearnerGroup(cfg, self.model_path)
        self.weights = WeightSync(cfg, self.learner)
        self.rollouts.wait_ready()
        if self.scorers:
            self.scorers.wait_ready()
        self.rollouts.on_restart = self._catch_up_rollout
        if self.scorers:
            self.scorers.on_restart = self._catch_up_scorer
        _say(f"actors ready in {time.perf_counter() - t0:.0f}s; {len(self.pairs)} training problems")
        self.log_placement()
        if cfg.cluster.device == "cpu":
            threads = self.thread_counts()
            _say("threads per actor: " + ", ".join(f"{role} {'/'.join(map(str, n))}" for role, n in threads.items())
                 + " (rollout|scorer|learner.num_threads)")

    def thread_counts(self) -> dict[str, list[int]]:
        """The torch threads of every actor, by role."""
        counts = {"rollout": torch_threads(self.rollouts.actors)}
        if self.scorers:
            counts["scorer"] = torch_threads(self.scorers.actors)
        counts["learner"] = torch_threads(self.learner.ranks)
        return counts

    def placement(self) -> dict[str, list[str]]:
        """The Ray node id of every actor, by role (learner ranks in rank order)."""
        where = {"rollout": self.rollouts.nodes(), "learner": self.learner.nodes()}
        if self.scorers:
            where["scorer"] = self.scorers.nodes()
        return where

    def log_placement(self) -> None:
        """One line saying where the roles run, when they span more than one Ray node."""
        where = self.placement()
        nodes = sorted({n for ids in where.values() for n in ids})
        if len(nodes) > 1:
            short = {n: f"node {k + 1} ({n[:8]})" for k, n in enumerate(nodes)}
            _say("placement: " + "; ".join(f"{role} on {', '.join(short[n] for n in ids)}" for role, ids in where.items()))

    def _catch_up_rollout(self, actor: Any) -> None:
        self.weights.catch_up(self.rollouts, actor)

    def _catch_up_scorer(self, actor: Any) -> None:
        import ray

        mode = self.cfg.teacher.mode
        if mode == "live":
            self.weights.catch_up(self.scorers, actor)
        elif mode == "ema" and self.teacher_version:
            # The EMA lives only in the scorers: copy it from a healthy sibling, else from a
            # checkpoint taken at the current teacher version; anything older would silently
            # score with a different teacher.
            for other in self.scorers.actors:
                if other is actor:
                    continue
                try:
                    state, version = ray.get(other.get_state.remote(), timeout=300)
                except Exception:
                    continue
                ray.get(actor.load_state.remote(state, version))
                return
            ckpt = latest_checkpoint(self.run.path)
            saved = json.loads((ckpt / "driver_state.json").read_text()) if ckpt else {}
            if saved.get("teacher_version") != self.teacher_version:
                raise RuntimeError(
                    f"the EMA teacher's scorer died and its state at teacher version {self.teacher_version} is "
                    "lost (no other scorer holds it and no checkpoint was taken at that version); resume from "
                    "the last checkpoint with --resume"
                )
            from safetensors.torch import load_file

            ray.get(actor.load_state.remote(load_file(ckpt / "teacher" / "ema.safetensors"), self.teacher_version))

    def shutdown(self) -> None:
        """Kill this trainer's actors (the Ray cluster itself is left to whoever started it)."""
        for pool in (getattr(self, "rollouts", None), getattr(self, "scorers", None)):
            if pool is not None:
                pool.kill()
        if getattr(self, "learner", None) is not None:
            self.learner.shutdown()

    # --- one step ------------------------------------------------------------------------------

    def submit_rollouts(self, pairs: list[PromptPair], step: int) -> tuple[list[PromptPair], Pending]:
        """prompts -> vLLM: each prompt goes to one worker, n samples each (returns at once)."""
        cfg = self.cfg.rollout
        shards = round_robin(pairs, len(self.rollouts.actors))
        # algo=kd, kd.source=teacher_samples: the responses are sampled from the teacher prompt.
        teacher = self.cfg.algo == "kd"
        # Each worker also grades its own samples: the answers travel with the prompts.
        args = [([p.teacher_ids if teacher else p.student_ids for p in s],
                 [sample_seed(self.cfg.train.seed, step, p.uid) for p in s], [p.answer for p in s]) for s in shards]
        return pairs, self.rollouts.submit(
            "generate", args, n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, expect_version=self.policy_version, extract=self.cfg.grading.extract,
        )

    def collect_rollouts(self, submitted: tuple[list[PromptPair], Pending]) -> list[dict]:
        """vLLM -> one row per sample, graded, in the sampler's order."""
        pairs, pending = submitted
        return self._rollout_rows(pairs, self.rollouts.collect(pending))

    def _rollout_rows(self, pairs: list[PromptPair], results: list) -> list[dict]:
        outs = unshard(results, len(pairs))
        rows = []
        for pair, samples in zip(pairs, outs):
            for j, s in enumerate(samples):
                rows.append({
                    "sample_id": f"{pair.uid}#{j}", "pair": pair, "response_ids": s.response_ids,
                    "rollout_logprobs": s.logprobs, "finish_reason": s.finish_reason,
                    "policy_version": s.policy_version, "reward": s.reward,
                })
        return rows

    def next_pairs(self) -> tuple[list[int], list[PromptPair]]:
        """The next prompts (indices and pairs): those of rollouts in flight at the last
        checkpoint first, if any."""
        indices = self.pending_indices.pop(0) if self.pending_indices else self.sampler.next_batch(
            self.cfg.train.prompts_per_step)
        return indices, [self.pairs[i] for i in indices]

    def _wait_inflight(self) -> None:
        import ray

        refs = [r for f in self.inflight for r in f.rollouts.refs.values()]
        refs += [r for f in self.inflight if f.scoring for r in f.scoring[1].refs.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs))

    def reference_rows(self, pairs: list[PromptPair]) -> list[dict]:
        """SFT and KD from references: the reference solutions play the part of the responses
        (nothing is generated). For KD the teacher reads them after its own, longer prompt."""
        eos = self.tokenizer.eos_token_id
        limit = self.cfg.model.max_model_len
        teacher = distills(self.cfg)
        rows = []
        for pair in pairs:
            # The reference is text; it is tokenised once here, and EOS closes the turn.
            ids = list(self.tokenizer(self.solutions[pair.uid], add_special_tokens=False)["input_ids"]) + [eos]
            prompt = len(pair.teacher_ids if teacher else pair.student_ids)
            if prompt + len(ids) > limit:
                if self.cfg.prompt.overlong == "skip":
                    self.skipped.append(pair.uid)
                    continue
                raise ValueError(
                    f"row {pair.uid}: {'teacher ' if teacher else ''}prompt ({prompt} tokens) + reference solution ({len(ids)}) is "
                    f"longer than model.max_model_len={limit}; raise it or set prompt.overlong=skip"
                )
            rows.append({
                "sample_id": f"{pair.uid}#0", "pair": pair, "response_ids": ids, "rollout_logprobs": [0.0] * len(ids),
                "finish_reason": "stop", "policy_version": self.policy_version, "reward": 0.0,
            })
        return rows

    def score(self, rows: list[dict]) -> pa.Table:
        """samples -> Arrow batch; with a scorer running, holding the teacher's targets.

        For GRPO the scorer is the frozen reference policy: it sees the student's own prompt, and
        its sampled-token logprobs feed the KL term.
        """
        if self.scorers is None:
            return build_batch([Sample(**vars(q)) for q in self._score_requests(rows)], k=self.cfg.scorer.topk,
                               temperature=self.cfg.loss.temperature, teacher_mode="none")
        return self.collect_score(self.submit_score(rows))

    def _score_requests(self, rows: list[dict]) -> list[ScoreRequest]:
        reference_only = not distills(self.cfg)
        reqs = [
            ScoreRequest(
                sample_id=r["sample_id"], prompt_ids=r["pair"].student_ids,
                teacher_prompt_ids=r["pair"].student_ids if reference_only else r["pair"].teacher_ids,
                response_ids=r["response_ids"], rollout_logprobs=r["rollout_logprobs"],
                loss_mask=response_loss_mask(len(r["response_ids"]), skip_first=self.cfg.loss.skip_first),
                reward=r["reward"], policy_version=r["policy_version"], finish_reason=r["finish_reason"],
            )
            for r in rows
        ]
        return reqs

    def submit_score(self, rows: list[dict]) -> tuple[list[dict], Pending]:
        """Rows -> the scorers, in interleaved shards (returns at once)."""
        reqs = self._score_requests(rows)
        ns = len(self.scorers.actors)
        return rows, self.scorers.submit("score", [(reqs[i::ns],) for i in range(ns)],
                                         expect_version=self.teacher_version)

    def collect_score(self, submitted: tuple[list[dict], Pending]) -> pa.Table:
        rows, pending = submitted
        table = concat_batches([from_ipc_bytes(p) for p in self.scorers.collect(pending)])
        # Restore the sampler's row order, which the shards interleaved.
        order = {r["sample_id"]: i for i, r in enumerate(rows)}
        ids = table.column("sample_id").to_pylist()
        return table.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), pa.int64()))

    def sync(self) -> None:
        """Learner rank 0 -> rollout workers (and the teacher when it is live or EMA)."""
        self.policy_version += 1
        pools = [self.rollouts]
        mode = self.cfg.teacher.mode
        if self.scorers and (mode == "live" or (mode == "ema" and self.policy_version % self.cfg.teacher.sync_every == 0)):
            pools.append(self.scorers)
        if self.weights.collective and self.inflight:
            # Every receiver of a collective push takes part at the same moment: let the
            # overlapped rollouts finish first rather than have the learner wait inside a
            # broadcast (and its sync.timeout_s) for them.
            self._wait_inflight()
        self.weights.push(self.policy_version, pools)
        if len(pools) > 1:
            self.teacher_version = self.policy_version

    def evaluate(self) -> dict[str, float]:
        """Greedy (or eval.temperature) answers on the held-out problems, graded by opsd.verify;
        the same code path as `opsd eval` (launch/evaluate.py)."""
        from opsd.launch.evaluate import evaluate_pairs

        cfg = self.cfg.eval
        metrics, _ = evaluate_pairs(
            self.rollouts, self.eval_pairs, n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
            seed=0, expect_version=self.policy_version, extract=self.cfg.grading.extract,
        )
        return {f"eval/{k}": v for k, v in metrics.items()}

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """All of it under .step_N.tmp, the manifest last, then one rename: a kill at any moment
        leaves either the complete checkpoint or none, and older ones untouched."""
        final = self.run.checkpoints / f"step_{self.step}"
        tmp = self.run.checkpoints / f".step_{self.step}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.learner.save_checkpoint(str(tmp / "learner"))
            if self.cfg.train.export_hf:
                self.learner.export_hf(str(tmp / "hf"))
            if self.scorers and self.cfg.teacher.mode == "ema":
                import ray
                from safetensors.torch import save_file

                (tmp / "teacher").mkdir()
                save_file(ray.get(self.scorers.actors[0].state_dict_cpu.remote()), tmp / "teacher" / "ema.safetensors")
            state = {
                "step": self.step, "policy_version": self.policy_version, "teacher_version": self.teacher_version,
                "tokens_generated_total": self.tokens_total, "sampler": self.sampler.state_dict(),
                # Rollouts already running for the next steps (rollout.max_staleness > 0): their
                # prompts were drawn from the sampler, so a resumed run must do them first.
                "pending_indices": [f.indices for f in self.inflight],
            }
            (tmp / "driver_state.json").write_text(json.dumps(state, indent=1))
            write_manifest(tmp)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if self._learner_died(exc):
                raise  # run_steps restarts the learner group
            previous = latest_checkpoint(self.run.path)
            kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
            # A full disk often surfaces as a writer's own error (torch.save: "unexpected pos"):
            # the free space says what happened.
            free = shutil.disk_usage(self.run.checkpoints).free / 2**30
            raise CheckpointError(
                f"writing checkpoint step_{self.step} under {self.run.checkpoints} failed ({free:.1f} GiB free "
                f"there): {_root_cause(exc)}; {kept}. Free space on that volume (or fix it) and resume with: "
                f"opsd train --resume {self.run.path}"
            ) from exc
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def restore(self, ckpt: Path, run: RunDir) -> None:
        self.run = run
        state = json.loads((ckpt / "driver_state.json").read_text())
        self.learner.load_checkpoint(str(ckpt / "learner"))
        self.sampler.load_state_dict(state["sampler"])
        pending = state.get("pending_indices") or []
        # A checkpoint of one batch in flight (before up to s were) holds one flat list.
        self.pending_indices = [pending] if pending and isinstance(pending[0], int) else [list(p) for p in pending]
        self.step = state["step"]
        self.tokens_total = state["tokens_generated_total"]
        self.policy_version = state["policy_version"] - 1
        self.sync()  # pushes the restored policy (and a live teacher) under its saved version
        if self.cfg.teacher.mode == "ema" and self.scorers:
            import ray
            from safetensors.torch import load_file

            teacher = load_file(ckpt / "teacher" / "ema.safetensors")
            ray.get([a.load_state.remote(teacher, state["teacher_version"]) for a in self.scorers.actors])
        self.teacher_version = state["teacher_version"]
        self.run.truncate_metrics(self.step)

    # --- the loop ------------------------------------------------------------------------------

    def run_steps(self, run: RunDir, stop: StopSignals | None = None) -> None:
        """Steps until train.steps, or until ``stop`` is requested: then the step in progress is
        finished and checkpointed, and :class:`Stopped` is raised."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run = run
        logger = MetricsLogger(run.path, cfg.logging, config=OmegaConf.to_container(cfg, resolve=True))
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="opsd train", unit="step",
                   disable=not cfg.logging.progress, dynamic_ncols=True)
        self.inflight = []
        saved_at = self.step  # a resumed run starts at its checkpoint
        try:
            if self.step == 0 and cfg.eval.every and cfg.eval.at_start and self.eval_pairs:
                # The baseline every later evaluation is read against: the initial weights.
                bar.write(f"opsd: evaluating the initial weights on {len(self.eval_pairs)} held-out problems")
                baseline = self.evaluate()
                bar.write(f"opsd: step 0: held-out accuracy {baseline[f'eval/accuracy_{cfg.grading.extract}']:.2f} "
                          f"({cfg.grading.extract})")
                logger.log({"step": 0, "policy_version": self.policy_version, **baseline})
            while self.step < cfg.train.steps:
                if stop is not None and stop.requested:
                    self._stop(stop, saved_at)
                try:
                    row = self.train_one_step(self.step + 1)
                    logger.log(row)  # metrics.jsonl, TensorBoard, W&B (launch/loggers.py)
                    self._watch_numerics(row, bar)
                    if cfg.train.checkpoint_every and (
                        self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.steps
                    ):
                        self.save_checkpoint()
                        saved_at = self.step
                except Exception as exc:
                    if not self._learner_died(exc):
                        raise
                    self._restart_learner(exc, bar)  # back to the last checkpoint, or to step 0
                    bar.reset(total=cfg.train.steps)
                    bar.update(self.step)
                    saved_at = self.step
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row['reward_mean'] or 0:.2f}",
                                tok_s=f"{row['tokens_generated'] / max(row['step_seconds'], 1e-9):.1f}")
        except ActorLost as exc:
            # The learner still holds step self.step, but the data position is mid-step: the run
            # goes back to its last complete checkpoint, like any other stop without one.
            raise ActorLost(f"step {self.step + 1}: {exc}; {resume_hint(run.path)}") from exc
        finally:
            bar.close()
            logger.close()
        summary = eval_summary(read_metrics(run.path), cfg.grading.extract)
        if summary:
            _say(summary)

    def _learner_died(self, exc: BaseException) -> bool:
        """Whether ``exc`` comes from a learner rank that died (and not from anything else)."""
        chain, seen = exc, set()
        while chain is not None and id(chain) not in seen:
            seen.add(id(chain))
            if isinstance(chain, actor_errors()):
                return self.learner.broken()
            chain = chain.__cause__ or chain.__context__
        return False

    def _restart_learner(self, exc: BaseException, bar: Any) -> None:
        """A new learner group from the last complete checkpoint (or the initial weights when none
        was written yet): the rollout workers and scorers are brought to those weights, the data
        position and the metrics log rewind with it, and the lost steps are trained again."""
        cfg = self.cfg
        died_in = self.step + 1
        cause = _root_cause(exc)
        if self.learner_restarts >= cfg.train.max_actor_restarts:
            raise LearnerLost(
                f"a learner rank died in step {died_in} ({cause}) and the learner group was already restarted "
                f"{self.learner_restarts} time(s) (train.max_actor_restarts={cfg.train.max_actor_restarts}); "
                f"{resume_hint(self.run.path)}"
            ) from exc
        self.learner_restarts += 1
        ckpt = latest_checkpoint(self.run.path)
        if ckpt is None and cfg.teacher.mode == "ema" and self.teacher_version:
            raise LearnerLost(
                f"a learner rank died in step {died_in} ({cause}) before any checkpoint, and the EMA teacher "
                "cannot be rewound to the initial weights; start the run again (with train.checkpoint_every > 0)"
            ) from exc
        bar.write(f"opsd: warning: a learner rank died in step {died_in} ({cause}); restarting the learner group "
                  f"from {ckpt or 'the initial weights'} (restart {self.learner_restarts} of "
                  f"{cfg.train.max_actor_restarts})")
        self.learner.shutdown()
        # Rollouts for the next steps, of weights about to be rewound: finished, then dropped.
        self._wait_inflight()
        self.inflight = []
        self.bad_steps = []
        import ray

        try:
            # Bounded: a lost node that no autoscaler replaces must not leave the run waiting forever.
            self.learner = LearnerGroup(cfg, self.model_path, place_timeout=cfg.cluster.place_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise LearnerLost(
                f"a learner rank died in step {died_in} ({cause}) and a new learner group could not be placed within "
                f"cluster.place_timeout_s={cfg.cluster.place_timeout_s:g} s ({cfg.learner.num_ranks} x "
                f"{cfg.learner.num_cpus_per_rank:g} CPU / {cfg.learner.num_gpus_per_rank:g} GPU"
                f"{_custom(cfg.learner.resources)}); once the cluster has them, {resume_hint(self.run.path, ckpt)}"
            ) from exc
        self.weights = WeightSync(cfg, self.learner)
        if ckpt is not None:
            self.restore(ckpt, self.run)
        else:
            # The new group holds the initial weights: version 0, pushed to whoever moved on.
            self.sampler.load_state_dict(self.initial_sampler)
            self.pending_indices = []
            self.step = self.tokens_total = 0
            self.policy_version = -1
            self.sync()
            self.teacher_version = 0
            self.run.truncate_metrics(0)
        bar.write(f"opsd: learner group restarted at step {self.step}")
        self.log_placement()

    def _watch_numerics(self, row: dict, bar: Any) -> None:
        """A skipped update is reported; train.max_bad_steps of them in a row stop the run."""
        if not row["update_skipped"]:
            self.bad_steps = []
            return
        if self.cfg.model.dtype == "float16" and not row["nonfinite_sample_ids"]:
            return  # fp16 loss scaling skips on overflow while it calibrates: normal, not a fault
        self.bad_steps.append(row["step"])
        ids = row["nonfinite_sample_ids"]
        named = f"the loss of samples {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}" if ids else "the gradient"
        bar.write(f"opsd: warning: step {row['step']}: {named} is not finite (loss {row['loss']}, grad norm "
                  f"{row['grad_norm']}); its update was skipped")
        limit = self.cfg.train.max_bad_steps
        if len(self.bad_steps) >= limit:
            raise BadSteps(
                f"steps {self.bad_steps[0]}-{self.bad_steps[-1]}: {len(self.bad_steps)} steps in a row with a "
                f"non-finite loss or gradient norm (train.max_bad_steps={limit}); none was applied, so the weights "
                f"are those of step {self.bad_steps[0] - 1}. Look at the samples named in {self.run.metrics_file} "
                f"(nonfinite_sample_ids) and at learner.lr; then {resume_hint(self.run.path)}"
            )

    def _stop(self, stop: StopSignals, saved_at: int) -> None:
        name = signal.Signals(stop.signum).name
        if self.step == 0:
            raise Stopped(f"stopped by {name} before the first step; nothing was trained", stop.signum)
        if saved_at != self.step:
            # Rollouts in flight for the next step (max_staleness > 0) are not waited for: the
            # checkpoint records their prompts as pending, and a resumed run draws them first.
            self.save_checkpoint()
        raise Stopped(
            f"stopped by {name} after step {self.step} of {self.cfg.train.steps}; checkpoint "
            f"{self.run.checkpoints / f'step_{self.step}'}; resume with: opsd train --resume {self.run.path}",
            stop.signum,
        )

    def _fresh(self, rows: list[dict], version: int) -> tuple[list[dict], int]:
        """The rows at most rollout.max_staleness versions behind ``version`` (the policy that
        trains on them), and how many were dropped."""
        fresh = [r for r in rows if version - r["policy_version"] <= self.cfg.rollout.max_staleness]
        return fresh, len(rows) - len(fresh)

    def _overlaps_scoring(self) -> bool:
        """Whether the next step's batch is scored while this step trains: only a teacher whose
        weights the push leaves alone scores it then as it would after the push."""
        cfg = self.cfg
        return (cfg.scorer.overlap and cfg.rollout.max_staleness > 0 and self.scorers is not None
                and cfg.teacher.mode == "fixed" and not trains_on_references(cfg))

    def _score_ahead(self, training: list) -> None:
        """While the learner trains (``training``: its refs), wait for the next batch's rollouts and
        start scoring them. A rollout call that failed is left to the next step's collect, which
        recovers its actor while the learner is idle (a catch-up push needs the pushed weights);
        a learner rank that failed ends the wait, and collect_train reports it."""
        import ray

        if not self.inflight or self.inflight[0].scoring is not None:
            return
        ahead = self.inflight[0]
        refs = [ahead.rollouts.refs[i] for i in range(len(ahead.rollouts.args))]
        rolling, waiting = set(refs), refs + list(training)
        while rolling & set(waiting):
            (ref,), waiting = ray.wait(waiting, num_returns=1)
            if ref not in rolling:
                try:
                    ray.get(ref)
                except Exception:
                    return
        try:
            results = ray.get(refs)
        except Exception:
            return
        # The step that trains on them runs after this step's push: one version later.
        rows, ahead.dropped = self._fresh(self._rollout_rows(ahead.pairs, results), self.policy_version + 1)
        ahead.scoring = self.submit_score(rows)

    def train_one_step(self, step: int) -> dict:
        """prompts -> rollouts -> scores -> train -> sync (-> eval); returns the metrics row."""
        cfg = self.cfg
        t_step = t0 = time.perf_counter()
        references = trains_on_references(cfg)
        scoring = None  # this step's batch being scored since the last step trained (scorer.overlap)
        if references:
            rows, dropped = self.reference_rows(self.next_pairs()[1]), 0
        else:
            ahead = self.inflight.pop(0) if self.inflight else None
            if ahead is not None and ahead.scoring is not None:
                scoring, dropped = ahead.scoring, ahead.dropped
                rows = scoring[0]
            else:
                pairs, pending = (ahead.pairs, ahead.rollouts) if ahead else self.submit_rollouts(
                    self.next_pairs()[1], step)
                rows, dropped = self._fresh(self.collect_rollouts((pairs, pending)), self.policy_version)
        rollout_s = time.perf_counter() - t0
        if cfg.rollout.max_staleness > 0 and not references:
            # Off-policy by at most max_staleness = s: up to s later steps' rollouts run on the
            # current weights while the learner trains on this step's. The batch for step
            # step + j is sampled with that step's seeds, so a resumed run draws the same samples.
            while len(self.inflight) < cfg.rollout.max_staleness and step + len(self.inflight) < cfg.train.steps:
                indices, pairs = self.next_pairs()
                self.inflight.append(InFlight(indices, *self.submit_rollouts(pairs, step + 1 + len(self.inflight))))

        t0 = time.perf_counter()
        batch = self.collect_score(scoring) if scoring else self.score(rows)
        score_s = time.perf_counter() - t0
        if cfg.logging.save_batches:
            write_ipc(batch, self.run.batches / f"step_{step:06d}.arrow")

        t0 = time.perf_counter()
        training = self.learner.submit_train(batch)
        if self._overlaps_scoring():
            self._score_ahead(training)
        stats = self.learner.collect_train(training)
        train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.sync()
        sync_s = time.perf_counter() - t0

        self.step = step
        resp_tokens = sum(len(r["response_ids"]) for r in rows)
        gen = 0 if references else resp_tokens  # SFT and KD from references generate nothing
        self.tokens_total += gen
        tokens = max(stats["tokens"], 1.0)
        n = max(len(rows), 1)
        row = {
            "step": step, "policy_version": self.policy_version, "teacher_version": self.teacher_version,
            "loss": stats["loss_sum"] / tokens,
            # Mean of log p_S - log p_T over sampled tokens: on-policy, an estimate of KL(p_S || p_T).
            "kl_sampled": -stats["kl_sampled_sum"] / tokens if "kl_sampled_sum" in stats else None,
            # GRPO: tokens whose ratio the loss clipped; mean |logp_vllm - logp_learner| (temperature
            # 1); and the tokens a ratio against vLLM's logprobs would clip (engine noise, on-policy).
            "clip_frac": stats["clipped_tokens"] / tokens if cfg.algo == "grpo" else None,
            "engine_mismatch": stats["mismatch_sum"] / tokens if "mismatch_sum" in stats else None,
            "clip_frac_rollout": stats["rollout_clipped_tokens"] / tokens if "rollout_clipped_tokens" in stats else None,
            "grad_norm": stats["grad_norm"], "lr": stats["lr"],
            # For kd.source=teacher_samples: the reward of the teacher-prompted samples.
            "reward_mean": None if references else sum(r["reward"] for r in rows) / n,
            "response_len_mean": resp_tokens / n,
            "truncated_frac": sum(r["finish_reason"] == "length" for r in rows) / n,
            "tokens_generated": gen, "tokens_generated_total": self.tokens_total,
            "samples": len(rows), "dropped_stale": dropped,
            "rollout_seconds": rollout_s, "score_seconds": score_s, "train_seconds": train_s,
            "sync_seconds": sync_s, "sample_ids": [r["sample_id"] for r in rows],
            "update_skipped": bool(stats.get("update_skipped", False)),
            "score_overlapped": scoring is not None,
            # object_store: whether the receivers copied the weights out of the learner's memory
            "sync_in_place": self.weights.in_place,
        }
        if row["update_skipped"]:
            row["nonfinite_sample_ids"] = stats.get("nonfinite_sample_ids", [])
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps) and self.eval_pairs:
            row.update(self.evaluate())
        row["step_seconds"] = time.perf_counter() - t_step
        return row


def eval_summary(rows: list[dict], extract: str) -> str | None:
    """"held-out accuracy 0.31 -> 0.38 ..." from the first and last evaluation of a run."""
    evals = [r for r in rows if f"eval/accuracy_{extract}" in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    other = next(m for m in ("strict", "lenient") if m != extract)
    return (f"held-out accuracy {first[f'eval/accuracy_{extract}']:.2f} -> {last[f'eval/accuracy_{extract}']:.2f} "
            f"at steps {first['step']} -> {last['step']} on {int(last['eval/problems'])} problems ({extract} "
            f"grading; {other}: {first[f'eval/accuracy_{other}']:.2f} -> {last[f'eval/accuracy_{other}']:.2f}; "
            f"format rate {first['eval/format_rate']:.2f} -> {last['eval/format_rate']:.2f})")


def _say(msg: str) -> None:
    print(f"opsd: {msg}", flush=True)


def check_capacity(cfg: Config, *, strict: bool) -> None:
    """Ray waits forever for an actor that does not fit; say so up front instead."""
    import ray

    gpus, cpus = resource_needs(cfg)
    have = ray.cluster_resources()
    short = [f"{need:g} {kind}s (the cluster has {have.get(kind, 0):g})"
             for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > have.get(kind, 0) + 1e-9]
    short += [f"{need:g} of the custom resource {name!r} (the cluster has {have.get(name, 0):g}; nodes offer it "
              f"with `ray start --resources`)"
              for name, need in custom_resource_needs(cfg).items() if need > have.get(name, 0) + 1e-9]
    if not short:
        return
    roles = ", ".join(f"{n} {role} x {c:g} CPU / {g:g} GPU{_custom(getattr(cfg, role).resources)}"
                      for role, n, c, g, _ in actor_resources(cfg))
    msg = (f"the run's actors need {' and '.join(short)}: {roles}. Lower the per-actor resources "
           "(rollout.num_cpus_per_worker, scorer.num_cpus_per_worker, learner.num_cpus_per_rank, the roles' "
           ".resources, ...) or give "
           "the cluster more (cluster.num_cpus for a local one)")
    if strict:
        raise ConfigError(msg)
    print(f"opsd: warning: {msg}; waiting for the cluster to provide them")


def _resources(resources: dict) -> dict:
    """Ray actor options for a role's custom resources (none: no option at all)."""
    return {"resources": dict(resources)} if resources else {}


def _custom(resources: dict) -> str:
    return "".join(f" / {p}" for p in custom_parts(resources))


def prepare_config(config_path: str | None, overrides: list[str]) -> tuple[Config, Path]:
    """Resolve the config and run directory; a resumed run reuses its saved config."""
    cfg = load_config(config_path, overrides)
    if cfg.train.resume:
        run_path = Path(cfg.train.resume)
        saved = run_path / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"train.resume={run_path}: no config.yaml there; is it a run directory?")
        # The saved config wins, except for what this command line overrides.
        cfg = load_config(saved, [o for o in overrides if not o.startswith("train.resume=")])
        cfg.train.resume = str(run_path)
    elif cfg.run_dir:
        run_path = Path(cfg.run_dir)
    else:
        run_path = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    # Absolute: learner ranks write checkpoint shards here from their own working directories
    # (under `ray job submit` that is a temporary copy of the code).
    run_path = run_path.resolve()
    cfg.run_dir = str(run_path)
    return cfg, run_path


def train(config_path: str | None, overrides: list[str]) -> Path:
    import ray

    cfg, run_path = prepare_config(config_path, overrides)
    # The config, the model and every data row are checked (Trainer) before the run directory
    # exists; a new run that fails before its first step leaves none behind.
    trainer = Trainer(cfg)
    if trainer.skipped:
        print(f"opsd: skipped {len(trainer.skipped)} over-long prompts (prompt.overlong=skip)")
    ckpt = None
    if cfg.train.resume:
        ckpt = latest_checkpoint(run_path)
        if ckpt is None:
            raise ConfigError(f"train.resume={run_path}: no complete checkpoint under {run_path / 'checkpoints'}")
    fresh = not run_path.exists()
    run = RunDir(run_path)
    for unfinished in run.checkpoints.glob(".step_*.tmp"):
        shutil.rmtree(unfinished, ignore_errors=True)  # a checkpoint write that was killed
    (run.path / "config.yaml").write_text(to_yaml(cfg))
    started = init_ray(cfg)
    stop = StopSignals().install()  # after ray.init, which sets a SIGTERM handler of its own
    try:
        trainer.start(local_cluster=started)
        if ckpt is not None:
            trainer.restore(ckpt, run)
            print(f"opsd: resumed from {ckpt} (step {trainer.step})")
        trainer.run_steps(run, stop)
    except BaseException as exc:
        if fresh and trainer.step == 0:
            shutil.rmtree(run.path, ignore_errors=True)
        elif isinstance(exc, KeyboardInterrupt):
            print(f"opsd: stopped at once in step {trainer.step + 1}; {resume_hint(run.path)}", file=sys.stderr,
                  flush=True)
        raise
    finally:
        stop.restore()
        trainer.shutdown()
        if started:
            ray.shutdown()
    return run.path


def resume_hint(run_path: Path, ckpt: Path | None = None) -> str:
    """What a user does after a run ended: resume from ``ckpt`` (default: the newest sound
    checkpoint), or start again when there is none."""
    ckpt = ckpt or latest_checkpoint(run_path)
    if ckpt is None:
        return "no checkpoint was written, so start the run again"
    return f"resume from {ckpt} with: opsd train --resume {run_path}"


def _root_cause(exc: BaseException) -> str:
    """The error under Ray's wrapping (a RayTaskError names the remote one as its cause)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and cause is not exc:
        exc, cause = cause, getattr(cause, "cause", None) or cause.__cause__
    return f"{type(exc).__name__}: {exc}".split("\n")[0]
