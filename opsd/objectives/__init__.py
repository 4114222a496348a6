"""Objectives as plug-ins: ``algo: NAME`` (docs/DESIGN.md, "Registries").

One module per objective and one line below; an objective outside opsd is named
``module:attribute`` (an Objective instance). Its options are the config section
``objectives.<its name>``, declared by its ``Options`` dataclass.
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
    "mix": f"{_HERE}.mix:OBJECTIVE",
})


def objective(name: str) -> Objective:
    found = OBJECTIVES.get(name)
    if not isinstance(found, Objective):
        raise RegistryError(f"config key 'algo' = {name!r} is not an Objective ({type(found).__name__})")
    return found


def run_objective_names(algo: str, sections: Any) -> list[str]:
    """The objectives whose options a run reads: ``algo``, and a composite's parents (named in its
    own section, ``sections[its name]``)."""
    obj = objective(algo)
    return [algo, *obj.parent_names(sections.get(obj.name) or {})] if hasattr(obj, "parent_names") else [algo]


def run_objectives(cfg: Any) -> list[Objective]:
    return [objective(n) for n in run_objective_names(cfg.algo, cfg.objectives)]


def scored_contexts(cfg: Any) -> dict[str, str]:
    """The named teacher contexts the scorer scores for every sample, with the targets it writes for
    each ("topk" or "token"): the primary one when the objective has a teacher, the context
    plug-in's others that the objective reads, and the objective's reference contexts (the student's
    own prompt, e.g. OPSD's anchor). Empty: no scorer."""
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
    found.update({name: "token" for name in obj.reference_contexts(cfg)})
    return found


__all__ = ["OBJECTIVES", "PRIMARY", "Objective", "objective", "run_objective_names", "run_objectives",
           "scored_contexts"]
