"""Bootstrap resampling and percentile intervals shared by every fit and comparison.

A replicate is a vector of integer counts, one per data point (how often the
point was drawn), so fitters can treat resampling as point weights. Runs are
resampled independently, or whole groups at a time (``groups``: e.g. all
seeds of one configuration move together), or within strata (``strata``:
e.g. per FLOP budget, so every replicate keeps every budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

DEFAULT_LEVEL = 0.95
# More failed replicates than this and an interval says more about the
# fitter than about the data: the result is flagged.
MAX_FAILED_FRACTION = 0.1


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval (NaN bounds: no interval)."""

    estimate: float
    low: float = math.nan
    high: float = math.nan
    level: float = DEFAULT_LEVEL

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def covers(self, value: float) -> bool:
        return self.has_interval and self.low <= value <= self.high

    def __str__(self) -> str:
        if not self.has_interval:
            return f"{self.estimate:.4g}"
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def count_weights(n: int, n_boot: int, rng: np.random.Generator, *, groups=None, strata=None) -> np.ndarray:
    """(n_boot, n) integer counts for ``n`` points.

    ``groups``: points sharing a label are drawn together (cluster bootstrap).
    ``strata``: points are resampled within each stratum, so every replicate
    keeps each stratum's size. The two can be combined (groups within strata).
    """
    strata = np.zeros(n, int) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
    groups = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    counts = np.zeros((n_boot, n), int)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        labels, inverse = np.unique(groups[members], return_inverse=True)
        drawn = rng.multinomial(len(labels), np.full(len(labels), 1.0 / len(labels)), size=n_boot)
        counts[:, members] = drawn[:, inverse]
    return counts


def resample_indices(counts: np.ndarray) -> list[np.ndarray]:
    """Counts to explicit index lists (for fitters that take resampled arrays)."""
    return [np.repeat(np.arange(counts.shape[1]), row) for row in counts]


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite samples; NaN when fewer than 2 are finite."""
    samples = np.asarray(samples, float)
    finite = samples[np.isfinite(samples)]
    if finite.size < 2:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def interval(estimate: float, samples: np.ndarray | None, level: float = DEFAULT_LEVEL) -> Interval:
    if samples is None:
        return Interval(float(estimate), level=level)
    low, high = percentile_interval(samples, level)
    return Interval(float(estimate), low, high, level)


class Sampled:
    """Mixin for results holding bootstrap draws of their parameters.

    Subclasses define ``param_names`` and the fields ``samples`` ((n_boot,
    len(param_names)) array or None) and ``level``; every derived number is
    an ordinary function of the parameter dict, evaluated on the estimate and
    on each replicate.
    """

    param_names: tuple[str, ...] = ()
    samples: np.ndarray | None
    level: float

    def params(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.param_names}

    def sample_params(self) -> dict[str, np.ndarray] | None:
        if self.samples is None:
            return None
        return {name: self.samples[:, i] for i, name in enumerate(self.param_names)}

    def derived(self, fn: Callable[[Mapping[str, float | np.ndarray]], float | np.ndarray],
                level: float | None = None) -> Interval:
        """``fn(params)`` at the estimate, with its bootstrap interval."""
        draws = self.sample_params()
        with np.errstate(all="ignore"):
            values = None if draws is None else np.asarray(fn(draws), float)
            return interval(float(fn(self.params())), values, self.level if level is None else level)

    def interval(self, name: str, level: float | None = None) -> Interval:
        if name in self.param_names:
            return self.derived(lambda p: p[name], level)
        derived = getattr(type(self), "derived_quantities", {})
        if name not in derived:
            raise KeyError(f"unknown quantity {name!r}; known: {', '.join(self.param_names + tuple(derived))}")
        return self.derived(derived[name], level)

    def band(self, fn: Callable[[Mapping[str, np.ndarray]], np.ndarray], level: float | None = None):
        """Pointwise percentile band (low, high) of a curve ``fn(params) -> array``; None without samples.

        ``fn`` gets each parameter as an (n_boot, 1) column, so a curve
        written with numpy broadcasting yields (n_boot, points) at once.
        """
        draws = self.sample_params()
        if draws is None:
            return None
        with np.errstate(all="ignore"):
            curves = np.array(fn({k: v[:, None] for k, v in draws.items()}), float, ndmin=2)
        curves[~np.isfinite(curves)] = np.nan
        level = self.level if level is None else level
        tail = 100.0 * (1.0 - level) / 2.0
        ok = np.isfinite(curves).sum(axis=0) >= 2
        low = np.full(curves.shape[1], np.nan)
        high = np.full(curves.shape[1], np.nan)
        if ok.any():
            low[ok], high[ok] = np.nanpercentile(curves[:, ok], [tail, 100.0 - tail], axis=0)
        return low, high
