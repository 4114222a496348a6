"""``majority``: solution-free. The hint is what the student's own ``rollout.n`` samples of the prompt
agree on (U-OPSD, arXiv 2608.06296; SSOPD, 2605.17497, keys the same choice on the verifier
instead): no solution and no answer is read, so it runs on a dataset of problems alone.

- The answers are the samples' final answers under ``grading.extract``, compared after
  normalisation (spacing, ``\\dfrac``, ``\\left``, ``$``, a final period, case). A sample with no
  extractable answer votes for nothing but counts in the group (U-OPSD's denominator).
- The majority is the most frequent answer. A tie is broken by the run's seed, the step and the
  prompt (U-OPSD breaks it at random): the same in every process and on resume.
- When the majority holds less than ``teacher.min_agreement`` of the group (0.5, U-OPSD's
  threshold), or no sample has an answer, the prompt is left out of this step's loss: its samples
  are kept in the batch with an empty loss mask (``context_skipped`` in metrics.jsonl).
- The hint is, by ``teacher.majority_hint``: ``shortest``, the shortest agreeing sample itself (U-OPSD's
  default; a full worked trace, as a reference solution would be), or ``answer``, the majority
  answer alone ("The final answer is \\boxed{...}.").

Deviation from U-OPSD: every sample of the prompt is distilled, not only the longest disagreeing one.

Not for code rows (refused before a run starts): there is no final answer to vote on.
"""

from collections import Counter
from types import MappingProxyType

from opsd.contexts.answer import answer_hint
from opsd.contexts.base import PRIMARY, TeacherContext, deterministic_pick
from opsd.errors import ConfigError
from opsd.verify import normalise_answer


def majority_vote(answers: list[str | None], seed: int, salt: str) -> tuple[str | None, float]:
    """The majority answer (normalised) and its share of all samples, answerless ones included."""
    votes = [normalise_answer(a) for a in answers if a is not None and a.strip()]
    if not votes:
        return None, 0.0
    counts = Counter(votes)
    top = max(counts.values())
    tied = sorted(a for a, c in counts.items() if c == top)
    winner = tied[0] if len(tied) == 1 else deterministic_pick(tied, seed, salt)
    return winner, top / len(answers)


class Majority(TeacherContext):
    name = "majority"
    uses_samples = True
    refused_tasks = MappingProxyType({
        "code": "it votes on the final answers the samples write (grading.extract), and a code response has none: "
                "it is graded by running its tests, and two programs that pass the same tests may share no line"})

    def note(self, cfg):
        if cfg.rollout.n < 2:
            return (f"teacher.context=majority with rollout.n={cfg.rollout.n}: the majority of one sample is that "
                    "sample, so the teacher reads the student's own answer; set rollout.n >= 2 (U-OPSD uses 8)")
        return None

    def check(self, cfg):
        if cfg.teacher.majority_hint not in ("shortest", "answer"):
            raise ConfigError(f"config key 'teacher.majority_hint' = {cfg.teacher.majority_hint!r}; expected "
                              "'shortest' or 'answer'")
        if not 0.0 <= cfg.teacher.min_agreement <= 1.0:
            raise ConfigError(f"config key 'teacher.min_agreement' = {cfg.teacher.min_agreement}; expected 0..1")

    def build(self, cfg, item, templates):
        winner, share = majority_vote([s.answer for s in item.group], item.seed, item.problem.uid)
        if winner is None or share < cfg.teacher.min_agreement:
            return {PRIMARY: None}
        agreeing = [s for s in item.group if s.answer is not None and normalise_answer(s.answer) == winner]
        if cfg.teacher.majority_hint == "answer":
            hint = answer_hint(agreeing[0].answer.strip())
        else:
            hint = min(agreeing, key=lambda s: s.tokens).text  # the first of the shortest, in sample order
        return {PRIMARY: templates.teacher(item.problem.problem, hint)}


MAJORITY = Majority()
