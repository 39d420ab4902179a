"""Statistics of the comparison over seeds: mean with its 95% t interval, paired t-test against the
baseline, Holm correction over the variants compared, verdict, and the minimal detectable difference.

Pure numpy/scipy; ``diffs`` are always the paired differences (variant - baseline) over the seeds
both ran, along the last axis."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import cast

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

ALPHA = 0.05  # family-wise error rate of the verdicts
POWER = 0.8  # power at which the minimal detectable difference is given


def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, half-width of its two-sided 95% Student-t interval (NaN below 2 values) and count; NaNs dropped."""
    xs = np.asarray(list(values), float)  # None -> NaN
    xs = xs[~np.isnan(xs)]
    if len(xs) == 0:
        return math.nan, math.nan, 0
    if len(xs) == 1:
        return float(xs[0]), math.nan, 1
    half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return float(xs.mean()), float(half), len(xs)


def paired_p_value(diffs: ArrayLike) -> np.ndarray | float:
    """Two-sided p-value of the paired t-test (mean difference 0) along the last axis; NaN below 2
    differences. Zero spread, where the t statistic is x/0: 0 when the differences are equal and
    non-zero (a difference without noise), 1 when they are all 0."""
    d = np.asarray(diffs, float)
    if d.shape[-1] < 2:
        return np.full(d.shape[:-1], np.nan)[()]
    with warnings.catch_warnings():  # scipy warns on (nearly) constant data; handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        # scipy makes its result bunches at runtime: pyright sees no pvalue
        p = stats.ttest_1samp(d, 0.0, axis=-1).pvalue  # pyright: ignore[reportAttributeAccessIssue]
    flat = np.ptp(d, axis=-1) == 0
    return np.where(flat, np.where(d[..., 0] == 0, 1.0, 0.0), p)[()]


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values along the last axis (the variants of one comparison): the
    k-th smallest of m times (m - k + 1), made non-decreasing, capped at 1. NaNs (no test) are left
    out of m and stay NaN. Written here because scipy has no Holm (``false_discovery_control`` is BH/BY)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p, axis=-1)  # NaNs last
    m = np.sum(~np.isnan(p), axis=-1, keepdims=True)
    scaled = (m - np.arange(p.shape[-1])) * np.take_along_axis(p, order, -1)
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(np.maximum.accumulate(scaled, axis=-1), 1.0), -1)
    return adjusted


def verdict(mean_diff: float, p_adjusted: float, n_paired: int, lower_better: bool = True) -> str:
    """``better``/``worse`` (by the sign of the mean difference) when ``p_adjusted < ALPHA``, else
    ``no clear difference``; ``too few seeds`` below 2 paired seeds. (The baseline's row: ``baseline``.)"""
    if n_paired < 2 or math.isnan(p_adjusted):
        return "too few seeds"
    if p_adjusted >= ALPHA:
        return "no clear difference"
    return "better" if (mean_diff < 0) == lower_better else "worse"


def mdd(sd: float, n: int, level: float = ALPHA, power: float = POWER) -> float:
    """Minimal detectable difference: the smallest |mean difference| that a two-sided paired t-test at
    ``level`` over ``n`` pairs detects with probability ``power`` when the differences have standard
    deviation ``sd`` (same units). The table passes the observed spread and ALPHA/m, the strictest Holm
    level (the one the smallest of m p-values must beat): conservative for the other steps. Exact: the
    t statistic is noncentral t, n - 1 degrees of freedom, noncentrality difference·√n/sd (its lower
    tail as ``sf`` at -nc: ``cdf`` gives NaN far out). NaN below 2 pairs; 0 for zero spread (any
    difference shows)."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df, crit = n - 1, stats.t.ppf(1 - level / 2, n - 1)
    reject = lambda nc: stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc) - power  # P(|T| > crit) - power
    high = 2 * crit + 4
    while reject(high) < 0:
        high *= 2
    root = cast(float, optimize.brentq(reject, 0.0, high))  # without full_output: the root alone, not (root, info)
    return root * sd / math.sqrt(n)
