"""ScorerWorker: teacher-context forward passes that turn rollouts into an Arrow batch.

The teacher sees teacher_prompt_ids + response_ids, and, for an objective that reads several
teacher contexts (a contrastive teacher's wrong ones), each other context's prompt + the same
response. Which contexts and which targets (top-k, or the sampled token's log-probability alone)
come from the objective's and the context's declarations (opsd.objectives.scored_contexts). The
forward itself is opsd.scoring.teacher_targets (torch only, shared with the GPU script).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch

from opsd.config import Config, actor_threads
from opsd.diagnostics import stop_token_ids
from opsd.dtypes import torch_dtype
from opsd.losses import fp32_lm_head
from opsd.objectives import PRIMARY, scored_contexts
from opsd.scoring import RowTargets, teacher_targets
from opsd.workers.incarnation import Incarnation
from opsd.workers.transports import Receivers
from opsd.workers.transports.base import (
    BucketLayout, GroupSpec, WeightUpdate, check_against, check_layout, require_version,
)

if TYPE_CHECKING:  # the teacher's forward needs no Arrow: the GPU checks (tests/gpu) run it without pyarrow
    from opsd.batch import Sample


def scored_batch(samples: list[Sample], targets_of: Callable[..., list[RowTargets]], contexts: dict[str, str], *,
                 k: int, temperature: float, mode: str, version: int, teacher_model: str | None = None) -> bytes:
    """Samples -> the same samples with the teacher's targets, as a validated Arrow batch (IPC
    stream bytes). ``targets_of(contexts, responses, kind)`` is a teacher's forward (this module's
    scorer, or a vLLM engine's prefill); ``contexts`` maps each named teacher context the objective
    reads to "topk" or "token"; ``teacher_model``, the model the teacher's weights were loaded from,
    is recorded in the batch's metadata (``opsd.teacher_model``) to say which teacher scored."""
    from opsd.batch import ContextScores, build_batch, to_ipc_bytes

    primary = contexts.get(PRIMARY, "token")
    responses = [s.response_ids for s in samples]
    targets = targets_of([s.teacher_prompt_ids for s in samples], responses, primary)
    scored = [dataclasses.replace(s, teacher_topk_ids=t.topk_ids, teacher_topk_logprobs=t.topk_logprobs,
                                  teacher_token_logprobs=t.token_logprobs, teacher_stop_logprobs=t.stop_logprobs,
                                  teacher_version=version, others={})
              for s, t in zip(samples, targets)]
    others = {name: kind for name, kind in contexts.items() if name != PRIMARY}
    for name, kind in others.items():
        prompts = {i: s.others[name].prompt_ids for i, s in enumerate(samples)
                   if name in s.others and s.others[name].prompt_ids is not None}
        found = targets_of(list(prompts.values()), [responses[i] for i in prompts], kind)
        for i, t in zip(prompts, found):
            scored[i].others[name] = ContextScores(prompts[i], t.token_logprobs, t.topk_ids, t.topk_logprobs)
    table = build_batch(scored, k=k, temperature=temperature, teacher_mode=mode, targets=primary, contexts=others)
    if teacher_model is not None:
        table = table.replace_schema_metadata({**table.schema.metadata, b"opsd.teacher_model": teacher_model.encode()})
    return to_ipc_bytes(table)


class ScorerWorker:
    def __init__(self, cfg: Config, model_path: str):
        from transformers import AutoModelForCausalLM

        self._incarnation = Incarnation.draw()
        torch.manual_seed(cfg.train.seed)
        if cfg.cluster.device == "cpu":
            torch.set_num_threads(actor_threads(cfg.scorer.num_threads, cfg.scorer.num_cpus_per_worker))
        self.device = torch.device("cuda" if cfg.cluster.device == "cuda" else "cpu")
        # model_path: the student's, or another model's (teacher.model), which no push reaches
        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
        ).to(self.device)
        self.model.eval()
        if cfg.model.fp32_lm_head:
            fp32_lm_head(self.model.get_output_embeddings())
        self.cfg = cfg
        self.k = cfg.scorer.topk
        # Per named context: whether the loss reads the teacher's top-k, or only the sampled
        # token's logprob (which skips the top-k and its columns).
        self.contexts = scored_contexts(cfg)
        self.targets = self.contexts.get(PRIMARY, "token")
        self.temperature = cfg.loss.temperature
        self.mode = cfg.teacher.mode
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # The primary teacher's mass on them is one more column of every batch (a collapse diagnostic).
        self.stop_ids = stop_token_ids(self.model)
        if self.k > self.vocab_size:
            raise ValueError(f"scorer.topk={self.k} is larger than the vocabulary ({self.vocab_size})")
        self.version = 0
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.receivers = Receivers(self.device, cfg.sync.timeout_s)
        self.shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        # The EMA is kept in fp32: in bf16 a (1 - decay) step is below the rounding of most weights.
        self.ema = (
            {n: p.detach().float().clone() for n, p in self.model.named_parameters()} if self.mode == "ema" else None
        )

    def get_version(self) -> int:
        return self.version

    def teacher_targets(
        self, contexts: list[list[int]], responses: list[list[int]], targets: str | None = None
    ) -> list[RowTargets]:
        """For each row: top-k ids [T, k], top-k logprobs [T, k], sampled-token logprob [T], the log
        of the mass on the stop ids [T]; the first two are None when the loss does not read them
        (``targets`` "token"; default: the primary context's)."""
        return teacher_targets(
            self.model, contexts, responses, k=self.k, temperature=self.temperature,
            chunk_size=self.cfg.loss.chunk_size, max_tokens=self.cfg.scorer.max_tokens_per_forward,
            pad_id=self.pad_id, topk=(targets or self.targets) == "topk", stop_ids=self.stop_ids,
        )

    def score(self, samples: list[Sample], expect_version: int | None = None) -> bytes:
        """Samples -> the same samples with the teacher's targets, as a validated Arrow batch (IPC
        stream bytes)."""
        require_version(self.version, expect_version, "scorer")
        return scored_batch(samples, self.teacher_targets, self.contexts, k=self.k, temperature=self.temperature,
                            mode=self.mode, version=self.version, teacher_model=self.model_path)

    @torch.no_grad()
    def load_weights(self, update: WeightUpdate) -> int:
        """live: take the pushed weights; ema: teacher <- decay * teacher + (1 - decay) * pushed.

        A fixed teacher never loads weights. The update is staged and checked whole before any
        parameter changes.
        """
        if self.mode == "fixed":
            raise RuntimeError("a fixed teacher is never synced")
        with self.receivers.receiving(update) as named:
            if update.version == self.version:
                # A retried collective push reaches every member again; an EMA must not blend twice.
                return self.version
            self._load(named)
        self.version = update.version
        return self.version

    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        check_against(named, self.shapes)
        params = dict(self.model.named_parameters())
        decay = self.cfg.teacher.ema_decay
        if self.mode == "ema":
            # Blend into new fp32 tensors first, so that a failure leaves the teacher untouched.
            blended = {n: self.ema[n].mul(decay).add_(t.to(self.ema[n].device, torch.float32), alpha=1.0 - decay)
                       for n, t in named}
            self.ema.update(blended)
            named = list(blended.items())
        for name, t in named:
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))

    def weight_group_size(self) -> int:
        return 1

    def check_weight_layout(self, layout: list[BucketLayout]) -> None:
        check_layout(layout, self.shapes)

    def join_weight_group(self, spec: GroupSpec) -> None:
        self.receivers.join(spec, spec.rank)

    def leave_weight_group(self) -> None:
        self.receivers.close()

    def node_id(self) -> str:
        """The Ray node this actor runs on (the driver logs where each role landed)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def incarnation(self) -> Incarnation:
        """Tells a restarted actor from the one it replaced (its pid cannot: workers/incarnation.py)."""
        return self._incarnation

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """The teacher's weights (the fp32 EMA for an EMA teacher): for checks and for resuming."""
        if self.ema is not None:
            return {k: v.detach().cpu().clone() for k, v in self.ema.items()}
        return {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()}

    def get_state(self) -> tuple[dict[str, torch.Tensor], int]:
        return self.state_dict_cpu(), self.version

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        params = dict(self.model.named_parameters())
        check_against(list(state.items()), self.shapes)
        for name, t in state.items():
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
        if self.ema is not None:
            self.ema = {n: t.to(self.device, torch.float32).clone() for n, t in state.items()}
        self.version = version
