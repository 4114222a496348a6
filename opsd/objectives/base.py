"""What an objective declares, and what it computes (docs/DESIGN.md, "Registries").

An objective is one module of this package holding a subclass of :class:`Objective` and one line
of the registry (``opsd.objectives.OBJECTIVES``). The config check, the pipeline, the scorer and
the learner read its declarations (where the responses come from, which teacher contexts are
scored and with which targets, what the dataset must hold, which per-token inputs the loss reads,
which statistics it logs) and never compare its name. Its loss is a function of per-token tensors,
called a chunk of positions at a time by ``opsd.losses.chunked_loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# The named teacher context every teacher-scoring objective reads; its columns are the batch's
# teacher_* columns (opsd/batch.py). Other named contexts (a contrastive teacher's wrong ones)
# have columns of their own.
PRIMARY = "teacher"

# Per-token inputs a loss may read (TokenTargets fields, opsd/losses.py), as (trailing shape, dtype);
# "k" is the top-k width.
FIELD_SHAPES: dict[str, tuple[tuple, torch.dtype]] = {
    "topk_ids": (("k",), torch.long),
    "topk_logprobs": (("k",), torch.float32),
    "teacher_logprobs": ((), torch.float32),
    "rollout_logprobs": ((), torch.float32),
    "advantages": ((), torch.float32),
    "ref_logprobs": ((), torch.float32),
}


class Objective:
    """Defaults: samples from the student prompt, no teacher, nothing needed of the dataset."""

    name = ""
    groups = False  # rows of one prompt form a group (group-normalised advantages; rollout.n >= 2)

    # --- what the run needs -------------------------------------------------------------------

    def responses(self, cfg: Any) -> str:
        """Where the responses come from: "student" (sampled from the student prompt), "teacher"
        (sampled from the teacher's context) or "reference" (the reference solutions; nothing is
        sampled)."""
        return "student"

    def teacher(self, cfg: Any) -> str | None:
        """Who scores the samples: "context" (the teacher context plug-in, teacher.context),
        "reference" (the student's own prompt, i.e. the frozen initial policy) or None (no scorer)."""
        return None

    def targets(self, cfg: Any) -> str:
        """What the scorer writes for the primary context: "topk" or "token" (the sampled token's
        log-probability alone)."""
        return "token"

    def contexts(self, cfg: Any) -> tuple[str, ...]:
        """Named teacher contexts besides the primary one whose targets the loss reads (a prefix
        ending in "*" stands for every context of that prefix)."""
        return ()

    def needs(self, cfg: Any) -> frozenset[str]:
        """What every dataset row must hold: "solution", "answer"."""
        return frozenset()

    def check(self, cfg: Any) -> None:
        """Raise opsd.errors.ConfigError, naming the key, for a combination that cannot run."""

    # --- the loss ------------------------------------------------------------------------------

    def fields(self, spec: Any) -> tuple[str, ...]:
        """The per-token inputs (FIELD_SHAPES names, or names of its own in TokenTargets.extra)
        the loss reads."""
        return ()

    def inputs(self, spec: Any, batch: Any) -> dict[str, Tensor]:
        """Those inputs from the batch: ``batch.column(name, dtype)`` is a column at the loss
        positions (a named context's reads NaN where it does not apply); ``batch.contexts`` the
        batch's other named contexts; ``batch.has_teacher`` whether it was scored."""
        return {}

    def stat_names(self, spec: Any, present: set[str]) -> list[str]:
        """Statistics of its own (weighted sums over tokens), given the inputs ``present``."""
        return []

    def loss(self, spec: Any, logits: Tensor, logp: Tensor, lp_sampled: Tensor,
             t: dict[str, Tensor | None]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss [n] and per-token values [n] of its statistics, from the student's logits
        [n, V], their log-softmax at the loss temperature [n, V], the sampled tokens' log-probs [n]
        and the inputs ``t`` sliced to these n positions."""
        raise NotImplementedError

    def row(self, stats: dict[str, float], tokens: float) -> dict[str, float | None]:
        """Entries of its own in the metrics row, from the step's summed statistics."""
        return {}
