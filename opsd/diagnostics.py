"""Collapse diagnostics: is a run's output turning into long, repetitive, never-ending answers?
(docs/DESIGN.md, "Collapse diagnostics"; issue 36)

On-policy distillation can inflate lengths until truncated, repetitive responses dominate
(arXiv 2604.08527). Three measurements tell the causes apart, each a pure function here:

- the repeated n-gram rate of a response (repetition);
- the teacher's and the student's probability of stopping at the last position of each response,
  truncated and finished apart (does the teacher want to stop where the student does not?);
- the truncated share and the mean length, which the metrics row already keeps.

Torch and numpy only: the learner calls :func:`stop_probability` inside its forward, the driver and
the evaluation call the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

NGRAM = 4
# The finish reasons whose last positions are measured, and the names the metrics use for them.
KINDS = {"length": "truncated", "stop": "finished"}


def repeated_ngram_rate(ids: Sequence[int], n: int = NGRAM) -> float | None:
    """The share of a response's n-grams (of token ids) that occur earlier in the same response,
    an earlier occurrence being one that starts at an earlier position (overlaps count). None for
    a response shorter than n: it has no n-gram to repeat."""
    total = len(ids) - n + 1
    if total <= 0:
        return None
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for i in range(total):
        gram = tuple(int(t) for t in ids[i : i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated / total


def mean_repeated_ngram_rate(responses: Iterable[Sequence[int]], n: int = NGRAM) -> float | None:
    """The mean of :func:`repeated_ngram_rate` over the responses that have an n-gram (None: none has)."""
    rates = [r for r in (repeated_ngram_rate(ids, n) for ids in responses) if r is not None]
    return sum(rates) / len(rates) if rates else None


def stop_token_ids(model: torch.nn.Module) -> list[int]:
    """The ids that end a response in this run: the model's eos id(s) from its config and its
    generation config, which is where vLLM takes its stop ids from (tokenizer eos plus
    generation_config.eos_token_id); sorted, each once."""
    found: list[int] = []
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        found += [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(int(i) for i in found))


def stop_logmass(logits: torch.Tensor, stop_ids: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
    """[n, V] logits -> [n] log of the probability mass on ``stop_ids`` at ``temperature``
    (float32; -inf without stop ids)."""
    logits = logits.float() / temperature
    if not len(stop_ids):
        return torch.full(logits.shape[:1], -math.inf, device=logits.device)
    ids = torch.as_tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    return torch.logsumexp(logits[:, ids], dim=-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def stop_probability(hidden: torch.Tensor, head: torch.nn.Module, stop_ids: Sequence[int],
                     temperature: float = 1.0) -> torch.Tensor:
    """[n, H] final hidden states -> [n] the probability of a stop id there, no gradient. The head is
    called as a module even for n = 0, so that ZeRO-3 (which gathers its weight in a hook) sees the
    same calls on every rank."""
    return stop_logmass(head(hidden.detach()), stop_ids, temperature).exp()


@dataclass
class LastPositions:
    """The last response position of some rows of a micro-batch: where (``rows``, ``cols`` into the
    padded [B, L] sequences), how each response ended (``kinds``: "truncated" or "finished") and the
    teacher's log-probability of stopping there (NaN: not measured for that row)."""

    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cols: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    kinds: list[str] = field(default_factory=list)
    teacher_logp: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, prompt_lens: Sequence[int], responses: Sequence[Sequence[int]], finish_reasons: Sequence[str],
           teacher_stop: Sequence[Sequence[float] | None] | None,
           counted: Sequence[bool] | None = None) -> "LastPositions":
        """Rows ``prompt + response`` in order: the position that predicts each response's last token
        (the teacher's column is per response token, so its entry T - 1 is the same position). Rows
        with an empty response, another finish reason (abort) or not ``counted`` (their teacher
        context did not apply, so the teacher there is not the one that trains: the batch's
        ``context_applied``) are left out. A cut sample out of the loss (``loss.mask_truncated``)
        still counts: its context applied."""
        rows, cols, kinds, teacher = [], [], [], []
        for j, (p, r, why) in enumerate(zip(prompt_lens, responses, finish_reasons)):
            if not len(r) or why not in KINDS or (counted is not None and not counted[j]):
                continue
            rows.append(j)
            cols.append(p + len(r) - 2)
            kinds.append(KINDS[why])
            t = None if teacher_stop is None else teacher_stop[j]
            teacher.append(float("nan") if t is None else float(t[len(r) - 1]))
        return cls(torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long), kinds,
                   np.asarray(teacher, dtype=np.float64))


def counted_rows(loss_masks: Sequence[Sequence[bool]], context_applied: Sequence[bool | None] | None) -> list[bool]:
    """The rows :meth:`LastPositions.of` counts: those whose teacher context applied (the batch's
    ``context_applied``; null, in a batch without a teacher, has no context to leave a row out).
    A cut sample out of the loss under ``loss.mask_truncated`` counts. A batch older than the
    column (``None``, schema version < 5) says so only through a loss token."""
    if context_applied is None:
        return [any(m) for m in loss_masks]
    return [v is not False for v in context_applied]


def stop_sums(student_p: Sequence[float], last: LastPositions) -> dict[str, float]:
    """Summable statistics of one micro-batch (the learner adds them over micro-batches and ranks):
    per kind, the rows and the student's summed stop probability; over the rows the teacher was
    measured on, their count, the teacher's summed stop probability and the summed gap teacher -
    student."""
    student = np.asarray(student_p, dtype=np.float64)
    out: dict[str, float] = {}
    for kind in KINDS.values():
        mine = np.asarray([k == kind for k in last.kinds], dtype=bool)
        teacher = np.exp(last.teacher_logp[mine]) if mine.any() else np.zeros(0)
        measured = ~np.isnan(teacher)
        out[f"stop_rows_{kind}"] = float(mine.sum())
        out[f"stop_student_{kind}_sum"] = float(student[mine].sum())
        out[f"stop_teacher_rows_{kind}"] = float(measured.sum())
        out[f"stop_teacher_{kind}_sum"] = float(teacher[measured].sum())
        out[f"stop_gap_{kind}_sum"] = float((teacher[measured] - student[mine][measured]).sum())
    return out


def stop_metrics(stats: dict) -> dict[str, float | None]:
    """The metrics row's stop probabilities from the summed statistics of :func:`stop_sums`: per
    kind (truncated, finished), the student's mean, the teacher's mean and the mean gap teacher -
    student; None where no row of that kind was measured."""
    out: dict[str, float | None] = {}
    for kind in KINDS.values():
        rows, trows = stats.get(f"stop_rows_{kind}", 0.0), stats.get(f"stop_teacher_rows_{kind}", 0.0)
        out[f"stop_prob_student_{kind}"] = stats.get(f"stop_student_{kind}_sum", 0.0) / rows if rows else None
        out[f"stop_prob_teacher_{kind}"] = stats.get(f"stop_teacher_{kind}_sum", 0.0) / trows if trows else None
        out[f"stop_gap_{kind}"] = stats.get(f"stop_gap_{kind}_sum", 0.0) / trows if trows else None
    return out
