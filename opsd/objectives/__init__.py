"""Objectives as plug-ins: ``algo: NAME`` (docs/DESIGN.md, "Registries").

One module per objective and one line below; an objective outside opsd is named
``module:attribute`` (an Objective instance).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from opsd.objectives.base import PRIMARY, Objective
from opsd.registry import Registry, RegistryError

_HERE = "opsd.objectives"

OBJECTIVES: Registry[Objective] = Registry("algo", {
    "opsd": f"{_HERE}.opsd:OBJECTIVE",
    "grpo": f"{_HERE}.grpo:OBJECTIVE",
    "sft": f"{_HERE}.sft:OBJECTIVE",
    "kd": f"{_HERE}.kd:OBJECTIVE",
    "contrastive": f"{_HERE}.contrastive:OBJECTIVE",
})


def objective(name: str) -> Objective:
    found = OBJECTIVES.get(name)
    if not isinstance(found, Objective):
        raise RegistryError(f"config key 'algo' = {name!r} is not an Objective ({type(found).__name__})")
    return found


def scored_contexts(cfg: Any) -> dict[str, str]:
    """The named teacher contexts the scorer scores for every sample, with the targets it writes for
    each ("topk" or "token"): the primary one when the objective has a teacher, and the context
    plug-in's others that the objective reads. Empty: no scorer."""
    from opsd.contexts import context

    obj = objective(cfg.algo)
    if obj.teacher(cfg) is None:
        return {}
    found = {PRIMARY: obj.targets(cfg)}
    if obj.teacher(cfg) == "context":
        wanted = obj.contexts(cfg)
        for name in context(cfg.teacher.context).names(cfg):
            if name != PRIMARY and any(fnmatch.fnmatchcase(name, w) for w in wanted):
                found[name] = "token"
    return found


__all__ = ["OBJECTIVES", "PRIMARY", "Objective", "objective", "scored_contexts"]
