"""``mix``: a composite of other objectives over one batch (docs/DESIGN.md, "Losses"). Its options
name the parents and their weights, ``objectives.mix.parents: {opsd: 0.5, grpo: 0.5}`` (registered
names or ``module:attribute`` plug-ins); each parent keeps its own options in its own section
(``objectives.opsd.beta``, ``objectives.grpo.clip_high``, ...). Modes, per loss token t of a
sample with reward r:

- ``sum``: loss_t = sum_i w_i loss_i,t, each parent's own per-token loss.
- ``advantage`` (SDPO, arXiv 2601.20802): A_t = sum_i w_i A_i,t, each parent's per-token advantage
  (GRPO: the group-normalised reward; OPSD: log p_T(y_t) - log p_S(y_t), its sampled-token
  objective's, whatever its ``objective``; an option its advantage does not read, such as OPSD's
  ``anchor`` or ``beta``, is refused here); contrastive: RLCSD's modulated one), in the clipped
  ratio of the first parent that has one (GRPO's options: clip_low, clip_high, old_logprobs).
  With ``{grpo: lambda, opsd: 1 - lambda}`` this is SDPO's lambda blend.
- ``route`` (SRPO, arXiv 2604.02288): two parents; a sample the verifier graded correct (r > 0.5)
  takes ``correct``'s loss, any other the other parent's, each times its weight.

One rollout group serves every parent: rows have GRPO's shape (prompts x rollout.n >= 2, group
advantages computed), and the teacher scores the same samples. One ``loss.temperature`` holds for
all parents: the scorer writes one set of targets and the learner takes one log-softmax per chunk,
so a GRPO parent (whose old policy is the sampler's: loss.temperature = rollout.temperature)
fixes OPSD's targets at the sampling temperature too.

The loss is a mean over every loss token of the batch, whichever parent a token went to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

import torch

from opsd.errors import ConfigError
from opsd.objectives.base import FIELD_SHAPES, Objective, choice, per_token

MODES = ("sum", "advantage", "route")
SHARED = ("sampled_ids", "weight", "advantages", "scale")  # per-token inputs every parent sees as they are


@dataclass
class MixOptions:
    mode: str = "sum"  # sum | advantage | route
    parents: Dict[str, float] = field(default_factory=dict)  # objective -> weight
    correct: Optional[str] = None  # route: the parent of the samples graded correct


@dataclass(frozen=True)
class Parent:
    algo: str
    weight: float
    options: Any


@dataclass(frozen=True)
class MixPlan:
    """What the learner gets as the composite's options: each parent with its weight and its own
    options, as their config check made them."""

    mode: str
    parents: tuple[Parent, ...]
    correct: Optional[str] = None


def _obj(name: str) -> Objective:
    from opsd.objectives import objective

    return objective(name)


class Mix(Objective):
    name = "mix"
    groups = True  # a hybrid's rows have GRPO's shape
    Options = MixOptions

    def parent_names(self, section: Any) -> list[str]:
        return list((section or {}).get("parents") or {})

    def options(self, cfg):
        o = super().options(cfg)
        return MixPlan(o.mode, tuple(Parent(n, float(w), _obj(n).options(cfg)) for n, w in o.parents.items()),
                       o.correct)

    def _parents(self, cfg) -> list[Objective]:
        return [_obj(p.algo) for p in self.options(cfg).parents]

    # --- what the run needs: the parents' declarations, combined ---------------------------------

    def responses(self, cfg):
        return self._parents(cfg)[0].responses(cfg)

    def teacher(self, cfg):
        kinds = {p.teacher(cfg) for p in self._parents(cfg)} - {None}
        return kinds.pop() if kinds else None

    def targets(self, cfg):
        scored = [p.targets(cfg) for p in self._parents(cfg) if p.teacher(cfg) is not None]
        return "topk" if "topk" in scored else "token"

    def contexts(self, cfg):
        return tuple(dict.fromkeys(c for p in self._parents(cfg) for c in p.contexts(cfg)))

    def reference_contexts(self, cfg):
        return tuple(dict.fromkeys(c for p in self._parents(cfg) for c in p.reference_contexts(cfg)))

    def needs(self, cfg):
        # Group advantages and the routing read the verifier's grades.
        return frozenset({"answer"}).union(*(p.needs(cfg) for p in self._parents(cfg)))

    def check(self, cfg):
        plan = self.options(cfg)
        choice(self.key("mode"), plan.mode, MODES)
        if len(plan.parents) < 2:
            raise ConfigError(f"config key '{self.key('parents')}' = {[p.algo for p in plan.parents]}: a mix needs at "
                              "least two parent objectives with weights, e.g. {opsd: 0.5, grpo: 0.5}")
        parents = self._parents(cfg)
        for p, obj in zip(plan.parents, parents):
            if isinstance(obj, Mix):
                raise ConfigError(f"config key '{self.key('parents')}' names {p.algo!r}, itself a mix; list its "
                                  "parents instead")
            if p.weight < 0:
                raise ConfigError(f"config key '{self.key('parents')}.{p.algo}' = {p.weight}; expected a weight >= 0")
            obj.check(cfg)
        first = parents[0]
        for p, obj in zip(plan.parents[1:], parents[1:]):
            if obj.responses(cfg) != first.responses(cfg):
                raise ConfigError(
                    f"config key '{self.key('parents')}': {plan.parents[0].algo} trains on "
                    f"{first.responses(cfg)} responses and {p.algo} on {obj.responses(cfg)} ones: they cannot share a "
                    "batch; mix objectives that train on the same responses (the student's own samples)")
        if {obj.teacher(cfg) for obj in parents} >= {"context", "reference"}:
            named = [p.algo for p, obj in zip(plan.parents, parents) if obj.teacher(cfg) == "reference"]
            raise ConfigError(
                f"config key '{self.key('parents')}': {named} score the student's own prompt as the primary teacher "
                "(GRPO's kl_coef reference) and the others a teacher context: a batch has one primary teacher; "
                "set that parent's kl_coef=0 (OPSD's objectives.opsd.anchor is a KL to the initial policy)")
        if cfg.rollout.n < 2:
            raise ConfigError(f"config key 'rollout.n' = {cfg.rollout.n} with algo=mix: a hybrid's rows have GRPO's "
                              "shape (its advantages are normalised per group); set rollout.n >= 2")
        if plan.mode == "advantage":
            lacking = [p.algo for p, obj in zip(plan.parents, parents) if type(obj).advantage is Objective.advantage]
            if lacking:
                raise ConfigError(f"config key '{self.key('mode')}' = advantage: {lacking} declare no per-token "
                                  "advantage (Objective.advantage); use mode=sum or route")
            for p, obj in zip(plan.parents, parents):
                if obj.Options is None:
                    continue
                default = obj.Options()
                for name in obj.advantage_ignores:
                    if getattr(p.options, name) != getattr(default, name):
                        raise ConfigError(
                            f"config key '{obj.key(name)}' = {getattr(p.options, name)!r} with "
                            f"{self.key('mode')}=advantage: {p.algo}'s advantage does not read it, so it would do "
                            f"nothing; unset it, or use mode=sum or route, where {p.algo}'s own loss reads it")
            if self._ratio_parent(plan) is None:
                raise ConfigError(f"config key '{self.key('mode')}' = advantage needs a parent with a clipped ratio "
                                  "(grpo or contrastive) whose options the blended advantage is trained with")
        if plan.mode == "route":
            names = [p.algo for p in plan.parents]
            if len(names) != 2 or plan.correct not in names:
                raise ConfigError(f"config key '{self.key('correct')}' = {plan.correct!r} with mode=route: route needs "
                                  f"exactly two parents and correct naming one of them; parents are {names}")

    @staticmethod
    def _ratio_parent(plan: MixPlan) -> Parent | None:
        from opsd.objectives.grpo import GrpoOptions

        return next((p for p in plan.parents if isinstance(p.options, GrpoOptions)), None)

    # --- the loss ----------------------------------------------------------------------------

    @staticmethod
    def _sub(spec, parent: Parent):
        return replace(spec, algo=parent.algo, options=parent.options)

    def fields(self, spec):
        # The group advantages are every hybrid's (groups = True): declared, so that a padding
        # micro-batch carries them too.
        own = ("advantages",) + (("reward",) if spec.options.mode == "route" else ())
        return own + tuple(f"{p.algo}/{f}" for p in spec.options.parents
                           for f in _obj(p.algo).fields(self._sub(spec, p)) if f not in SHARED)

    def inputs(self, spec, batch):
        found = {}
        if batch.has_teacher:
            # The primary teacher's sampled-token logprobs: kl_sampled in the metrics row.
            found["teacher_logprobs"] = batch.column("teacher_token_logprobs", torch.float32)
        if spec.options.mode == "route":
            found["reward"] = per_token(batch, batch.sub.column("reward").to_pylist())
        for p in spec.options.parents:
            for name, value in _obj(p.algo).inputs(self._sub(spec, p), batch).items():
                found[f"{p.algo}/{name}"] = value
        return found

    def _view(self, t: dict, parent: Parent) -> dict:
        """The per-token inputs as the parent's own loss reads them."""
        view = {name: None for name in FIELD_SHAPES} | {name: t.get(name) for name in SHARED}
        prefix = parent.algo + "/"
        view.update({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        return view

    def stat_names(self, spec, present):
        plan = spec.options
        names = ["correct_tokens"] if plan.mode == "route" else []
        # mode=advantage trains the blend in one parent's ratio: its statistics are that parent's.
        for p in [self._ratio_parent(plan)] if plan.mode == "advantage" else plan.parents:
            mine = {k.removeprefix(p.algo + "/") for k in present if k.startswith(p.algo + "/")} | (present & set(SHARED))
            names += [f"{p.algo}/{n}" for n in _obj(p.algo).stat_names(self._sub(spec, p), mine)]
        return names

    def loss(self, spec, logits, logp, lp_sampled, t):
        plan = spec.options
        parts: dict[str, torch.Tensor] = {}
        if plan.mode == "advantage":
            blend = sum(p.weight * _obj(p.algo).advantage(self._sub(spec, p), lp_sampled, self._view(t, p))
                        for p in plan.parents)
            ratio = self._ratio_parent(plan)
            loss, own = _ratio_loss(self._sub(spec, ratio), logits, lp_sampled, self._view(t, ratio), blend)
            parts.update({f"{ratio.algo}/{k}": v for k, v in own.items()})
            return loss, parts
        losses, own = {}, {}
        for p in plan.parents:
            losses[p.algo], own[p.algo] = _obj(p.algo).loss(self._sub(spec, p), logits, logp, lp_sampled,
                                                           self._view(t, p))
        if plan.mode == "sum":
            parts.update({f"{algo}/{k}": v for algo, mine in own.items() for k, v in mine.items()})
            return sum(p.weight * losses[p.algo] for p in plan.parents), parts
        correct = t["reward"] > 0.5  # [n]; NaN (ungraded) is not correct
        parts["correct_tokens"] = correct
        right = next(p for p in plan.parents if p.algo == plan.correct)
        wrong = next(p for p in plan.parents if p.algo != plan.correct)
        # Each parent's statistics count the tokens routed to it only.
        for p, routed in ((right, correct), (wrong, ~correct)):
            parts.update({f"{p.algo}/{k}": torch.where(routed, v, torch.zeros_like(v)) for k, v in own[p.algo].items()})
        loss = torch.where(correct, right.weight * losses[right.algo], wrong.weight * losses[wrong.algo])
        return loss, parts

    def row(self, stats, tokens):
        out: dict[str, float | None] = {}
        if "correct_tokens" in stats:
            out["correct_frac"] = stats["correct_tokens"] / tokens
        parents = dict.fromkeys(k.rpartition("/")[0] for k in stats if "/" in k)
        for algo in parents:
            mine = {k[len(algo) + 1:]: v for k, v in stats.items() if k.startswith(algo + "/")}
            obj = _obj(algo)
            out.update({f"{obj.name}/{k}": v for k, v in obj.row(mine, tokens).items()})
        return out


def _ratio_loss(spec, logits, lp_sampled, t, advantages):
    from opsd.objectives.grpo import ratio_loss

    return ratio_loss(spec, logits, lp_sampled, t, advantages)


OBJECTIVE = Mix()
