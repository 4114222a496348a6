"""The places where opsd reaches into DeepSpeed, where DeepSpeed has no public hook
(docs/DESIGN.md, "DeepSpeed"). Everything else the learner does goes through DeepSpeed's public API.

Checked against the versions in :data:`CHECKED`: their engine keeps its checkpoint reader in
``engine.checkpoint_engine.load(path, map_location)`` and steps its optimizer through
``engine.optimizer.step()`` inside ``engine.step()``, and their torch communication backend gets
its CPU shared-memory op from ``deepspeed.comm.torch.build_shm_op()``; ZeRO imports the Muon
optimizer module ``deepspeed.runtime.zero.muon.muon_optimizer``. On any other version
:func:`check_version` refuses to start the learner, naming this file, rather than let a hook
silently miss.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

CHECKED = ("0.19.8",)


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ not in CHECKED:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} is installed; opsd's hooks into its internals "
            "(workers/deepspeed_compat.py: the checkpoint reader, the optimizer step, the shm op, the Muon import) "
            f"were checked against {', '.join(CHECKED)} only. Install deepspeed=={CHECKED[-1]} (pyproject.toml pins "
            "it), or check each hook against this version and add it to CHECKED"
        )


def without_shm_comm_op() -> None:
    """Make the next ``deepspeed.init_distributed`` start its backend without the CPU shared-memory op.

    On CPU, ``deepspeed.init_distributed`` compiles that C++ op on first use (one to two minutes on
    2 cores; it needs a compiler at run time) and loads it in every rank. Its one use is
    ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference), which training never calls:
    ZeRO's collectives go through torch.distributed (gloo here). The build also holds a file lock
    under ``TORCH_EXTENSIONS_DIR``; a process killed while building leaves that lock behind, and
    every later learner then waited on it without a word. Without the op the backend's
    ``inference_all_reduce`` falls back to torch.distributed, as DeepSpeed does on machines where
    the op cannot be built."""
    # by module path: `import deepspeed.comm.torch as ...` gives the torch package, which
    # deepspeed.comm re-exports under that name
    backend = importlib.import_module("deepspeed.comm.torch")
    if not callable(getattr(backend, "build_shm_op", None)):
        raise RuntimeError("this DeepSpeed has no deepspeed.comm.torch.build_shm_op to replace "
                           "(workers/deepspeed_compat.py)")
    backend.build_shm_op = lambda: None


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with TorchDynamo off, before ``deepspeed.initialize``.

    ZeRO imports that module to ask whether the optimizer is Muon (``is_zero_supported_optimizer``,
    and again in its gradient reduction), and the module ``torch.compile``s its kernels as it is
    imported, which loads TorchInductor: 1.2-1.3 s of CPU per rank on these 2-core machines (after
    transformers, which loads TorchDynamo anyway), for an optimizer opsd never builds (its optimizer
    is AdamW). Imported with ``TORCHDYNAMO_DISABLE=1`` those kernels stay plain Python functions
    and Inductor is never loaded; nothing else in the learner compiles, so the step is the same. A
    DeepSpeed without that module is left as it is."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def load_checkpoints_as_tensors(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read its files with ``torch.load(weights_only=True)``.

    DeepSpeed reads them with ``weights_only=False``, i.e. it unpickles whatever is on disk; this
    restricts it to tensors, plain containers and the few DeepSpeed value types its checkpoints
    hold."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path, map_location=None):
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    reader = getattr(engine, "checkpoint_engine", None)
    if reader is None or not callable(getattr(reader, "load", None)):
        raise RuntimeError("this DeepSpeed engine has no checkpoint_engine.load to restrict "
                           "(workers/deepspeed_compat.py)")
    reader.load = load


@contextmanager
def optimizer_step_skipped(engine: Any) -> Iterator[None]:
    """Inside the block, ``engine.step()`` zeroes the gradients and advances DeepSpeed's step
    counters as usual, but neither the optimizer nor the learning-rate schedule steps: for an
    update that must not be applied where DeepSpeed would apply it (fp32 without ZeRO has no
    overflow check of its own). DeepSpeed's own overflow skip leaves the schedule where it was
    too, so a run's schedule counts applied updates only, whichever path skipped (docs/DESIGN.md,
    "Faults")."""
    stubbed = [obj for obj in (engine.optimizer, getattr(engine, "lr_scheduler", None)) if obj is not None]
    own = [vars(obj).get("step") for obj in stubbed]
    for obj in stubbed:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
        engine.skipped_steps += 1
    finally:
        for obj, method in zip(stubbed, own):
            if method is None:
                del obj.step
            else:
                obj.step = method
