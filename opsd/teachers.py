"""Several teachers (docs/DESIGN.md, "Several teachers"): the ``teachers:`` section, a name -> one
fixed teacher (a model, its context, its scorer pool's settings), and the rule that sends each
training row to one of them (the row's ``teacher.route`` column, else ``teacher.default``).

``teacher.model`` is the one-teacher form and the two are exclusive: a run names one other model
there, or several teachers here. Each teacher is seen by the code below it as a whole run's config
(:func:`teacher_config`): the run's, with that teacher's model, context, options and scorer
settings in the places one teacher keeps them. So its prompts, its checks (item 1's refusals) and
its scorer actors are those of a one-teacher run, and nothing downstream compares teacher names.
This module reads configs only; the pools that score live in launch/teachers.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

from opsd.errors import ConfigError

# The name of the one teacher of a run without a ``teachers:`` section (metrics, errors).
DEFAULT = "teacher"
# Settings a pool may not change: the batch's top-k width and the scoring overlap are the run's,
# the rollout engines hold the student, and custom resources are counted for the scorer section.
RUN_WIDE_SCORER_KEYS = ("topk", "overlap", "on_rollout_engines", "resources")
# A teacher's name goes into metric keys (teacher/<name>/kl) and the batch's teacher column.
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def names(cfg: Any) -> list[str]:
    """The run's teachers, in the order the config lists them (one, :data:`DEFAULT`, without teachers:)."""
    return list(cfg.teachers) or [DEFAULT]


def default_teacher(cfg: Any) -> str:
    """The teacher of a row whose route column is absent or null."""
    return cfg.teacher.default or names(cfg)[0]


def context_key(cfg: Any, name: str) -> str:
    """The config key that sets teacher ``name``'s context, for messages."""
    if cfg.teachers and cfg.teachers[name].context is not None:
        return f"teachers.{name}.context"
    return "teacher.context"


def teacher_config(cfg: Any, name: str) -> Any:
    """The run's config as teacher ``name`` sees it: teacher.model, teacher.context and
    teacher.options are the teacher's, the scorer section carries its pool's settings, and
    ``teachers`` is empty. Without a teachers: section, the run's config itself."""
    if not cfg.teachers:
        return cfg
    spec = cfg.teachers[name]
    one = copy.deepcopy(cfg)
    one.teachers = {}
    one.teacher.default = None
    one.teacher.model = spec.model
    if spec.context is not None:
        one.teacher.context = spec.context
    one.teacher.options = {**cfg.teacher.options, **spec.options}
    for key, value in spec.scorer.items():
        try:
            setattr(one.scorer, key, value)
        except Exception as exc:  # OmegaConf's type check of a structured field
            raise ConfigError(f"config key 'teachers.{name}.scorer.{key}' = {value!r}: {str(exc).splitlines()[0]}") from None
    return one


def teacher_configs(cfg: Any) -> dict[str, Any]:
    """name -> :func:`teacher_config`, for every teacher of the run."""
    return {name: teacher_config(cfg, name) for name in names(cfg)}


def routing(cfg: Any) -> dict:
    """What load_problems needs to keep each row's teacher: the route column and the known names
    (nothing without a teachers: section)."""
    if not cfg.teachers:
        return {}
    return dict(route_key=cfg.teacher.route, routes=tuple(cfg.teachers))


def check_teachers(cfg: Any, check: Callable[[Any], None], scorer_keys: set[str]) -> None:
    """What several teachers can and cannot be, each refusal naming the key to change; then each
    teacher's config passes ``check``, the checks of a one-teacher run's (opsd.config.check, given
    by config.py with the scorer section's keys, which this module does not import)."""
    from opsd.objectives import objective, scored_contexts

    if not cfg.teachers:
        if cfg.teacher.default is not None:
            raise ConfigError(f"config key 'teacher.default' = {cfg.teacher.default!r} without a teachers: section; "
                              "it names the teacher of rows without a route, one of teachers:")
        return
    known = list(cfg.teachers)
    these = f"teachers: {known}"
    if cfg.teacher.model is not None:
        raise ConfigError(
            f"config keys 'teacher.model' = {cfg.teacher.model!r} and 'teachers' are both set: teacher.model is the "
            f"one-teacher form of teachers:; move it to teachers.<name>.model, or unset teachers ({these})")
    if cfg.teacher.default is not None and cfg.teacher.default not in cfg.teachers:
        raise ConfigError(f"config key 'teacher.default' = {cfg.teacher.default!r} names no teacher; the teachers "
                          f"are {known}")
    if not cfg.teacher.route.strip():
        raise ConfigError("config key 'teacher.route' is empty; name the data column that holds each row's teacher")
    if cfg.teacher.mode != "fixed":
        raise ConfigError(
            f"config key 'teacher.mode' = {cfg.teacher.mode} with {these}: several teachers are fixed models (a live "
            "or EMA teacher is the one copy of the student that follows its pushes); set teacher.mode=fixed")
    if cfg.scorer.on_rollout_engines:
        raise ConfigError(
            f"config key 'scorer.on_rollout_engines' = true with {these}: each teacher is scored by a scorer pool of "
            "its own, and the rollout engines hold the student; set scorer.on_rollout_engines=false")
    if objective(cfg.algo).teacher(cfg) != "context":
        raise ConfigError(
            f"config key 'teachers' is set with algo={cfg.algo}, which does not distil from a teacher context (it "
            "scores nothing, or only a frozen reference of the student); unset teachers, or choose opsd, kd or "
            "contrastive")
    contexts = {}
    for name, spec in cfg.teachers.items():
        if not NAME.match(name):
            raise ConfigError(f"config key 'teachers.{name}': a teacher's name is letters, digits, '_', '-' and '.', "
                              "starting with a letter or digit (it goes into metric keys teacher/<name>/...)")
        for key in spec.scorer:
            if key in RUN_WIDE_SCORER_KEYS:
                raise ConfigError(f"config key 'teachers.{name}.scorer.{key}' is the run's, not one teacher's; set "
                                  f"scorer.{key} instead")
            if key not in scorer_keys:
                raise ConfigError(f"config key 'teachers.{name}.scorer.{key}' is not a scorer setting; expected one "
                                  f"of {sorted(scorer_keys - set(RUN_WIDE_SCORER_KEYS))}")
        one = teacher_config(cfg, name)
        try:
            check(one)
        except ConfigError as exc:
            raise ConfigError(f"teachers.{name}: {exc}") from None
        contexts[name] = scored_contexts(one)
    first = known[0]
    for name in known[1:]:
        if contexts[name] != contexts[first]:
            raise ConfigError(
                f"config key '{context_key(cfg, name)}': teacher {name!r} is scored under the contexts "
                f"{contexts[name]}, teacher {first!r} under {contexts[first]}; one batch holds one set of teacher "
                "columns, so the teachers' contexts must give the objective the same named contexts")
