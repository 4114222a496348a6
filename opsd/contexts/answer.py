"""``answer``: the final answer only, where the reference solution would stand (an ablation of
the privileged information; for tasks whose data has answers and no worked solutions)."""

from types import MappingProxyType

from opsd.contexts.base import PRIMARY, TeacherContext, boxed


def answer_hint(answer: str) -> str:
    return f"The final answer is {boxed(answer)}."


class Answer(TeacherContext):
    name = "answer"
    refused_tasks = MappingProxyType({"code": "it shows the final answer alone, and a code row has none (it is graded "
                                              "by running its tests)"})

    def needs(self, cfg):
        return frozenset({"answer"})

    def build(self, cfg, item, templates):
        return {PRIMARY: templates.teacher(item.problem.problem, answer_hint(item.problem.answer))}


ANSWER = Answer()
