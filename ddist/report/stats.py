"""The report's statistics over seeds, on plain lists of floats.

An accuracy cell: n seeds, the mean, the sample standard deviation (ddof=1) and a 95% confidence
interval from Student's t: mean ± t_{0.975, n-1} · sd / √n. The gain over random real is paired by
seed (each run evaluated random real images at its own seed beside its set): the differences
d_i = 100 (acc_i - random_i), in percentage points, get the same interval, a two-sided paired t-test
(a one-sample t-test of the d_i against 0) and, for few seeds, an exact two-sided sign test
(binomial, p = 1/2, zero differences dropped). A cell whose gain interval covers 0 is not
distinguishable from random real ("n.d."); above it lies wholly above 0, below wholly below.

One seed has no spread: sd, interval and p-values are None (rendered "-"). Differences that are all
equal (sd = 0, e.g. a random-real run against itself) have an interval of width 0 and a t-test
p-value of 1 when they are 0, else 0 (the t statistic is infinite).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95
# below this many pairs the report adds the exact sign test (the t-test leans on normality there)
SIGN_TEST_BELOW = 6
NOT_DISTINGUISHABLE, ABOVE, BELOW = "n.d.", "above", "below"


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample sd (ddof=1) and the 95% t interval (sd, half_width, low, high: None at n = 1)."""

    n: int
    mean: float
    sd: float | None
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


@dataclass(frozen=True)
class Paired:
    """Paired differences: their summary, the two-sided paired t-test's and sign test's p-values, and the verdict."""

    diff: Summary
    t_p: float | None
    sign_p: float | None
    verdict: str  # NOT_DISTINGUISHABLE, ABOVE, BELOW, or "-" (one pair: no interval)


def t_quantile(n: int) -> float:
    """t_{0.975, n-1}, the two-sided 95% quantile of Student's t with n - 1 degrees of freedom (n >= 2)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def summarize(values: list[float]) -> Summary:
    """Mean, sample sd (ddof=1) and the 95% interval mean ± t_{0.975,n-1} · sd/√n of n >= 1 values."""
    if not values:
        raise ValueError("no values to summarize")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, None, None)
    sd = statistics.stdev(values)
    return Summary(n, mean, sd, t_quantile(n) * sd / math.sqrt(n))


def t_test_p(diffs: list[float]) -> float | None:
    """Two-sided p-value of the one-sample t-test of the differences against 0 (= the paired t-test)."""
    if len(diffs) < 2:
        return None
    if statistics.stdev(diffs) == 0:
        return 1.0 if diffs[0] == 0 else 0.0
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def sign_test_p(diffs: list[float]) -> float | None:
    """Exact two-sided sign test: the positive differences among the nonzero ones against Binomial(m, 1/2)."""
    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return None
    from scipy import stats

    return float(stats.binomtest(sum(d > 0 for d in nonzero), len(nonzero), 0.5).pvalue)


def verdict(diff: Summary) -> str:
    """Whether the gain's interval lies above 0, below it, or covers it ("n.d."); "-" without an interval."""
    if diff.low is None or diff.high is None:
        return "-"
    if diff.low > 0:
        return ABOVE
    if diff.high < 0:
        return BELOW
    return NOT_DISTINGUISHABLE


def paired(accs: list[float], baselines: list[float]) -> Paired:
    """The gain of accs over baselines (fractions, paired by position, i.e. by seed) in percentage points."""
    if len(accs) != len(baselines):
        raise ValueError(f"{len(accs)} accuracies but {len(baselines)} baselines: pair them by seed")
    diffs = [100 * (a - b) for a, b in zip(accs, baselines, strict=True)]
    diff = summarize(diffs)
    sign_p = sign_test_p(diffs) if 1 < len(diffs) < SIGN_TEST_BELOW else None
    return Paired(diff, t_test_p(diffs), sign_p, verdict(diff))
