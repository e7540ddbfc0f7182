"""Power of the paired arm-vs-twin comparison: what a sweep could have detected, and how many seeds it would take.

A two-sided paired t-test on ``n`` seed pairs whose differences have
standard deviation ``sd`` rejects "no difference" at level ``alpha`` with
probability (exact, from the noncentral t distribution with ``n - 1``
degrees of freedom and noncentrality ``delta / sd * sqrt(n)``)::

    power = P(|T| > t_{1-alpha/2, n-1})

* :func:`power` evaluates it; :func:`min_detectable_effect` solves it for
  the smallest |delta| detected with the target power (80% by default);
  :func:`seeds_needed` finds the smallest ``n`` reaching the target for a
  given delta.
* :func:`power_table` applies them to :func:`analysis.compare.paired_differences`:
  per (arm, budget), the observed seed-to-seed sd of the paired differences
  is plugged in as if it were the true sd. With few seeds that sd is itself
  noisy, so the numbers are estimates of the sweep's sensitivity, not
  guarantees.

The report's intervals are bootstrap intervals from 5 pairs; the t-test is
the standard planning model for them (both target the mean difference and
agree closely once there are a handful of seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.80
RELATIVE_TARGETS = (0.005, 0.01, 0.02)  # relative differences the report asks "how many seeds?" for
MAX_SEEDS = 100_000  # search limit: beyond this "seeds needed" is reported as more than the limit


def power(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Probability that a two-sided paired t-test on ``n`` pairs rejects at ``alpha`` when the true mean is ``delta``."""
    if n < 2 or not sd > 0:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    ncp = abs(delta) / sd * math.sqrt(n)
    upper = float(stats.nct.sf(crit, df, ncp))
    # The wrong-sign tail is below alpha/2 and vanishes as ncp grows; scipy returns NaN for it far out.
    lower = float(stats.nct.cdf(-crit, df, ncp))
    return upper + (lower if math.isfinite(lower) else 0.0)


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA, target: float = POWER) -> float:
    """Smallest |mean difference| a paired t-test on ``n`` pairs with difference sd ``sd`` detects with ``target`` power.

    NaN for fewer than 2 pairs or a non-positive/non-finite sd (nothing to
    plan from).
    """
    if n < 2 or not (sd > 0 and math.isfinite(sd)):
        return math.nan
    # power(delta) rises monotonically from alpha at 0; the bracket's top is far past any 80% point.
    hi = sd * 10.0
    while power(hi, sd, n, alpha) < target:
        hi *= 10.0
    return float(optimize.brentq(lambda d: power(d, sd, n, alpha) - target, 0.0, hi, xtol=sd * 1e-9))


def seeds_needed(delta: float, sd: float, alpha: float = ALPHA, target: float = POWER) -> float:
    """Smallest number of seed pairs whose paired t-test detects ``delta`` with ``target`` power.

    NaN when the sd is unknown or delta is 0; ``inf`` past :data:`MAX_SEEDS`.
    """
    if not (sd > 0 and math.isfinite(sd)) or not (delta != 0 and math.isfinite(delta)):
        return math.nan
    # Normal approximation as the starting point, then exact steps (the t-test needs slightly more).
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(target)
    n = max(2, int(math.ceil((z * sd / abs(delta)) ** 2)))
    if n > MAX_SEEDS:
        return math.inf
    while n > 2 and power(delta, sd, n - 1, alpha) >= target:
        n -= 1
    while power(delta, sd, n, alpha) < target:
        n += 1
        if n > MAX_SEEDS:
            return math.inf
    return n


def power_table(diffs: pd.DataFrame, alpha: float = ALPHA, target: float = POWER,
                relative: tuple[float, ...] = RELATIVE_TARGETS) -> pd.DataFrame:
    """Per row of :func:`analysis.compare.paired_differences`: the minimal detectable difference and seeds needed.

    Adds columns ``mde`` (absolute, in the metric's units), ``mde_rel``
    (relative to the twin's mean) and ``seeds_for_<p>%`` for each relative
    target. Rows with fewer than 2 pairs (no sd) get NaN.
    """
    out = diffs.copy()
    sd, n, twin = (pd.to_numeric(out[c], errors="coerce") for c in ("seed_sd", "n_pairs", "twin_mean"))
    out["mde"] = [min_detectable_effect(s, int(k), alpha, target) if k == k else math.nan for s, k in zip(sd, n)]
    out["mde_rel"] = out["mde"] / twin.abs()
    for p in relative:
        out[seeds_column(p)] = [seeds_needed(p * abs(t), s, alpha, target) for s, t in zip(sd, twin)]
    return out


def seeds_column(p: float) -> str:
    return f"seeds_for_{p * 100:g}%"


def detectable_text(mde: float, mde_rel: float) -> str:
    """The clause that goes with "no clear difference": how large a difference this sweep could have seen."""
    if not math.isfinite(mde):
        return "too few seed pairs to say what it could have detected"
    rel = f" ({mde_rel:.2%})" if math.isfinite(mde_rel) else ""
    return f"we could have seen differences larger than {mde:.3g}{rel}"


def simulate_detection_rate(delta: float, sd: float, n: int, *, sweeps: int = 4000, alpha: float = ALPHA,
                            seed: int = 0) -> float:
    """Share of ``sweeps`` simulated sweeps (n normal paired differences each) whose t-test rejects at ``alpha``.

    A Monte Carlo check of :func:`power`, used by the tests and handy for
    judging a planned sweep without trusting the formula.
    """
    rng = np.random.default_rng(seed)
    d = rng.normal(delta, sd, size=(sweeps, n))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    return float(np.mean(p < alpha))
