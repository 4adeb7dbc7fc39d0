"""Paired statistics for evaluations: per-case scores of two methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class PairedTest:
    n: int
    median_difference: float  # median of a - b
    statistic: float          # Wilcoxon signed-rank statistic
    p_value: float            # two-sided


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Compare per-case scores a[i], b[i] of two methods with the Wilcoxon
    signed-rank test (scipy.stats.wilcoxon, two-sided; zero differences are
    dropped, as scipy's default 'wilcox' does)."""
    from scipy import stats  # only evaluations need scipy

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D score lists of one length, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    diff = a - b
    if not np.any(diff != 0):
        raise ValueError("all paired differences are zero: the test is undefined")
    res = stats.wilcoxon(a, b)
    return PairedTest(n=int(a.size), median_difference=float(np.median(diff)), statistic=float(res.statistic),
                      p_value=float(res.pvalue))
