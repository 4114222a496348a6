"""What an objective declares, and what it computes (docs/DESIGN.md, "Registries").

An objective is one module of this package holding a subclass of :class:`Objective` and one line
of the registry (``opsd.objectives.OBJECTIVES``). The config check, the pipeline, the scorer and
the learner read its declarations (where the responses come from, which teacher contexts are
scored and with which targets, what the dataset must hold, which per-token inputs the loss reads,
which statistics it logs) and never compare its name. Its loss is a function of per-token tensors,
called a chunk of positions at a time by ``opsd.losses.chunked_loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from opsd.errors import ConfigError

# Where an objective's options live in the config: objectives.<its name>.<option> (one section per
# objective; a composite's parents each read their own).
SECTION = "objectives"

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


def field_shape(name: str) -> tuple[tuple, torch.dtype]:
    """A per-token input's trailing shape and dtype; a composite's inputs are its parents' under
    ``<parent>/<name>``."""
    return FIELD_SHAPES.get(name.rpartition("/")[2], ((), torch.float32))


def per_token(batch: Any, values: list) -> Tensor:
    """One value per row of ``batch`` (a BatchColumns: rows' response lengths and the loss
    positions kept) repeated over the row's loss positions: [N] float32."""
    import numpy as np

    rows = np.repeat(np.asarray([float("nan") if v is None else v for v in values], dtype=np.float64),
                     batch.lengths)
    return torch.as_tensor(np.ascontiguousarray(rows[batch.keep]), dtype=torch.float32)


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' = {value!r}; expected one of {list(allowed)}")


class Objective:
    """Defaults: samples from the student prompt, no teacher, nothing needed of the dataset, no
    options."""

    name = ""
    groups = False  # rows of one prompt form a group (group-normalised advantages; rollout.n >= 2)
    # A dataclass of its options (each field's default is the default), read from the config
    # section objectives.<name>; None: it has none. Declared here once: the config check types
    # them, and the learner gets the instance as it is (LossSpec.options).
    Options: type | None = None
    # Options its ``advantage`` does not read: a composite that blends advantages (algo=mix,
    # mode=advantage) refuses a value other than the default for these, which would do nothing.
    advantage_ignores: tuple[str, ...] = ()

    # --- its options ----------------------------------------------------------------------------

    def key(self, option: str) -> str:
        """The full config key of one of its options (for errors)."""
        return f"{SECTION}.{self.name}.{option}"

    def options(self, cfg: Any) -> Any:
        """Its options from ``cfg``: an instance of ``Options`` (None without), typed by OmegaConf;
        an unknown option or a value of the wrong type is a ConfigError naming the full key."""
        return read_options(self, _section(cfg, self.name))

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

    def reference_contexts(self, cfg: Any) -> tuple[str, ...]:
        """Named contexts scored on the student's own prompt (the sampled token's log-probability),
        by the scorer's weights, which the config check holds to the initial policy
        (teacher.mode=fixed): a reference such as a KL anchor, beside the primary teacher."""
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

    def advantage(self, spec: Any, lp_sampled: Tensor, t: dict[str, Tensor | None]) -> Tensor | None:
        """The per-token advantage [n] whose policy gradient its loss follows (detached), for a
        composite that blends advantages (algo=mix, mode=advantage); None: not a policy gradient."""
        return None

    def row(self, stats: dict[str, float], tokens: float) -> dict[str, float | None]:
        """Entries of its own in the metrics row, from the step's summed statistics."""
        return {}


def _section(cfg: Any, name: str) -> Any:
    sections = getattr(cfg, SECTION, None)
    return None if sections is None else sections.get(name)


def read_options(obj: Objective, section: Any) -> Any:
    """``section`` (a mapping, or None) typed as ``obj.Options``."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if section is not None and not isinstance(section, (DictConfig, dict)):
        raise ConfigError(f"config key '{SECTION}.{obj.name}' is the section of {obj.name!r}'s options; expected a "
                          f"mapping of them, got {section!r}")
    given = {} if section is None else (OmegaConf.to_container(section, resolve=True)
                                         if isinstance(section, DictConfig) else dict(section))
    if obj.Options is None:
        if given:
            raise ConfigError(f"config key '{SECTION}.{obj.name}' sets {sorted(given)}, but objective {obj.name!r} "
                              "has no options")
        return None
    declared = [f.name for f in dataclasses.fields(obj.Options)]
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(f"config key '{obj.key(unknown[0])}': objective {obj.name!r} has no option "
                          f"{unknown[0]!r}; its options are {declared}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(obj.Options), given))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"config key '{SECTION}.{obj.name}.{key}': {str(exc).splitlines()[0]}") from None
