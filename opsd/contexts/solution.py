"""``solution``: the reference solution (OPSD, arXiv 2601.18734; the default); for a code row, its
reference code."""

from opsd.contexts.base import PRIMARY, TeacherContext


class Solution(TeacherContext):
    name = "solution"

    def needs(self, cfg):
        return frozenset({"solution"})

    def build(self, cfg, item, templates):
        return {PRIMARY: templates.teacher(item.problem.problem, item.problem.solution, item.problem.task)}


SOLUTION = Solution()
