"""Small helpers every bench uses to turn repeated timings into figures."""

from __future__ import annotations

import statistics

MB = 2**20


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")
