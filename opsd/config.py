"""Typed configuration: dataclasses are the single source of defaults.

YAML files override the defaults, ``key=value`` arguments override the files. OmegaConf's
structured mode rejects unknown keys and wrong types; :func:`load_config` turns those into a
:class:`ConfigError` that names the key, and :func:`check` rejects combinations that type-check
but cannot run.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opsd.dtypes import DTYPES, auto_dtype, cpu_bf16_instructions
from opsd.errors import ConfigError
from opsd.paths import REPO_ROOT



__all__ = ["Config", "ConfigError", "check", "load_config"]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # What the rollout engines serve. merged: every push carries the whole model with the adapters
    # merged in. adapter: a push carries the adapter alone, which the engines serve as a vLLM LoRA
    # adapter over the base weights they keep; with scorer.on_rollout_engines a fixed teacher (the
    # base) is then scored on the same engines (opsd/lora.py).
    serve: str = "merged"


@dataclass
class ModelConfig:
    # "tiny" builds (once) and uses the locally made Qwen3-architecture model under artifacts/.
    path: str = "tiny"
    # float32 | bfloat16 | float16 | auto. auto: bfloat16 on CUDA and on CPUs with bf16 matmul
    # instructions (AMX or AVX512-BF16), float32 on other CPUs, where torch's bf16 matmuls are
    # ~60x slower than float32. Resolved once, when the config is loaded.
    dtype: str = "float32"
    # In bf16 / fp16, the LM head's matmul runs in float32 in the scorer and the learner (the
    # logits the targets and the loss are made of); opsd.losses.fp32_lm_head.
    fp32_lm_head: bool = True
    # How the learner computes the LM head and the loss (opsd.losses.resolve_head_path): "fused"
    # (one autograd function, bf16 tensor-core matmuls with fp32 output on CUDA), "module" (the head
    # module per chunk under checkpointing: the path before issue 40), "auto" (fused on CUDA,
    # module on CPU). The fused path's logits are fp32 whatever model.fp32_lm_head says (a bf16
    # matmul with fp32 output costs what a bf16 one does).
    lm_head_path: str = "auto"
    trust_remote_code: bool = False
    max_model_len: int = 512
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train_path: str = "data/toy/train.jsonl"
    test_path: str = "data/toy/test.jsonl"
    problem_key: str = "problem"
    solution_key: str = "solution"
    answer_key: str = "answer"
    id_key: Optional[str] = "id"
    shuffle: bool = True
    max_rows: Optional[int] = None  # keep the first N rows (debugging)
    # A hub dataset's config (e.g. main for openai/gsm8k); its split goes after the path, PATH::SPLIT.
    dataset_config: Optional[str] = None
    # How a solution writes its answer: auto | boxed (the last \boxed{}) | gsm8k (a last line
    # "#### N"; the "<<...>>" calculator annotations are stripped from what the teacher reads).
    answer_format: str = "auto"


@dataclass
class PromptConfig:
    # Appended to the problem in the student's user turn.
    student_instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    # Appended instead for a code row (task "code"), which is graded by running its tests.
    code_instruction: str = "Write your solution as one fenced Python code block (```python ... ```)."
    # The teacher's user turn; {problem} and {solution} are filled in. The reference solution
    # comes first, then the model is asked to solve the problem again in its own words.
    teacher_template: str = (
        "{problem}\n\nHere is a reference solution:\n{solution}\n\n"
        "After reading the reference solution above, solve the problem again yourself. "
        "{instruction}"
    )
    # When set, the teacher's user turn is the student's own, word for word, and the reference
    # solution goes into a system message made from this template ({problem}, {solution} filled
    # in); teacher_template is then unused. The teacher then differs from the student only in
    # what it knows, not in what it was asked (docs/TASK.md measures why that matters).
    teacher_system: Optional[str] = None
    student_thinking: bool = False
    teacher_thinking: bool = False
    max_prompt_len: int = 256
    overlong: str = "error"  # error | skip


@dataclass
class GradingConfig:
    # How a response's final answer is read, for rewards and held-out accuracy (opsd/verify.py):
    # strict = the last \boxed{}; lenient = that, else the last number in the response; auto = the
    # named dataset's own (GSM8K lenient, MATH strict; opsd/assets/datasets.py), else strict.
    # Evaluation reports both; this one is the headline and the reward.
    extract: str = "auto"


@dataclass
class SandboxConfig:
    # Where model-written code runs when a task is graded by its tests (opsd/sandbox.py; docs/DESIGN.md,
    # "The sandbox"). isolation: the least a run accepts, bwrap (bubblewrap: namespaces, nothing of
    # the run visible) or none (a child process under rlimits, no boundary); a machine that gives
    # less is refused, naming this key.
    isolation: str = "bwrap"
    workers: int = 2  # programs graded at once, in each process that grades
    cpu_s: float = 4.0  # CPU seconds per process: the timeout verdict, the same under any load
    wall_s: float = 20.0  # wall-clock backstop (a program that sleeps)
    memory_mb: int = 512  # address space per process
    processes: int = 32  # processes and threads of one program
    open_files: int = 64
    file_mb: int = 16  # the largest file it may write, and the size of its tmpfs
    output_kb: int = 64  # stdout + stderr read; more and it is killed
    python: str = "/usr/bin/python3"  # the fixed interpreter programs see (standard library only)
    bwrap: str = "bwrap"
    uid: int = 65534  # programs run as this uid when opsd runs as root (root ignores RLIMIT_NPROC)


@dataclass
class RolloutConfig:
    num_workers: int = 1
    tensor_parallel_size: int = 1
    num_cpus_per_worker: float = 1.0
    # torch/OpenMP threads of each worker on CPU; null: the CPUs Ray gives it (at least 1). In
    # serial mode the stages never overlap, so each may use every core (configs/local.yaml).
    num_threads: Optional[int] = None
    # Custom Ray resources each worker asks for, e.g. {opsd_rollout: 1} to keep it on the nodes
    # started with `ray start --resources='{"opsd_rollout": 8}'` (README, "More than one node").
    resources: Dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 96
    n: int = 1  # samples per prompt
    gpu_memory_utilization: float = 0.3
    # KV-cache size in MiB; when set it replaces gpu_memory_utilization (on CPU, that fraction is
    # of host memory and counts the whole process, which makes small settings fail).
    kv_cache_mb: Optional[int] = None
    enforce_eager: bool = True
    max_staleness: int = 0  # 0 = strictly on-policy
    seed: int = 0


@dataclass
class ScorerConfig:
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_threads: Optional[int] = None  # as rollout.num_threads
    # Custom Ray resources each worker asks for, e.g. {opsd_scorer: 1} to keep it on the nodes
    # started with `ray start --resources='{"opsd_scorer": 8}'` (README, "More than one node").
    resources: Dict[str, float] = field(default_factory=dict)
    num_gpus_per_worker: float = 0.0
    topk: int = 64
    # Padded micro-batches are capped by this many tokens (rows x longest row).
    max_tokens_per_forward: int = 8192
    # With rollout.max_staleness >= 1 and teacher.mode=fixed, the next step's rollouts are scored
    # while the learner trains on this step's (the same batches, only earlier); false scores each
    # batch in its own step, after the previous step's weight push.
    overlap: bool = True
    # What computes the teacher's targets (docs/DESIGN.md, "The teacher on the inference engine"):
    # "transformers", a forward of the Hugging Face model (the fp32 LM head included); "vllm", the
    # prefill-only prompt log-probs of a vLLM engine (its top-k and the sampled token's), with the
    # rollout.* engine settings (kv_cache_mb, gpu_memory_utilization, enforce_eager).
    backend: str = "transformers"
    # A live teacher is the policy the rollout engines already hold: they score the teacher
    # contexts themselves (by prompt log-probs), and no scorer actor is started.
    on_rollout_engines: bool = False


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    zero_stage: int = 2
    num_cpus_per_rank: float = 0.5
    num_threads: Optional[int] = None  # per rank, as rollout.num_threads
    num_gpus_per_rank: float = 0.0
    # Custom Ray resources each rank asks for, e.g. {opsd_learner: 1} to keep it on the nodes
    # started with `ray start --resources='{"opsd_learner": 8}'` (README, "More than one node").
    resources: Dict[str, float] = field(default_factory=dict)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 4  # rows per forward on each rank
    offload_optimizer: bool = False


@dataclass
class LossConfig:
    """What the shared machinery reads for every objective. An objective's own options (OPSD's
    beta, GRPO's clip range, ...) are its own: ``objectives.<name>.<option>``, declared once in its
    module (opsd/objectives/)."""

    temperature: float = 1.0
    # PW-OPSD (arXiv 2605.21606): each token's loss times w = min + (1 - min) * sigmoid((f - center)
    # / width), f its relative position in its response ((i - 0.5) / T); the paper's 0.25, 0.30, 0.10.
    position_weight: bool = False
    position_weight_min: float = 0.25
    position_weight_center: float = 0.30
    position_weight_width: float = 0.10
    skip_first: int = 0
    chunk_size: int = 1024
    # DAPO's overlong filtering (TRL: mask_truncated_completions): a sample cut at rollout.max_tokens
    # (finish reason "length") is left out of the loss. It still counts in its group's reward mean
    # and std (GRPO's advantages): its grade is a fact about the policy, and leaving it out would
    # move its siblings' advantages. A step whose every sample is left out updates nothing.
    mask_truncated: bool = False


@dataclass
class TeacherConfig:
    # Which model scores: null, the student itself (the initial policy, or a live or EMA copy:
    # teacher.mode); else another model, referred to as model.path is (a named model, a .gguf
    # file, a local Hugging Face directory or a hub id), with the student's tokenizer (checked by
    # opsd validate and at train start, opsd/vocab.py) and its own chat template. It is fixed: it
    # gets no weight pushes (docs/DESIGN.md, "Another model as the teacher").
    model: Optional[str] = None
    mode: str = "fixed"  # fixed | live | ema
    ema_decay: float = 0.99
    sync_every: int = 1
    # What the teacher reads besides the problem (opsd/contexts/): solution | answer | none |
    # other_problem | majority | contrastive, or a plug-in "module:attribute".
    context: str = "solution"
    # majority: the share of the group the majority answer needs (else the prompt is left out of
    # the step's loss), and its hint: shortest (the shortest agreeing sample) | answer.
    min_agreement: float = 0.5
    majority_hint: str = "shortest"
    # contrastive: how many wrong contexts, and where they come from: group (the prompt's samples
    # the verifier graded wrong) | other_problems.
    wrong_contexts: int = 4
    wrong_from: str = "group"
    # A plug-in context's own options (it reads them from here).
    options: Dict[str, Any] = field(default_factory=dict)
    # Several teachers (the top-level ``teachers:`` section, opsd/teachers.py): the dataset column
    # that names each row's teacher, and the teacher of a row without one (null: the first listed).
    route: str = "teacher"
    default: Optional[str] = None


@dataclass
class TeacherSpec:
    """One of several teachers, ``teachers.<name>`` (docs/DESIGN.md, "Several teachers"). Each is
    fixed and scored by a scorer pool of its own; what it leaves unset is the run's."""

    # As teacher.model takes one (the student's tokenizer); null: the student's initial weights.
    model: Optional[str] = None
    # Its teacher context (null: teacher.context), and a plug-in context's options over teacher.options.
    context: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    # Its scorer pool's settings over the scorer section: num_workers, num_cpus_per_worker,
    # num_gpus_per_worker, num_threads, backend, max_tokens_per_forward.
    scorer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SyncConfig:
    # object_store | in_place | gloo | nccl, or a plug-in "module:attribute" (workers/transports/)
    transport: str = "object_store"
    bucket_mb: float = 64
    retries: int = 2
    timeout_s: float = 600.0  # gloo / nccl: longest wait for a group's rendezvous or one broadcast
    # object_store with every receiver on learner rank 0's Ray node: pushes go in_place instead,
    # receivers copy its weights straight out of its memory (workers/transports/in_place.py)
    shared_memory: bool = True


@dataclass
class TrainConfig:
    steps: int = 6
    prompts_per_step: int = 8
    seed: int = 0
    resume: Optional[str] = None  # a run dir to continue from
    checkpoint_every: int = 3
    keep_checkpoints: int = 0  # the newest N complete checkpoints stay, older ones are deleted; 0 keeps all
    export_hf: bool = True
    max_actor_restarts: int = 2
    # A step whose loss or gradient norm is not finite is never applied; this many in a row stop
    # the run (its last checkpoint holds the last good weights).
    max_bad_steps: int = 3


@dataclass
class EvalConfig:
    every: int = 0  # 0 = off
    at_start: bool = True  # with every > 0: also evaluate the initial weights (a step-0 row)
    path: Optional[str] = None  # default: data.test_path
    max_problems: int = 64
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 96


@dataclass
class LoggingConfig:
    save_batches: bool = False
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opsd"
    wandb_mode: str = "offline"


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: attach to a running cluster if any, else start local
    num_cpus: Optional[int] = None  # local cluster only
    device: str = "cpu"  # cpu | cuda
    dashboard: bool = False
    # How long an actor that died (a lost node, a crash) may take to be placed again and start up
    # (vLLM's start counts) before the run stops with one line naming its last checkpoint; an
    # autoscaler has this long to add a node.
    place_timeout_s: float = 600.0


@dataclass
class Config:
    algo: str = "opsd"  # opsd | grpo | sft | kd | contrastive | mix, or a plug-in "module:attribute" (opsd/objectives/)
    run_dir: Optional[str] = None  # default runs/<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers, by name, each row routed to one by its teacher.route column (opsd/teachers.py);
    # exclusive with teacher.model, which is the one-teacher form.
    teachers: Dict[str, TeacherSpec] = field(default_factory=dict)
    # Each objective's own options, one section per objective name (objectives.opsd.beta,
    # objectives.grpo.clip_high, objectives.mix.parents, a plug-in's under its name), typed and
    # checked by the objective's Options dataclass (opsd/objectives/base.py).
    objectives: Dict[str, Any] = field(default_factory=dict)
    sync: SyncConfig = field(default_factory=SyncConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Objectives in turn in one run, each from the weights the one before it ended with: a list of
    # {name, algo, steps, teacher, overrides}, parsed and checked by launch/stages.py (docs/DESIGN.md,
    # "Stages"). Empty: one stage, this config.
    stages: List[Any] = field(default_factory=list)


_CHOICES = {
    "model.lora.serve": ("merged", "adapter"),
    "model.dtype": DTYPES,  # and "auto", resolved by load_config
    "model.lm_head_path": ("auto", "fused", "module"),
    "prompt.overlong": ("error", "skip"),
    "data.answer_format": ("auto", "boxed", "gsm8k"),
    "grading.extract": ("strict", "lenient", "auto"),  # auto: resolved by load_config
    "sandbox.isolation": ("none", "bwrap"),  # opsd.sandbox.LEVELS
    "learner.zero_stage": (0, 1, 2, 3),
    "teacher.mode": ("fixed", "live", "ema"),
    "scorer.backend": ("transformers", "vllm"),
    "cluster.device": ("cpu", "cuda"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _describe(exc: OmegaConfBaseException) -> str:
    from omegaconf.errors import ConfigKeyError

    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError) and key:
        # OmegaConf suggests keys of the same section only; a key of another section with the
        # same name is the likelier meaning, and replaces its suggestion.
        ours = key_hint(str(key))
        if ours and ("Did you mean" not in msg or f"{str(key).rsplit('.', 1)[-1]}'?" in ours):
            msg = msg.split(". Did you mean", 1)[0].rstrip(".") + ours
    return f"config key '{key}': {msg}" if key else msg


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name in node:
        child = node._get_node(name)
        keys.append(prefix + name)
        if isinstance(child, DictConfig):
            keys += _dotted_keys(child, f"{prefix}{name}.")
    return keys


def key_hint(key: str) -> str:
    """". Did you mean 'train.steps'?" for an unknown key (``steps``) spelt like a key of another
    section; "" when none is close."""
    import difflib

    known = _dotted_keys(OmegaConf.structured(Config))
    by_leaf: dict[str, list[str]] = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    leaf = key.rsplit(".", 1)[-1]
    # A key of another section with exactly that name wins over names merely spelt alike
    # (`steps` is train.steps, not the top-level `stages`).
    close = [k for k in by_leaf.get(leaf, []) if k != key] or [
        k for near in difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.8) for k in by_leaf[near]]
    close = close or difflib.get_close_matches(key, known, n=2, cutoff=0.8)
    return f". Did you mean {' or '.join(repr(k) for k in close[:3])}?" if close else ""


def _shape_error(base: DictConfig, layer: dict, prefix: str = "") -> str | None:
    """A value whose kind does not fit its key (a scalar or list over a section, a mapping over a
    list). OmegaConf's merge reports these without the key (or as a bare TypeError)."""
    for key, value in layer.items():
        if not isinstance(key, str) or key not in base:
            continue  # unknown keys: the merge names them
        target = base[key]
        full = prefix + key
        if isinstance(target, DictConfig):
            if isinstance(value, dict):
                found = _shape_error(target, value, full + ".")
                if found:
                    return found
            elif value is not None:  # None: the merge says the field is not Optional
                return f"config key '{full}' is a section; expected a mapping of its keys, got {value!r}"
        elif isinstance(target, ListConfig) and isinstance(value, dict):
            return f"config key '{full}': expected a list, got a mapping {value!r}"
    return None


def _is_string_key(schema: DictConfig | None, key: str) -> bool:
    from omegaconf.nodes import StringNode

    if schema is None:
        return False
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(schema, parent) if parent else schema
    try:
        return isinstance(section, DictConfig) and isinstance(section._get_node(leaf), StringNode)
    except OmegaConfBaseException:
        return False  # an unknown key: the merge names it


def parse_overrides(items: list[str], schema: DictConfig | None = None) -> DictConfig:
    """``["a.b=1", "c=x"]`` -> a DictConfig; values are parsed as YAML scalars. For a key that
    ``schema`` types as a string, a value that YAML would read as something else (a template
    such as ``Ref: {solution}`` is a mapping to YAML) is taken as written."""
    bad = [it for it in items if "=" not in it or it.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=10)")
    out = OmegaConf.create()
    for item in items:
        key, raw = item.split("=", 1)
        try:
            layer = OmegaConf.from_dotlist([item])
            parsed = OmegaConf.select(layer, key)
        except Exception:  # whatever OmegaConf's parser rejects; judged below (a string key takes it as written)
            layer, parsed = None, None
        if _is_string_key(schema, key) and not isinstance(parsed, str) and not (parsed is None and raw == "null"):
            layer = OmegaConf.create()
            OmegaConf.update(layer, key, raw)
        elif layer is None:
            raise ConfigError(f"override {item!r}: the value is not valid YAML")
        out = OmegaConf.merge(out, layer)
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then :func:`check`.

    Returns a typed ``Config`` object (an OmegaConf structured config behaving like the
    dataclass).
    """
    cfg = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append((str(p), OmegaConf.load(p)))
        except Exception as exc:  # YAML's scanner, parser and constructor errors alike become one line
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"{p}: not valid YAML{where}: {what}") from exc
    if overrides:
        layers.append(("command line", parse_overrides(list(overrides), schema=cfg)))
    for origin, layer in layers:
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return merge_layers([(origin, OmegaConf.to_container(layer, resolve=False)) for origin, layer in layers])


def merge_layers(layers: list[tuple[str, dict]]) -> Config:
    """The defaults <- each (origin, plain nested dict) layer in turn, then :func:`check`: what
    :func:`load_config` does with a file and the command line, and launch/stages.py with a stage's
    overrides over its run's config. An error names the layer's origin and the key."""
    cfg = OmegaConf.structured(Config)
    layers, moved = _move_old_keys(layers)
    for origin, layer in layers:
        shape = _shape_error(cfg, layer)
        if shape:
            raise ConfigError(f"{origin}: {shape}")
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{origin}: {_describe(exc)}") from exc
    try:
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc
    if cfg.model.dtype == "auto":
        cfg.model.dtype = auto_dtype(cfg.cluster.device)
    if cfg.grading.extract == "auto":
        cfg.grading.extract = default_grading(cfg.data.train_path)
    check(cfg)
    if moved:
        _OLD_KEY_NOTES[id(cfg)] = (weakref.ref(cfg), moved)
    return cfg  # type: ignore[return-value]


def default_grading(train_path: str) -> str:
    """grading.extract=auto: the named dataset's own way of reading answers, else strict."""
    from opsd.assets.datasets import named
    from opsd.data import DataError

    try:
        dataset = named(train_path)
    except DataError:
        dataset = None  # a malformed facet: the data check names it
    return dataset.grading if dataset is not None else "strict"


def notes(cfg: Config) -> list[str]:
    """Warnings about a config that runs but likely not as meant: a slow dtype, and whatever the
    teacher context says of it (TeacherContext.note)."""
    from opsd.contexts import context
    from opsd.objectives import objective

    held = _OLD_KEY_NOTES.get(id(cfg))
    found = [dtype_note(cfg), lora_note(cfg)] + (held[1] if held is not None and held[0]() is cfg else [])
    if objective(cfg.algo).teacher(cfg) == "context":
        found.append(context(cfg.teacher.context).note(cfg))
    return [n for n in found if n]


def dtype_note(cfg: Config) -> str | None:
    """A warning when a half-precision dtype will be slow on this CPU, else None."""
    if cfg.cluster.device != "cpu" or cfg.model.dtype == "float32" or cpu_bf16_instructions():
        return None
    return (f"model.dtype={cfg.model.dtype} on a CPU without AMX or AVX512-BF16: torch runs its matmuls there "
            f"in a slow fallback (~60x slower than float32 on an AVX2 machine); model.dtype=auto or float32 "
            f"is faster here")


def lora_note(cfg: Config) -> str | None:
    """A warning for LoRA adapters served by vLLM on CPU, where its LoRA kernels are plain torch."""
    if cfg.cluster.device != "cpu" or not serves_adapter(cfg):
        return None
    return ("model.lora.serve=adapter on CPU: vLLM's CPU LoRA kernels are plain torch ops, and rollouts ran 17x "
            "slower than with merged weights on SmolLM2 (docs/BENCHMARKS.md); model.lora.serve=merged is faster here")


def _get(cfg: Any, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted) if isinstance(cfg, DictConfig) else _getattr_path(cfg, dotted)


def _getattr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
BUILTIN_KEYS = {
    "rollout": {"CPU": "rollout.num_cpus_per_worker", "GPU": "rollout.tensor_parallel_size"},
    "scorer": {"CPU": "scorer.num_cpus_per_worker", "GPU": "scorer.num_gpus_per_worker"},
    "learner": {"CPU": "learner.num_cpus_per_rank", "GPU": "learner.num_gpus_per_rank"},
}


def check(cfg: Config, *, vocab_size: int | None = None) -> None:
    """Reject values and combinations that type-check but cannot run.

    ``vocab_size`` is known only once the model's config is read; pass it to check
    ``scorer.topk`` against it.
    """
    _check_values(cfg)
    _check_templates(cfg)
    _check_teacher(cfg)
    _check_runtime(cfg)
    _check_lora(cfg)
    _check_objective(cfg)
    _check_teacher_model(cfg)
    _check_teachers(cfg)
    if cfg.eval.n > 1 and cfg.eval.temperature == 0.0:
        raise ConfigError(
            f"config key 'eval.n' = {cfg.eval.n} with eval.temperature=0: greedy samples are identical; "
            "set eval.temperature > 0 or eval.n=1"
        )
    if vocab_size is not None and cfg.scorer.topk > vocab_size:
        raise ConfigError(
            f"config key 'scorer.topk' = {cfg.scorer.topk} is larger than the model's vocabulary ({vocab_size})"
        )


def _check_values(cfg: Config) -> None:
    """Each value on its own: one of its choices, positive, in its range."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r}; expected one of {list(allowed)}")

    def positive(key: str, *, allow_zero: bool = False) -> None:
        value = _get(cfg, key)
        if value is None or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key '{key}' = {value!r}; expected a {'non-negative' if allow_zero else 'positive'} number")

    for key in (
        "rollout.num_workers", "rollout.tensor_parallel_size", "rollout.max_tokens", "rollout.n",
        "scorer.num_workers", "scorer.topk", "scorer.max_tokens_per_forward",
        "learner.num_ranks", "learner.micro_batch_size", "learner.lr",
        "loss.chunk_size", "train.steps", "train.prompts_per_step", "sync.bucket_mb",
        "model.max_model_len", "prompt.max_prompt_len", "teacher.sync_every", "eval.n", "eval.max_tokens",
        "train.max_bad_steps",
        "sandbox.workers", "sandbox.cpu_s", "sandbox.wall_s", "sandbox.memory_mb", "sandbox.processes",
        "sandbox.open_files", "sandbox.file_mb", "sandbox.output_kb",
    ):
        positive(key)
    for key in ("rollout.max_staleness", "loss.skip_first", "train.checkpoint_every", "eval.every",
                "rollout.temperature", "eval.temperature", "learner.warmup_steps", "sync.retries",
                "train.keep_checkpoints"):
        positive(key, allow_zero=True)

    if cfg.loss.temperature <= 0:
        raise ConfigError(f"config key 'loss.temperature' = {cfg.loss.temperature}; expected > 0")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"config key 'rollout.top_p' = {cfg.rollout.top_p}; expected 0 < top_p <= 1")
    if not 0.0 < cfg.teacher.ema_decay < 1.0:
        raise ConfigError(f"config key 'teacher.ema_decay' = {cfg.teacher.ema_decay}; expected 0 < decay < 1")
    for key in ("rollout.num_threads", "scorer.num_threads", "learner.num_threads"):
        value = _get(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config key '{key}' = {value!r}; expected a whole number >= 1, or null for the CPUs "
                              "Ray gives the actor")


def _check_templates(cfg: Config) -> None:
    """The prompt templates use only the fields they are given."""
    for key, fields in (("prompt.teacher_template", ("problem", "solution", "instruction")),
                        ("prompt.teacher_system", ("problem", "solution"))):
        template = _get(cfg, key)
        if template is None:
            continue
        try:
            template.format(**{f: "" for f in fields})
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"config key '{key}': {type(exc).__name__} {exc} in {template!r}; it may use "
                f"{', '.join('{' + f + '}' for f in fields)} (write {{{{ and }}}} for literal braces)"
            ) from None


def _check_teacher(cfg: Config) -> None:
    _check_engine_scoring(cfg)
    if cfg.teacher.mode == "fixed" and cfg.teacher.sync_every != 1:
        raise ConfigError(
            "config key 'teacher.sync_every' only applies to teacher.mode=ema (a fixed teacher is never "
            f"synced); got teacher.mode=fixed with teacher.sync_every={cfg.teacher.sync_every}"
        )
    if cfg.teacher.mode == "live" and cfg.teacher.sync_every != 1:
        raise ConfigError(
            "config key 'teacher.sync_every' must be 1 for teacher.mode=live (the live teacher follows every "
            "push); use teacher.mode=ema for a lagged teacher"
        )


def _check_engine_scoring(cfg: Config) -> None:
    """What a teacher scored by vLLM prompt log-probs can and cannot be."""
    engine = cfg.scorer.backend == "vllm" or cfg.scorer.on_rollout_engines
    where = ("config key 'scorer.on_rollout_engines' = true" if cfg.scorer.on_rollout_engines
             else "config key 'scorer.backend' = vllm")
    if engine and cfg.loss.temperature != 1.0:
        raise ConfigError(
            f"{where} with loss.temperature={cfg.loss.temperature}: vLLM's prompt log-probs are those of the "
            "raw logits (temperature 1), and a top-k at temperature 1 cannot be rescaled to another "
            "temperature without the full vocabulary; use scorer.backend=transformers"
        )
    if engine and cfg.teacher.mode == "ema":
        raise ConfigError(
            f"{where} with teacher.mode=ema: the EMA is blended in the transformers scorer's fp32 copy of the "
            "weights; use scorer.backend=transformers, or teacher.mode=fixed|live"
        )
    if cfg.scorer.on_rollout_engines and cfg.teacher.mode != "live" and not serves_adapter(cfg):
        raise ConfigError(
            f"{where} with teacher.mode={cfg.teacher.mode}: the rollout engines hold the current policy, so "
            "they can only be a live teacher; a fixed teacher needs weights of its own (scorer.backend=vllm "
            "runs it on a vLLM engine of its own), or LoRA with model.lora.serve=adapter (the engines keep the "
            "base weights, the fixed teacher, and serve the student as an adapter)"
        )


def _check_lora(cfg: Config) -> None:
    """model.lora.serve=adapter: who can take a push that holds the adapter alone."""
    from opsd.lora import VLLM_MAX_RANKS
    from opsd.registry import load_attribute

    lc = cfg.model.lora
    if lc.serve != "adapter":
        return
    if not lc.enabled:
        raise ConfigError("config key 'model.lora.serve' = adapter needs model.lora.enabled=true")
    if lc.r > VLLM_MAX_RANKS[-1]:
        raise ConfigError(f"config key 'model.lora.r' = {lc.r}: vLLM serves adapters of rank at most "
                          f"{VLLM_MAX_RANKS[-1]}; use model.lora.serve=merged")
    head = sorted(set(lc.target_modules) & {"lm_head", "embed_tokens"})
    if head:
        raise ConfigError(
            f"config key 'model.lora.target_modules' holds {head} with model.lora.serve=adapter: vLLM's prompt "
            "log-probs (the teacher's targets) do not apply an adapter of the head or the embedding to every "
            "token; use model.lora.serve=merged"
        )
    if load_attribute("opsd.workers.transports:transport")(cfg.sync.transport).collective:  # as _check_transport
        raise ConfigError(
            f"config key 'model.lora.serve' = adapter with sync.transport={cfg.sync.transport}: an adapter is "
            "loaded by the engine from its own files, not received inside vLLM's workers; it is small, so use "
            "sync.transport=object_store (or in_place on one host)"
        )
    if scorer_actors(cfg) and cfg.scorer.backend == "transformers" and cfg.teacher.mode != "fixed":
        raise ConfigError(
            f"config key 'model.lora.serve' = adapter with teacher.mode={cfg.teacher.mode} on transformers scorer "
            "actors: they load whole weights, and every push would hold the adapter alone; use "
            "scorer.on_rollout_engines=true (teacher.mode=live) or scorer.backend=vllm, or model.lora.serve=merged"
        )


def _check_runtime(cfg: Config) -> None:
    """The learner group, the weight transport, the roles' resources, tensor parallelism."""
    if cfg.learner.zero_stage == 0 and cfg.learner.num_ranks > 1:
        raise ConfigError(
            f"config key 'learner.zero_stage' = 0 with learner.num_ranks={cfg.learner.num_ranks}: use a ZeRO "
            "stage (1, 2 or 3) for more than one rank"
        )
    _check_transport(cfg)
    if cfg.sync.timeout_s <= 0:
        raise ConfigError(f"config key 'sync.timeout_s' = {cfg.sync.timeout_s} must be positive")
    if cfg.cluster.place_timeout_s <= 0:
        raise ConfigError(f"config key 'cluster.place_timeout_s' = {cfg.cluster.place_timeout_s} must be positive")
    for role in ("rollout", "scorer", "learner"):
        for name, amount in getattr(cfg, role).resources.items():
            key = f"{role}.resources.{name}"
            if name in RAY_BUILTIN_RESOURCES:
                instead = BUILTIN_KEYS[role].get(name, "Ray's own accounting")
                raise ConfigError(f"config key '{key}': {name} is not a custom resource; it is set by {instead}")
            if not amount > 0:
                raise ConfigError(f"config key '{key}' = {amount:g}; expected > 0 (leave the name out instead)")
    if cfg.rollout.tensor_parallel_size > 1 and cfg.cluster.device != "cuda":
        raise ConfigError("config key 'rollout.tensor_parallel_size' > 1 needs cluster.device=cuda")


def _check_objective(cfg: Config) -> None:
    """The objective (``algo``) and the teacher context are plug-ins, found through their registries;
    each checks the combinations it cannot run."""
    from opsd.contexts import context
    from opsd.objectives import objective
    from opsd.registry import RegistryError

    try:
        obj = objective(cfg.algo)
        obj.options(cfg)
        obj.check(cfg)
        ctx = context(cfg.teacher.context) if obj.teacher(cfg) == "context" else None
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    if obj.reference_contexts(cfg) and cfg.teacher.mode != "fixed":
        # A reference context is scored by the scorer's weights: the initial policy only when fixed.
        raise ConfigError(f"config key 'teacher.mode' = {cfg.teacher.mode!r}: algo={cfg.algo} scores "
                          f"{list(obj.reference_contexts(cfg))} on the initial policy, which only a fixed teacher "
                          "holds; use teacher.mode=fixed")
    if ctx is not None:
        ctx.check(cfg)
        if ctx.uses_samples and obj.responses(cfg) != "student":
            raise ConfigError(
                f"teacher.context={cfg.teacher.context!r} is built from the student's samples, and algo={cfg.algo} "
                "has none of the student's samples to build it from; use a context that does not read them "
                "(solution, answer, none, other_problem)"
            )
    if not cfg.loss.position_weight_width > 0:
        raise ConfigError(f"config key 'loss.position_weight_width' = {cfg.loss.position_weight_width}; expected > 0")
    _check_sections(cfg, obj)
    if not 0.0 <= cfg.loss.position_weight_min <= 1.0:
        raise ConfigError(f"config key 'loss.position_weight_min' = {cfg.loss.position_weight_min}; expected 0..1")


def _check_sections(cfg: Config, obj: Any) -> None:
    """Every section of ``objectives`` belongs to an objective of this run or of the registry, and
    holds only options it declares, of the declared types (an objective of the run was read in
    _check_objective; one that is not used is still checked, so a typo is found before the run
    that uses it)."""
    from opsd.objectives import OBJECTIVES, objective, run_objectives

    mine = {o.name: o for o in run_objectives(cfg)}
    for name in cfg.objectives:
        if name in mine:
            continue
        if name not in OBJECTIVES:
            raise ConfigError(f"config key 'objectives.{name}': no objective of this run (algo={cfg.algo}) or of the "
                              f"registry is named {name!r}; expected one of {sorted(set(OBJECTIVES.names()) | set(mine))}")
        objective(name).options(cfg)


# Keys that moved into an objective's own options: old key -> the option's name. An old key is
# read as objectives.<name>.<option> for each objective of the run (the algo, or a composite's
# parents) that declares that option, and dropped, with a note, where none does (it had no effect
# there before either). Finished experiments record the old keys (docs/results/*/spec.json), so
# they keep working; the shipped configs and benchmarks/comparison.py's recipes use the new ones
# (a test holds each to that).
MOVED_KEYS = {
    "loss.objective": "objective", "loss.beta": "beta", "loss.support": "support", "loss.token_clip": "token_clip",
    "loss.divergence_clip": "divergence_clip", "loss.divergence_clip_mode": "divergence_clip_mode",
    "loss.is_clip": "is_clip", "loss.clip_low": "clip_low", "loss.clip_high": "clip_high", "loss.kl_coef": "kl_coef",
    "loss.old_logprobs": "old_logprobs", "loss.contrast_tau": "tau", "loss.contrast_scale": "scale",
    "loss.contrast_threshold": "threshold", "kd.source": "source",
}


def _move_old_keys(layers: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Each layer (a plain nested dict) with its MOVED_KEYS rewritten into the sections of the
    run's objectives, which the layers' final ``algo`` (and a composite's parents) decide; and one
    note per old key."""
    from opsd.objectives import objective, run_objective_names
    from opsd.registry import RegistryError

    algo, sections = "opsd", {}
    for _, layer in layers:
        algo = layer.get("algo", algo)
        found = layer.get("objectives")
        for name, section in (found.items() if isinstance(found, dict) else ()):
            if isinstance(section, dict):  # anything else: the objective's own check names it
                sections.setdefault(name, {}).update(section)
    try:
        objs = [objective(n) for n in run_objective_names(algo, sections)]
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    notes, out = [], []
    for origin, layer in layers:
        layer = dict(layer)
        for old, option in MOVED_KEYS.items():
            head, _, leaf = old.partition(".")
            section = layer.get(head)
            if not isinstance(section, dict) or leaf not in section:
                continue
            section = layer[head] = dict(section)
            value = section.pop(leaf)
            if not section:
                del layer[head]
            takers = [o for o in objs if o.Options is not None and option in {f.name for f in fields(o.Options)}]
            for o in takers:
                own = layer.setdefault("objectives", {}).setdefault(o.name, {})
                if option in own:
                    raise ConfigError(f"{origin}: both '{old}' (the old key) and '{o.key(option)}' are set; "
                                      f"keep '{o.key(option)}'")
                own[option] = value
            notes.append(f"{old} -> {' and '.join(o.key(option) for o in takers)}" if takers else
                         f"{old} (no option of algo={algo}; it had no effect: dropped)")
        out.append((origin, layer))
    if not notes:
        return out, []
    return out, [f"old config keys, read under their new names (docs/DESIGN.md, \"Registries\"): {'; '.join(dict.fromkeys(notes))}"]


_OLD_KEY_NOTES: dict[int, tuple[Any, list[str]]] = {}  # id(cfg) -> (a weak reference to it, its notes)


def _check_teacher_model(cfg: Config) -> None:
    """teacher.model: what assumes that the teacher is the student is refused, naming the key to
    change (docs/DESIGN.md, "Another model as the teacher"). Run after _check_objective, which
    has found the objective."""
    from opsd.objectives import objective

    model = cfg.teacher.model
    if model is None:
        return
    if not model.strip():
        raise ConfigError("config key 'teacher.model' is empty; give a model (as model.path takes one), or null for "
                          "the student itself as the teacher")
    this = f"teacher.model={model!r}"
    if cfg.teacher.mode != "fixed":
        raise ConfigError(
            f"config key 'teacher.mode' = {cfg.teacher.mode} with {this}: a live or EMA teacher is a copy of the "
            "student that follows its weight pushes, and another model gets none; set teacher.mode=fixed, or unset "
            "teacher.model for the student as its own teacher"
        )
    if cfg.scorer.on_rollout_engines:
        raise ConfigError(
            f"config key 'scorer.on_rollout_engines' = true with {this}: the rollout engines hold the student, not "
            "that model; set scorer.on_rollout_engines=false (scorer.backend=vllm serves it on an engine of its own)"
        )
    obj = objective(cfg.algo)
    scored_by = obj.teacher(cfg)
    if scored_by is None:
        raise ConfigError(
            f"config key 'teacher.model' is set with algo={cfg.algo}, which scores nothing with a teacher; unset "
            "teacher.model (or choose an objective that distils: opsd, kd, contrastive)"
        )
    if scored_by == "reference":
        raise ConfigError(
            f"config key 'teacher.model' = {model!r} with algo={cfg.algo}: its scorer is the frozen initial policy "
            "reading the student's own prompt (a KL reference; for grpo: objectives.grpo.kl_coef > 0), and it would "
            "serve teacher.model instead; set objectives.grpo.kl_coef=0 (no reference term) or unset teacher.model"
        )
    if obj.reference_contexts(cfg):
        raise ConfigError(
            f"config key 'teacher.model' = {model!r} with algo={cfg.algo}: the contexts "
            f"{list(obj.reference_contexts(cfg))} are the initial policy on the student's own prompt (a KL anchor: "
            "objectives.opsd.anchor > 0), scored by the scorer, which would hold teacher.model instead; set the "
            "anchor to 0 or unset teacher.model"
        )
    if obj.responses(cfg) == "teacher":
        raise ConfigError(
            f"config key 'teacher.model' = {model!r} with algo={cfg.algo}: its responses are sampled from the "
            "teacher's prompt by the rollout engines, which hold the student, not teacher.model (for kd: "
            "objectives.kd.source=teacher_samples); use objectives.kd.source=reference (the teacher's targets along the reference solutions) or "
            "unset teacher.model"
        )


def _check_teachers(cfg: Config) -> None:
    from opsd.teachers import check_teachers

    check_teachers(cfg, check, {f.name for f in fields(ScorerConfig)})


def dataset_needs(cfg: Config) -> dict[str, str]:
    """What every training row must hold, and who needs it: {"solution": "teacher.context=solution"}."""
    from opsd.contexts import context
    from opsd.objectives import objective

    obj = objective(cfg.algo)
    needs = {field: f"algo={cfg.algo}" for field in obj.needs(cfg)}
    if obj.teacher(cfg) == "context":
        from opsd.teachers import context_key, teacher_configs

        for name, t in teacher_configs(cfg).items():  # one config per teacher (teachers:), or the run's
            needs.update({f: f"{context_key(cfg, name)}={t.teacher.context}" for f in context(t.teacher.context).needs(t)
                          if f not in needs})
    return needs


def _check_transport(cfg: Config) -> None:
    """sync.transport names a registered transport that runs on cluster.device. The transports
    live in the runtime (opsd.workers.transports), which imports this module: their registry is
    read by name, as a plug-in is (opsd/registry.py), and imports nothing heavy."""
    from opsd.registry import RegistryError, load_attribute

    registry = load_attribute("opsd.workers.transports:TRANSPORTS")
    try:
        found = load_attribute("opsd.workers.transports:transport")(cfg.sync.transport)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.cluster.device not in found.devices:
        usable = [n for n in registry.names() if cfg.cluster.device in registry.get(n).devices]
        raise ConfigError(
            f"config key 'sync.transport' = {cfg.sync.transport!r} needs cluster.device="
            f"{' or '.join(found.devices)}; on {cfg.cluster.device} use one of {usable}"
        )


def actor_threads(num_threads: int | None, num_cpus: float) -> int:
    """torch threads of an actor on CPU: ``num_threads`` when set, else the whole CPUs Ray
    reserved for it, at least one (a fractional reservation shares a core)."""
    return num_threads if num_threads is not None else max(1, int(num_cpus))


def training_rows(cfg: Config) -> dict:
    """What load_problems requires of every training row: a solution or an answer only when the
    objective or the teacher context needs one (dataset_needs). A set of worked solutions has
    answers (each solution's last \\boxed{} if no column holds them): one without is malformed; a
    set of bare problems may have neither, when nothing needs them."""
    from opsd.teachers import routing

    needs = dataset_needs(cfg)
    return dict(require_solution="solution" in needs, require_answer=bool({"solution", "answer"} & set(needs)),
                needed_by=needs, **routing(cfg))


def uses_scorer(cfg: Config) -> bool:
    """Whether the objective scores its samples with a teacher (OPSD, KD, contrastive) or a frozen
    reference (GRPO's KL term)."""
    from opsd.objectives import objective

    return objective(cfg.algo).teacher(cfg) is not None


def serves_adapter(cfg: Config) -> bool:
    """Whether a push holds the LoRA adapter alone, which the engines serve over their base weights
    (model.lora.serve=adapter, opsd/lora.py)."""
    return cfg.model.lora.enabled and cfg.model.lora.serve == "adapter"


def scorer_actors(cfg: Config) -> bool:
    """Whether the run starts scorer actors: a teacher is scored, and not by the rollout engines."""
    return uses_scorer(cfg) and not cfg.scorer.on_rollout_engines


def trains_on_references(cfg: Config) -> bool:
    """SFT, and KD from the reference solutions: the responses are the references, nothing is
    sampled."""
    from opsd.objectives import objective

    return objective(cfg.algo).responses(cfg) == "reference"


def samples_per_prompt(cfg: Config) -> int:
    return 1 if trains_on_references(cfg) else cfg.rollout.n


def distills(cfg: Config) -> bool:
    """Whether the scorer reads the teacher context (OPSD, KD, contrastive), not the student's own
    prompt (GRPO's frozen reference)."""
    from opsd.objectives import objective

    return objective(cfg.algo).teacher(cfg) == "context"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def resolve_path(path: str | None) -> Path | None:
    """Relative paths in configs are relative to the working directory, else the repo root."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
