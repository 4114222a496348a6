"""RolloutWorker: a Ray actor that owns a vLLM engine and samples student responses; the same
engine scores teacher contexts by prefill (docs/DESIGN.md, "The teacher on the inference engine")."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from opsd.config import Config, actor_threads, serves_adapter
from opsd.lora import adapter_shapes, vllm_max_rank, write_adapter
from opsd.objectives import PRIMARY, scored_contexts
from opsd.scoring import RowTargets
from opsd.workers.incarnation import Incarnation
from opsd.workers.scorer import scored_batch
from opsd.workers.transports import Receivers, transport
from opsd.workers.transports.base import (
    BucketLayout, GroupSpec, NamedTensors, WeightSyncError, WeightUpdate, check_against, check_layout,
    require_version,
)

if TYPE_CHECKING:
    from opsd.batch import Sample


@dataclass
class Rollout:
    """One sampled response. ``logprobs`` are the behaviour policy's (temperature 1, raw);
    ``reward`` is the verifier's 0/1 grade against the problem's answer, None when no answer was
    given."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    policy_version: int
    reward: float | None = None


class RolloutWorker:
    """A vLLM engine that samples the student's responses, and, with scorer.on_rollout_engines
    (a live teacher), scores the teacher contexts by prefill (``score``)."""

    role = "rollout"

    def __init__(self, cfg: Config, model_path: str, worker_index: int = 0):
        self._incarnation = Incarnation.draw()
        # Keep the engine core in this actor's process, on CPU and GPU alike: start-up is faster,
        # and collective_rpc hands its arguments to the model's workers as Python objects.
        # Across an engine-core process boundary they would travel as msgpack, which turns
        # tensors into raw buffers and dataclasses into dicts. (Tensor-parallel workers are
        # still processes of their own; vLLM pickles what it sends them.)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cfg.cluster.device == "cpu":
            import torch

            # The engine runs in this process: its threads are this process's torch threads
            # (vLLM's CPU worker then pins the count).
            own = getattr(cfg, self.role)
            torch.set_num_threads(actor_threads(own.num_threads, own.num_cpus_per_worker))
        from vllm import LLM

        # An engine that scores serves top-k prompt log-probs: vLLM caps them at max_logprobs (20).
        scores = self.role == "scorer" or cfg.scorer.on_rollout_engines
        tp = cfg.rollout.tensor_parallel_size if self.role == "rollout" else 1
        # model.lora.serve=adapter: pushes hold the adapter alone, served over the base weights,
        # which this engine keeps (opsd/lora.py); a scorer engine of a fixed teacher gets no pushes
        lc = cfg.model.lora
        self.serves_adapter = serves_adapter(cfg) and (self.role == "rollout" or cfg.teacher.mode != "fixed")
        # Only the adapted modules get vLLM's LoRA layers: a LoRA-wrapped LM head breaks prompt
        # log-probs of a batch (vLLM's logits LoRA maps one adapter per request, not per token:
        # vllm-project/vllm#29955, #51594), and opsd never adapts the head (config.py).
        lora = dict(enable_lora=True, max_lora_rank=vllm_max_rank(lc.r), max_loras=1,
                    lora_target_modules=list(lc.target_modules)) if self.serves_adapter else {}
        t0 = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=cfg.model.dtype,
            max_model_len=cfg.model.max_model_len,
            enforce_eager=cfg.rollout.enforce_eager,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=cfg.rollout.kv_cache_mb * 2**20 if cfg.rollout.kv_cache_mb else None,
            tensor_parallel_size=tp,
            distributed_executor_backend="uni" if tp == 1 else "mp",
            seed=cfg.rollout.seed + worker_index,
            trust_remote_code=cfg.model.trust_remote_code,
            worker_extension_cls="opsd.workers.rollout.VllmWeightLoader",
            max_logprobs=max(20, cfg.scorer.topk) if scores else 20,
            **lora,
        )
        self.start_seconds = time.perf_counter() - t0
        self.cfg = cfg
        self.version = 0
        self.tp = tp
        # Store-and-forward pushes are read here and handed to the engine; collective ones are
        # received inside vLLM's workers (VllmWeightLoader), one member per tensor-parallel rank.
        self.receivers = Receivers("cpu", cfg.sync.timeout_s)
        self.model_path = model_path
        if self.serves_adapter:
            self.expected_shapes = adapter_shapes(model_path, lc, trust_remote_code=cfg.model.trust_remote_code)
        else:
            self.expected_shapes = hf_param_shapes(model_path, trust_remote_code=cfg.model.trust_remote_code)
        # The adapter of the weights version this engine holds (None: the base, version 0), and the
        # folder it was loaded from; a new vLLM adapter id for every load.
        self.adapter: Any = None
        self.adapter_root = tempfile.mkdtemp(prefix="opsd-adapter-") if self.serves_adapter else None
        if self.adapter_root:  # at exit too; an actor killed outright leaves its current adapter behind
            weakref.finalize(self, shutil.rmtree, self.adapter_root, True)
        self.adapters_loaded = 0
        # Per named teacher context: "topk" or "token" (opsd.objectives.scored_contexts).
        self.contexts = scored_contexts(cfg) if scores else {}

    def ready(self) -> dict:
        return {"version": self.version, "start_seconds": self.start_seconds, "incarnation": self._incarnation.token}

    def get_version(self) -> int:
        return self.version

    def node_id(self) -> str:
        """The Ray node this actor runs on (the driver logs where each role landed)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def incarnation(self) -> Incarnation:
        """Tells a restarted actor from the one it replaced (its pid cannot: workers/incarnation.py)."""
        return self._incarnation

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        answers: list[str] | None = None,
        verifiers: list[str | None] | None = None,
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = -1,
        expect_version: int | None = None,
        extract: str = "strict",
    ) -> list[list[Rollout]]:
        """``n`` samples for each prompt; one seed per prompt makes the samples reproducible.

        With ``expect_version``, refuses to sample from other weights (a restarted actor has the
        initial ones until the driver brings it up to date). With ``answers`` (one per prompt),
        every sample is graded here (``opsd.evaluation.reward`` with ``extract``), off the
        driver's critical path: the workers grade in parallel, while the next request waits.
        """
        require_version(self.version, expect_version, "rollout worker")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                logprobs=0, seed=seed,
            )
            for seed in seeds
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False,
            lora_request=self.adapter,
        )
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        from opsd.evaluation import CODE, rewards

        texts, golds, kinds = [], [], []  # every sample, flat, with its prompt's answer and verifier
        ordered = [sorted(out.outputs, key=lambda c: c.index) for out in outs]
        for i, outputs in enumerate(ordered):
            for c in outputs:
                texts.append(c.text)
                golds.append(answers[i] if answers is not None else None)
                kinds.append(verifiers[i] if verifiers is not None else None)
        # Code rows run in the sandbox (opsd/sandbox.py), sandbox.workers programs at a time;
        # nothing a response holds runs in this process.
        box = None
        if any(k == CODE and g is not None for k, g in zip(kinds, golds)):
            from opsd.sandbox import shared

            box = shared(self.cfg.sandbox)
        grades = rewards(texts, golds, extract, kinds, box)
        result, flat = [], iter(grades)
        for outputs in ordered:
            samples = []
            for c in outputs:
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
                samples.append(Rollout(ids, lps, c.finish_reason or "abort", c.text, self.version, next(flat)))
            result.append(samples)
        return result

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of tokens 1.. of each sequence under the current weights (for checks)."""
        found = engine_teacher_targets(self.llm, [s[:1] for s in sequences], [s[1:] for s in sequences],
                                       k=0, topk=False, adapter=self.adapter)
        return [t.token_logprobs.astype(float).tolist() for t in found]

    # --- the teacher by prefill (scorer.backend=vllm, scorer.on_rollout_engines) -------------

    def teacher_targets(
        self, contexts: list[list[int]], responses: list[list[int]], targets: str | None = None
    ) -> list[RowTargets]:
        """As ScorerWorker.teacher_targets, read from this engine's prompt log-probs."""
        return engine_teacher_targets(self.llm, contexts, responses, k=self.cfg.scorer.topk,
                                      topk=(targets or self.contexts.get(PRIMARY, "token")) == "topk",
                                      adapter=self.adapter if self.teacher_follows_pushes else None)

    @property
    def teacher_follows_pushes(self) -> bool:
        """Whether the teacher this engine scores is the weights pushed to it; otherwise (a fixed
        teacher on engines that serve the student as an adapter) it is the base weights, version 0."""
        return self.cfg.teacher.mode != "fixed" or not self.serves_adapter

    def score(self, samples: list[Sample], expect_version: int | None = None) -> bytes:
        """Samples -> the same samples with the teacher's targets, as an Arrow batch (IPC bytes)."""
        teacher_version = self.version if self.teacher_follows_pushes else 0
        require_version(teacher_version, expect_version, f"{self.role} engine's teacher")
        return scored_batch(samples, self.teacher_targets, self.contexts, k=self.cfg.scorer.topk,
                            temperature=self.cfg.loss.temperature, mode=self.cfg.teacher.mode,
                            version=teacher_version, teacher_model=self.model_path)

    # --- weights in -------------------------------------------------------------------------

    def weight_group_size(self) -> int:
        """Members this actor adds to a collective weight group: one per vLLM worker process."""
        return self.tp

    def check_weight_layout(self, layout: list[BucketLayout]) -> None:
        check_layout(layout, self.expected_shapes)

    def join_weight_group(self, spec: GroupSpec) -> None:
        """Every vLLM worker joins, at ranks spec.rank .. spec.rank + tp - 1."""
        self.llm.collective_rpc("opsd_join_group", args=(spec,))

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("opsd_leave_group")

    def load_weights(self, update: WeightUpdate) -> int:
        """Stage the whole update, check it, then load it in place; on failure keep the old version."""
        if transport(update.transport).collective:
            # A push that is retried reaches every member again; one already at that version
            # takes part in the broadcast but does not load it twice.
            load = update.version != self.version
            try:
                self.llm.collective_rpc("opsd_receive_weights", args=(update, load))
            except WeightSyncError:
                raise
            except Exception as exc:  # whatever vLLM's workers raised, as the push's failure
                raise WeightSyncError(f"vLLM could not take weight version {update.version}: {exc}") from exc
        else:
            with self.receivers.receiving(update) as named:
                check_against(named, self.expected_shapes)
                if self.serves_adapter:
                    self._load_adapter(named, update.version)
                else:
                    try:
                        self.llm.collective_rpc("opsd_load_weights", args=(named,))
                    except Exception as exc:  # whatever vLLM raised, as the push's failure
                        raise WeightSyncError(f"vLLM could not load weight version {update.version}: {exc}") from exc
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.version = update.version
        return self.version

    def _load_adapter(self, named: NamedTensors, version: int) -> None:
        """A pushed adapter -> a vLLM LoRA adapter, under a new id; the previous one is removed once
        the new one has loaded (vLLM loads before it evicts, so a failure keeps the old one)."""
        from vllm.lora.request import LoRARequest

        self.adapters_loaded += 1
        folder = os.path.join(self.adapter_root, f"v{version}-{self.adapters_loaded}")
        try:
            write_adapter(folder, named, self.cfg.model.lora, self.model_path)
            # vLLM tells adapters apart by name: a retried push of one version gets a name of its own
            new = LoRARequest(f"opsd-policy-v{version}-{self.adapters_loaded}", self.adapters_loaded, folder)
            self.llm.llm_engine.add_lora(new)
        except Exception as exc:  # a full disk, a module vLLM cannot adapt: the push's failure
            shutil.rmtree(folder, ignore_errors=True)
            raise WeightSyncError(f"vLLM could not load the LoRA adapter of weight version {version}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        old, self.adapter = self.adapter, new
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)



class EngineScorerWorker(RolloutWorker):
    """scorer.backend=vllm: the teacher on a vLLM engine of its own (a fixed or live teacher), with
    the scorer's resources and the rollout engines' settings; it never samples."""

    role = "scorer"

    def __init__(self, cfg: Config, model_path: str):
        super().__init__(cfg, model_path, worker_index=0)

    def generate(self, *args, **kwargs):
        raise RuntimeError("a scorer engine scores; it does not sample (RolloutWorker.generate)")


def engine_teacher_targets(llm: Any, contexts: list[list[int]], responses: list[list[int]], *, k: int,
                           topk: bool, adapter: Any = None) -> list[RowTargets]:
    """The teacher's targets from vLLM's prompt log-probs of ``context + response`` (with the LoRA
    request ``adapter`` over the engine's weights, when given).

    Entry p of the prompt log-probs is the distribution of token p given tokens < p (raw logits,
    temperature 1: config.py refuses another loss.temperature), holding the top ``k`` and the
    prompt's own token; the response's tokens are entries len(context) .. len(context) + T - 1.
    The top-k is ordered by log-probability, as torch.topk orders it.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if not contexts:  # e.g. no row of the batch has a second teacher context
        return []
    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k if topk else 0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(c) + list(r)) for c, r in zip(contexts, responses)],
                        params, use_tqdm=False, lora_request=adapter)
    result: list[RowTargets] = []
    for c, r, out in zip(contexts, responses, outs):
        steps = out.prompt_logprobs[len(c): len(c) + len(r)]
        tok = np.array([step[t].logprob for step, t in zip(steps, r)], dtype=np.float32)
        if not topk:
            # No stop mass: the prompt log-probs hold only the top-k (its column stays null).
            result.append(RowTargets(None, None, tok))
            continue
        ids = np.empty((len(r), k), dtype=np.int32)
        lps = np.empty((len(r), k), dtype=np.float32)
        for j, step in enumerate(steps):
            # k entries, plus the response's token when it is not among them
            best = sorted(step.items(), key=lambda item: -item[1].logprob)[:k]
            ids[j] = [t for t, _ in best]
            lps[j] = [lp.logprob for _, lp in best]
        result.append(RowTargets(ids, lps, tok))
    return result


def hf_param_shapes(model_path: str, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the HF model at ``model_path``, built on the meta device.

    vLLM fuses some projections (qkv, gate_up), so a vLLM receiver checks updates against the
    checkpoint layout the learner sends rather than against its own parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


class VllmWeightLoader:
    """vLLM worker extension (``worker_extension_cls``): loads pushed weights in place.

    Method names carry an ``opsd_`` prefix because vLLM workers already define
    ``update_weights`` and friends.
    """

    def opsd_join_group(self, spec: GroupSpec | dict) -> None:
        """Join a collective weight group; each process of a tensor-parallel engine is a member."""
        from opsd.workers.transports.broadcast import spec_from

        spec = spec_from(spec)
        if getattr(self, "opsd_receivers", None) is None:
            self.opsd_receivers = Receivers(self.device, spec.timeout_s)
        self.opsd_receivers.join(spec, spec.rank + self.rank)

    def opsd_leave_group(self) -> None:
        if getattr(self, "opsd_receivers", None) is not None:
            self.opsd_receivers.close()

    def opsd_receive_weights(self, update: WeightUpdate | dict, load: bool) -> int:
        """Take part in a collective push; load it unless this engine holds that version already
        (a retried push reaches every member of the group again)."""
        from opsd.workers.transports.broadcast import update_from

        update = update_from(update)
        if getattr(self, "opsd_receivers", None) is None:
            raise WeightSyncError(f"weight version {update.version}: this engine is in no weight group")
        with self.opsd_receivers.receiving(update) as named:
            return self.opsd_load_weights(named) if load else 0

    def opsd_load_weights(self, named: NamedTensors) -> int:
        self.reload_weights(weights_iterator=iter(named))
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
            # With tied embeddings vLLM reloads the weight through the embedding only; kernels
            # derived from it for the head (the CPU backend's packed GEMM copy) keep the old
            # values unless the head is processed again.
            head.quant_method.process_weights_after_loading(head)
        return len(named)
