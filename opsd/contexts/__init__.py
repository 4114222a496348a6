"""Teacher contexts as plug-ins: ``teacher.context: NAME`` (docs/DESIGN.md, "Teacher contexts").

One module per context and one line below; a context outside opsd is named ``module:attribute``.
"""

from __future__ import annotations

from opsd.contexts.base import PRIMARY, TeacherContext
from opsd.registry import Registry, RegistryError

_HERE = "opsd.contexts"

CONTEXTS: Registry[TeacherContext] = Registry("teacher.context", {
    "solution": f"{_HERE}.solution:SOLUTION",
    "answer": f"{_HERE}.answer:ANSWER",
    "none": f"{_HERE}.none:NONE",
    "other_problem": f"{_HERE}.other_problem:OTHER_PROBLEM",
    "majority": f"{_HERE}.majority:MAJORITY",
    "contrastive": f"{_HERE}.contrastive:CONTRASTIVE",
})


def context(name: str) -> TeacherContext:
    found = CONTEXTS.get(name)
    if not isinstance(found, TeacherContext):
        raise RegistryError(f"config key 'teacher.context' = {name!r} is not a TeacherContext "
                            f"({type(found).__name__})")
    return found


__all__ = ["CONTEXTS", "PRIMARY", "TeacherContext", "context"]
