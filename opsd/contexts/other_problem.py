"""``other_problem``: the worked solution of a different training problem (OP²SD, arXiv 2608.09228),
said to be of another problem, where the reference solution would stand.

Each problem gets one donor for the whole run, chosen from the seed (the dataset view's
``other(0)``: never itself, never a problem of the same text), as OP²SD fixes one donor per row.
The teacher is told the example is of a different problem and not to reuse its answer, as in
OP²SD's prompt; the wording here is shorter and sits in the run's own teacher template.
"""

from opsd.contexts.base import PRIMARY, TeacherContext


def donor_hint(problem: str, solution: str) -> str:
    return ("The following worked example is of a different problem, not of this one; it shows how such "
            "problems are solved, and its answer is not this problem's answer.\n"
            f"Example problem: {problem}\nExample solution: {solution}")


class OtherProblem(TeacherContext):
    name = "other_problem"

    def needs(self, cfg):
        return frozenset({"solution"})

    def build(self, cfg, item, templates):
        donor = item.other(0)
        return {PRIMARY: templates.teacher(item.problem.problem, donor_hint(donor.problem, donor.solution))}


OTHER_PROBLEM = OtherProblem()
