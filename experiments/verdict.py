"""The rule that turns per-seed numbers into a verdict, stated once for every claim.

For each arm, the per-seed values ``v_1..v_n`` give a 95% Student-t interval
``mean ± t_{0.975, n-1} · s / sqrt(n)`` (``s`` the sample standard deviation). A claim
"the treatment is better than the reference on metric M" is judged:

- **holds** if the two intervals do not overlap and the treatment's mean is better;
- **does not hold** if the two intervals do not overlap and the reference's mean is better;
- **inconclusive** if the intervals overlap (no difference this experiment can resolve), or
  fewer than 2 seeds were run (no interval).

The rule was fixed before any experiment ran, and is the same for every claim; only the
metric and its direction differ, and each claim's module says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["HOLDS", "INCONCLUSIVE", "NOT_HOLDS", "RULE", "compare", "interval", "summary"]

HOLDS = "holds"
NOT_HOLDS = "does not hold"
INCONCLUSIVE = "inconclusive"
RULE = (
    "mean ± 95% Student-t interval over seeds for each arm; holds if the intervals do not "
    "overlap and the treatment is better, does not hold if they do not overlap and the "
    "reference is better, inconclusive if they overlap (or fewer than 2 seeds)"
)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half_width)`` of the 95% t-interval; half-width NaN for fewer than 2 values."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan
    from scipy.stats import t

    half = float(t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return mean, half


def summary(label: str, values: Sequence[float]) -> dict[str, Any]:
    """One arm for results.json: label, mean, ci95 half-width, interval and per-seed values."""
    mean, half = interval(values)
    return {
        "label": label,
        "mean": mean,
        "ci95": half,
        "interval": [mean - half, mean + half],
        "values": [float(v) for v in values],
    }


def compare(
    treatment: Sequence[float], reference: Sequence[float], *, higher_is_better: bool
) -> tuple[str, str]:
    """The verdict of "treatment beats reference" and a one-line reason with the numbers."""
    t_mean, t_half = interval(treatment)
    r_mean, r_half = interval(reference)
    numbers = f"treatment {t_mean:.4g} ± {t_half:.2g} vs reference {r_mean:.4g} ± {r_half:.2g}"
    if any(map(math.isnan, (t_mean, t_half, r_mean, r_half))):
        return INCONCLUSIVE, f"{numbers}: no interval (fewer than 2 seeds or NaN values)"
    overlap = (t_mean - t_half) <= (r_mean + r_half) and (r_mean - r_half) <= (t_mean + t_half)
    if overlap:
        return INCONCLUSIVE, f"{numbers}: the 95% intervals overlap"
    better = t_mean > r_mean if higher_is_better else t_mean < r_mean
    direction = "higher" if higher_is_better else "lower"
    if better:
        return HOLDS, f"{numbers}: intervals apart, treatment {direction} as claimed"
    return NOT_HOLDS, f"{numbers}: intervals apart, reference {direction}"
