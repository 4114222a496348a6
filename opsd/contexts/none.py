"""``none``: the student's own context, word for word (the control: whatever OPSD gains with it is
not privileged information; with a fixed teacher the targets are the initial policy's)."""

from opsd.contexts.base import PRIMARY, TeacherContext


class NoContext(TeacherContext):
    name = "none"

    def build(self, cfg, item, templates):
        return {PRIMARY: templates.student(item.problem.problem, item.problem.task)}


NONE = NoContext()
