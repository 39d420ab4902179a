"""``gpt2exp.report.stats``: intervals, paired p-values, Holm, verdicts and the minimal detectable
difference, against scipy and hand-computed values, and by simulation (power, family-wise error)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gpt2exp.report.stats import ALPHA, POWER, holm, mdd, mean_ci, paired_p_value, verdict

T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # Student t, 97.5% quantile, 2 degrees of freedom (closed form)


def test_mean_ci() -> None:
    mean, half, n = mean_ci([1.0, 2.0, 3.0, float("nan"), None])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(T_975_DF2 / math.sqrt(3), rel=1e-12)
    xs = np.random.default_rng(0).normal(size=40)
    lo, hi = stats.t.interval(0.95, 39, loc=xs.mean(), scale=stats.sem(xs))
    assert mean_ci(xs)[1] == pytest.approx((hi - lo) / 2, rel=1e-12)
    mean, half, n = mean_ci([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(half)
    mean, half, n = mean_ci([])
    assert math.isnan(mean) and math.isnan(half) and n == 0


def test_paired_p_value_is_scipy_ttest_rel() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    expected = stats.ttest_rel(a, b, axis=-1).pvalue
    np.testing.assert_allclose(paired_p_value(a - b), expected, rtol=1e-12)  # vectorised over leading axes
    assert paired_p_value(a[0] - b[0]) == pytest.approx(expected[0], rel=1e-12)
    assert math.isnan(paired_p_value([0.3])) and math.isnan(paired_p_value([]))
    # zero spread: t = x/0; equal non-zero differences are a difference without noise, all-zero is none
    assert paired_p_value([0.1, 0.1, 0.1]) == 0.0 and paired_p_value([0.0, 0.0]) == 1.0
    np.testing.assert_array_equal(paired_p_value([[2.0, 2.0], [0.0, 0.0]]), [0.0, 1.0])


def test_holm_by_hand() -> None:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])  # 3·0.01; max(2·0.03, ·); max(1·0.04, 0.06)
    np.testing.assert_allclose(holm([0.01, 0.02, 0.025]), [0.03, 0.04, 0.04])  # monotone: 0.025 would undercut 0.04
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped
    np.testing.assert_allclose(holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])  # NaN: no test, not counted in m
    np.testing.assert_allclose(holm([0.0, 0.2]), [0.0, 0.2])
    rows = np.random.default_rng(2).uniform(size=(50, 4))
    np.testing.assert_allclose(holm(rows), [holm(r) for r in rows])  # vectorised over leading axes


def test_verdict() -> None:
    assert verdict(-0.1, 0.01, 3) == "better" and verdict(0.1, 0.01, 3) == "worse"
    assert verdict(-0.1, 0.01, 3, lower_better=False) == "worse" and verdict(0.1, 0.01, 3, lower_better=False) == "better"
    assert verdict(-0.1, ALPHA, 3) == "no clear difference" and verdict(-0.1, 0.2, 5) == "no clear difference"
    assert verdict(-0.1, math.nan, 1) == "too few seeds" and verdict(-0.1, 0.01, 1) == "too few seeds"


@pytest.mark.parametrize(("n", "m"), [(3, 4), (5, 1), (2, 2)])
def test_mdd_has_the_stated_power(n: int, m: int) -> None:
    """Differences of mean mdd, sd sd: the paired t-test at level ALPHA/m rejects in 80% ± 3% of 20,000 draws."""
    sd, level = 0.7, ALPHA / m
    delta = mdd(sd, n, level)
    d = np.random.default_rng(n * 10 + m).normal(delta, sd, size=(20_000, n))
    power = np.mean(paired_p_value(d) < level)
    assert power == pytest.approx(POWER, abs=0.03)
    assert mdd(2 * sd, n, level) == pytest.approx(2 * delta, rel=1e-9)  # in the metric's units
    assert mdd(sd, n, ALPHA) < delta or m == 1  # a stricter level needs a larger difference


def test_mdd_edge_cases() -> None:
    assert mdd(0.0, 3) == 0.0 and math.isnan(mdd(1.0, 1)) and math.isnan(mdd(math.nan, 3))
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    assert mdd(1.0, 2000) == pytest.approx(z / math.sqrt(2000), rel=1e-3)  # many seeds: the normal approximation


def test_holm_verdicts_keep_the_family_wise_error() -> None:
    """4,000 null comparisons (4 variants x 3 seeds against one shared baseline, no true difference)
    through the table's path (paired_p_value -> holm -> verdict): at most 5% of them (+2 standard
    errors) give any better/worse verdict; without the correction clearly more do."""
    k, variants, seeds = 4000, 4, 3
    finals = np.random.default_rng(3).normal(size=(k, variants + 1, seeds))  # [:, 0]: the baseline
    diffs = finals[:, 1:] - finals[:, :1]
    p = paired_p_value(diffs)
    means = diffs.mean(-1)

    def rate(p_used: np.ndarray) -> float:
        calls = [[verdict(d, q, seeds) for d, q in zip(dm, qs, strict=True)] for dm, qs in zip(means, p_used, strict=True)]
        return np.mean([any(v in ("better", "worse") for v in family) for family in calls])

    corrected, uncorrected = rate(holm(p)), rate(p)
    assert corrected <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / k)
    assert uncorrected >= 0.12  # ~17%: the test has teeth
