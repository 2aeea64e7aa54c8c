"""Statistics shared by the benchmark scripts (standard library only: the hivemind worker
imports this from inside its own virtual environment)."""

from __future__ import annotations

import math


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics, as numpy.percentile does by default."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)
