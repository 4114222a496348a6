"""``contrastive``: the teacher under the correct hint and under wrong ones (RLCSD, arXiv 2606.11709),
each scored on the same sample; the ``contrastive`` objective turns the difference into token
credit (opsd/objectives/contrastive.py).

Every hint has the same form, so that only its content differs between the contexts (RLCSD's
template): a worked solution followed by "Correct final answer: \\boxed{...}".

- ``teacher`` (the correct context): the reference solution and the dataset's answer (RLCSD's
  ``gt_cot`` hint source).
- ``wrong_0`` .. ``wrong_{K-1}`` (K = ``teacher.wrong_contexts``), by ``teacher.wrong_from``:
  ``group``, the student's own samples of the prompt that the verifier graded wrong and that
  wrote an answer, the sample being scored left out of its own pool (RLCSD's self-rollout wrong
  hints), up to K of them chosen by the seed; or ``other_problems``, the solutions and answers of
  K other training problems (the dataset view), for runs with one sample per prompt. A wrong
  context with nothing to fill it is absent for that sample (null in the batch).

Not for code rows (refused before a run starts): its hints are built around a final answer.
"""

import random
from types import MappingProxyType

from opsd.contexts.base import PRIMARY, TeacherContext, boxed
from opsd.errors import ConfigError


def hint(solution: str, answer: str) -> str:
    return f"{solution}\n\nCorrect final answer: {boxed(answer.strip())}"


class Contrastive(TeacherContext):
    name = "contrastive"
    uses_samples = True
    refused_tasks = MappingProxyType({
        "code": "its hints end in the final answer ('Correct final answer: \\boxed{...}') and its wrong hints are "
                "samples whose final answer was graded wrong; a code row has no final answer (it is graded by running "
                "its tests)"})
    per_sample = True  # each sample's wrong pool leaves the sample itself out

    def names(self, cfg):
        return (PRIMARY, *(f"wrong_{k}" for k in range(cfg.teacher.wrong_contexts)))

    def needs(self, cfg):
        return frozenset({"solution", "answer"})

    def check(self, cfg):
        if cfg.teacher.wrong_contexts < 1:
            raise ConfigError(f"config key 'teacher.wrong_contexts' = {cfg.teacher.wrong_contexts}; expected >= 1")
        if cfg.teacher.wrong_from not in ("group", "other_problems"):
            raise ConfigError(f"config key 'teacher.wrong_from' = {cfg.teacher.wrong_from!r}; expected 'group' or "
                              "'other_problems'")
        if cfg.teacher.wrong_from == "group" and cfg.rollout.n < 2:
            raise ConfigError("teacher.context=contrastive with teacher.wrong_from=group takes its wrong hints from "
                              f"the prompt's other samples: it needs rollout.n >= 2 (got {cfg.rollout.n}); or set "
                              "teacher.wrong_from=other_problems")

    def build(self, cfg, item, templates):
        p = item.problem
        out = {PRIMARY: templates.teacher(p.problem, hint(p.solution, p.answer))}
        k = cfg.teacher.wrong_contexts
        if cfg.teacher.wrong_from == "group":
            pool = [(s.text, s.answer) for j, s in enumerate(item.group)
                    if j != item.index and s.reward == 0.0 and s.answer is not None and s.answer.strip()]
            wrong = random.Random(f"{item.seed}:{p.uid}:{item.index}").sample(pool, min(k, len(pool)))
        else:
            wrong = [(o.solution, o.answer) for o in (item.other(i) for i in range(k))]
        for i in range(k):
            out[f"wrong_{i}"] = templates.teacher(p.problem, hint(*wrong[i])) if i < len(wrong) else None
        return out


CONTRASTIVE = Contrastive()
