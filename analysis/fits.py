"""Scaling-law fits: L = E + A * X^-alpha and Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta.

Both follow Hoffmann et al. (2022) App. D.2 ("Approach 3") exactly by default:
minimize sum_i Huber_1e-3(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)
with L-BFGS from every point of the paper's initialization grid (4,500 starts
for L(N, D); the same axes, 150 starts, for a single variable) and keep the
lowest objective. Checked against Besiroglu et al. (2024), whose replication
of this procedure on the Chinchilla data is the reference users compare with:
on their 240 points (svg_extracted_data.csv without the 5 highest losses)
this code gives E=1.817, A=477.8, B=2143, alpha=0.3473, beta=0.3672, objective
1.01827e-3, against their published 1.82, 482.01, 2085.43, 0.3478, 0.3658 --
whose objective on the same points is higher (1.02284e-3): the differences
lie along a nearly flat ridge of the objective, and ours is its minimum.

Bootstrap replicates resample runs (optionally whole groups of runs) and
refit from the best distinct local minima of the full-data fit rather than
from all 4,500 grid points (``bootstrap_full_grid=True`` restores the full
grid per replicate, at ~``n_boot`` times the cost).

Nothing is returned silently: a best start that did not converge, a parameter
at the edge of the plausible region, or too many failed bootstrap replicates
raises a :class:`FitWarning` and is listed in the result's ``flags``; input
that cannot determine the model raises :class:`InsufficientDataError`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import huber_lse
from analysis.bootstrap import DEFAULT_LEVEL, MAX_FAILED_FRACTION, Sampled, count_weights

# Edges of the region where a fitted exponent or coefficient is physically
# meaningful; an estimate outside means the optimum ran off to a degenerate
# solution (a term vanished or exploded), which is what "at a bound" means for
# this unconstrained fit.
EXPONENT_RANGE = (1e-3, 3.0)
MAX_LOG_COEF = 60.0
BOOTSTRAP_STARTS = 4


class FitWarning(UserWarning):
    """A fit returned numbers that should not be trusted as they stand."""


class InsufficientDataError(ValueError):
    """The data cannot determine the requested fit; the message says why."""


def column(data, value, name: str) -> np.ndarray:
    """``value`` as a float array: an array-like, or a column name of ``data``."""
    if isinstance(value, str):
        if data is None:
            raise TypeError(f"{name}={value!r} is a column name but no data= DataFrame was given")
        if value not in data.columns:
            raise KeyError(f"{name}: no column {value!r}; columns are {', '.join(map(str, data.columns))}")
        value = data[value]
    return np.asarray(pd.to_numeric(pd.Series(np.asarray(value).ravel()), errors="coerce"), float)


def labels(data, value) -> np.ndarray | None:
    """Group labels (any type) for a cluster bootstrap: an array, a column name of ``data``, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        if data is None or value not in data.columns:
            raise KeyError(f"groups: no column {value!r} (pass data= or an array)")
        value = data[value]
    return np.asarray(value)


def usable_points(who: str, **arrays: np.ndarray) -> np.ndarray:
    """Mask of points where every array is finite and positive; warns about the rest."""
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"{who}: inputs differ in length: " + ", ".join(f"{k}={len(v)}" for k, v in arrays.items()))
    mask = np.ones(lengths.pop(), bool)
    reasons = []
    for name, arr in arrays.items():
        bad = ~(np.isfinite(arr) & (arr > 0))
        if bad.any():
            reasons.append(f"{int(bad.sum())} with non-finite or non-positive {name}")
        mask &= ~bad
    if reasons:
        warnings.warn(f"{who}: dropped {int((~mask).sum())} of {len(mask)} points ({'; '.join(reasons)})",
                      FitWarning, stacklevel=3)
    return mask


def _plausibility(coefs: dict[str, float], exponents: dict[str, float], E: float, min_loss: float) -> list[str]:
    flags = []
    lo, hi = EXPONENT_RANGE
    for name, v in exponents.items():
        if not lo <= v <= hi:
            flags.append(f"{name}={v:.4g} outside the plausible range [{lo}, {hi}]")
    for name, v in coefs.items():
        log_v = math.log(v) if v > 0 else -math.inf
        if not abs(log_v) <= MAX_LOG_COEF:
            flags.append(f"{name}={v:.4g} diverged (|log {name}| > {MAX_LOG_COEF:g})")
    if E < 1e-3 * min_loss:
        flags.append(f"E={E:.3g} collapsed to 0 (no irreducible loss identified)")
    elif E > min_loss:
        flags.append(f"E={E:.4g} above the lowest observed loss {min_loss:.4g}")
    return flags


def _exp(v):
    with np.errstate(over="ignore"):
        return np.exp(v) if isinstance(v, np.ndarray) else float(np.exp(v))


@dataclass(frozen=True)
class _Fitted:
    raw: np.ndarray  # best raw params [a.., e, alpha..]
    objective: float
    converged: bool
    samples: np.ndarray | None  # (n_boot, p) raw params, NaN rows for failed replicates
    failed_fraction: float


def _fit(log_x, log_y, starts, valid_replicate, *, n_boot, groups, seed, delta,
         bootstrap_starts, bootstrap_full_grid, maxiter) -> _Fitted:
    best = huber_lse.fit_multistart(log_x, log_y, starts, delta=delta, maxiter=maxiter)
    samples, failed = None, 0.0
    if n_boot:
        rng = np.random.default_rng(seed)
        counts = count_weights(len(log_y), n_boot, rng, groups=groups)
        boot_starts = starts if bootstrap_full_grid else huber_lse.distinct_best(best, bootstrap_starts)
        rep = huber_lse.fit_multistart(log_x, log_y, boot_starts, counts.astype(float), delta=delta, maxiter=maxiter)
        ok = rep.converged & np.all(np.isfinite(rep.params), axis=1)
        ok &= np.array([valid_replicate(c > 0) for c in counts])
        samples = np.where(ok[:, None], rep.params, np.nan)
        failed = float(1.0 - ok.mean())
    return _Fitted(best.params[0], float(best.fun[0]), bool(best.converged[0]), samples, failed)


def _common_flags(who: str, fitted: _Fitted, flags: list[str]) -> tuple[str, ...]:
    if not fitted.converged:
        flags.insert(0, "L-BFGS did not converge from the best start")
    if fitted.samples is not None and fitted.failed_fraction > MAX_FAILED_FRACTION:
        flags.append(f"{fitted.failed_fraction:.0%} of bootstrap replicates failed; intervals are unreliable")
    for flag in flags:
        warnings.warn(f"{who}: {flag}", FitWarning, stacklevel=4)
    return tuple(flags)


@dataclass(frozen=True, eq=False)
class PowerLawFit(Sampled):
    """L = E + A * x^-alpha, x being parameters N or compute C (``variable``)."""

    E: float
    A: float
    alpha: float
    objective: float
    n_points: int
    converged: bool
    flags: tuple[str, ...] = ()
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = DEFAULT_LEVEL
    variable: str = "N"
    x_range: tuple[float, float] = (math.nan, math.nan)
    failed_fraction: float = 0.0

    param_names = ("E", "A", "alpha")
    derived_quantities = {}

    @property
    def ok(self) -> bool:
        return self.converged and not self.flags

    def predict(self, x, params=None):
        p = self.params() if params is None else params
        return p["E"] + p["A"] * np.asarray(x, float) ** -p["alpha"]

    def inverse(self, loss, params=None):
        """The x at which the curve reaches ``loss`` (NaN at or below E: never reached)."""
        p = self.params() if params is None else params
        gap = np.asarray(loss, float) - p["E"]
        with np.errstate(all="ignore"):
            return np.where(gap > 0, (p["A"] / gap) ** (1.0 / p["alpha"]), np.nan)

    def table(self) -> pd.DataFrame:
        return _table(self, self.param_names)

    def __str__(self) -> str:
        return _describe(self, f"L = E + A * {self.variable}^-alpha")


@dataclass(frozen=True, eq=False)
class ChinchillaFit(Sampled):
    """L(N, D) = E + A/N^alpha + B/D^beta with compute-optimal allocation for C = 6 N D."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    converged: bool
    flags: tuple[str, ...] = ()
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = DEFAULT_LEVEL
    failed_fraction: float = 0.0

    param_names = ("E", "A", "B", "alpha", "beta")
    derived_quantities = {
        "a": lambda p: p["beta"] / (p["alpha"] + p["beta"]),  # N_opt ~ C^a
        "b": lambda p: p["alpha"] / (p["alpha"] + p["beta"]),  # D_opt ~ C^b
        "G": lambda p: (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / (p["alpha"] + p["beta"])),
    }

    @property
    def ok(self) -> bool:
        return self.converged and not self.flags

    def predict(self, N, D, params=None):
        p = self.params() if params is None else params
        return p["E"] + p["A"] * np.asarray(N, float) ** -p["alpha"] + p["B"] * np.asarray(D, float) ** -p["beta"]

    @staticmethod
    def _n_opt(p, C):
        s = p["alpha"] + p["beta"]
        G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / s)
        return G * (np.asarray(C, float) / 6.0) ** (p["beta"] / s)

    def n_opt(self, C):
        """Compute-optimal parameters N_opt(C) = G (C/6)^(beta/(alpha+beta))."""
        return self._n_opt(self.params(), C)

    def d_opt(self, C):
        """Compute-optimal tokens D_opt(C) = C / (6 N_opt(C)) = G^-1 (C/6)^(alpha/(alpha+beta))."""
        return np.asarray(C, float) / (6.0 * self.n_opt(C))

    def compute_optimal(self, C) -> pd.DataFrame:
        """N_opt and D_opt (with intervals when bootstrapped) for each budget in ``C``."""
        rows = []
        for c in np.atleast_1d(np.asarray(C, float)):
            n = self.derived(lambda p: self._n_opt(p, c))
            d = self.derived(lambda p: c / (6.0 * self._n_opt(p, c)))
            rows.append({"C": c, "N_opt": n.estimate, "N_opt_low": n.low, "N_opt_high": n.high,
                         "D_opt": d.estimate, "D_opt_low": d.low, "D_opt_high": d.high,
                         "tokens_per_param": d.estimate / n.estimate})
        return pd.DataFrame(rows)

    def table(self) -> pd.DataFrame:
        return _table(self, self.param_names + tuple(self.derived_quantities))

    def __str__(self) -> str:
        return _describe(self, "L = E + A/N^alpha + B/D^beta")


def _table(fit: Sampled, names) -> pd.DataFrame:
    rows = [{"quantity": n, **vars(fit.interval(n))} for n in names]
    return pd.DataFrame(rows).set_index("quantity")


def _describe(fit, formula: str) -> str:
    lines = [f"{formula}  ({fit.n_points} points, Huber objective {fit.objective:.4g}, "
             f"{'converged' if fit.converged else 'NOT converged'})"]
    for name, row in fit.table().iterrows():
        ci = f"  [{row.low:.4g}, {row.high:.4g}]" if np.isfinite(row.low) else ""
        lines.append(f"  {name:>6} = {row.estimate:.4g}{ci}")
    lines += [f"  ! {flag}" for flag in fit.flags]
    return "\n".join(lines)


def fit_power_law(x, loss, *, data: pd.DataFrame | None = None, variable: str = "N", n_boot: int = 0,
                  level: float = DEFAULT_LEVEL, groups=None, seed: int = 0, delta: float = huber_lse.DELTA,
                  init_grid: np.ndarray | None = None, bootstrap_starts: int = BOOTSTRAP_STARTS,
                  bootstrap_full_grid: bool = False, maxiter: int = 15000) -> PowerLawFit:
    """Fit L = E + A * x^-alpha (Chinchilla's procedure with one variable).

    ``x`` and ``loss`` are arrays or, with ``data``, column names. ``n_boot``
    > 0 adds percentile intervals from that many replicates resampling the
    points (or whole ``groups`` of points). Raises
    :class:`InsufficientDataError` with fewer than 4 usable points or 3
    distinct x values.
    """
    who = f"fit_power_law({variable})"
    xs, ys = column(data, x, "x"), column(data, loss, "loss")
    groups = labels(data, groups)
    keep = usable_points(who, **{variable: xs, "loss": ys})
    xs, ys = xs[keep], ys[keep]
    groups = None if groups is None else groups[keep]
    distinct = len(np.unique(xs))
    if len(xs) < 4 or distinct < 3:
        raise InsufficientDataError(f"{who}: needs at least 4 usable points with 3 distinct {variable} values "
                                    f"(3 parameters); got {len(xs)} points, {distinct} distinct")
    log_x = np.log(xs)[:, None]
    starts = huber_lse.paper_grid(1) if init_grid is None else np.asarray(init_grid, float)
    fitted = _fit(log_x, np.log(ys), starts, lambda m: len(np.unique(xs[m])) >= 3, n_boot=n_boot,
                  groups=groups, seed=seed, delta=delta, bootstrap_starts=bootstrap_starts,
                  bootstrap_full_grid=bootstrap_full_grid, maxiter=maxiter)
    a, e, alpha = fitted.raw
    E, A = _exp(e), _exp(a)
    flags = _plausibility({"A": A}, {"alpha": alpha}, E, float(ys.min()))
    if distinct == 3:
        flags.append(f"only 3 distinct {variable} values for 3 parameters: the curve interpolates them, and the "
                     "intervals reflect run-to-run noise, not whether the power law holds")
    samples = None
    if fitted.samples is not None:
        s = fitted.samples
        samples = np.column_stack([_exp(s[:, 1]), _exp(s[:, 0]), s[:, 2]])
    return PowerLawFit(E=E, A=A, alpha=float(alpha), objective=fitted.objective, n_points=len(xs),
                       converged=fitted.converged, flags=_common_flags(who, fitted, flags), samples=samples,
                       level=level, variable=variable, x_range=(float(xs.min()), float(xs.max())),
                       failed_fraction=fitted.failed_fraction)


def collinearity(log_n: np.ndarray, log_d: np.ndarray) -> float:
    """R^2 of log D regressed on log N (1.0: D is a power of N, or either is constant)."""
    if np.ptp(log_n) == 0 or np.ptp(log_d) == 0:
        return 1.0
    r = np.corrcoef(log_n, log_d)[0, 1]
    return float(r * r)


def fit_chinchilla(N, D, loss, *, data: pd.DataFrame | None = None, n_boot: int = 0, level: float = DEFAULT_LEVEL,
                   groups=None, seed: int = 0, delta: float = huber_lse.DELTA, init_grid: np.ndarray | None = None,
                   bootstrap_starts: int = BOOTSTRAP_STARTS, bootstrap_full_grid: bool = False,
                   maxiter: int = 15000) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta exactly as Hoffmann et al. (2022) App. D.2.

    ``N`` (parameters), ``D`` (tokens) and ``loss`` are arrays or, with
    ``data``, column names. Raises :class:`InsufficientDataError` with fewer
    than 6 usable points or 5 distinct (N, D) pairs, or when log D is (almost)
    a linear function of log N -- then the two power laws cannot be separated.
    """
    who = "fit_chinchilla"
    ns, ds, ys = column(data, N, "N"), column(data, D, "D"), column(data, loss, "loss")
    groups = labels(data, groups)
    keep = usable_points(who, N=ns, D=ds, loss=ys)
    ns, ds, ys = ns[keep], ds[keep], ys[keep]
    groups = None if groups is None else groups[keep]
    pairs = len({(a, b) for a, b in zip(ns, ds)})
    if len(ys) < 6 or pairs < 5:
        raise InsufficientDataError(f"{who}: needs at least 6 usable points with 5 distinct (N, D) pairs "
                                    f"(5 parameters); got {len(ys)} points, {pairs} distinct pairs")
    for name, v, other in (("tokens D", ds, "B/D^beta"), ("parameters N", ns, "A/N^alpha")):
        if np.ptp(v) == 0:
            raise InsufficientDataError(f"{who}: {name} are the same ({v[0]:.4g}) for every run, so {other} cannot "
                                        "be told apart from E; the sweep needs several token counts and model "
                                        "sizes (e.g. FLOP budgets)")
    log_x = np.log(np.column_stack([ns, ds]))
    r2 = collinearity(log_x[:, 0], log_x[:, 1])
    if r2 > 1 - 1e-6:
        raise InsufficientDataError(f"{who}: tokens D vary in lockstep with parameters N (R^2 of log D on log N "
                                    f"= {r2:.6f}), so A/N^alpha and B/D^beta cannot be told apart; the sweep "
                                    "needs several token counts per model size (e.g. FLOP budgets)")

    def valid(m):
        return len({(a, b) for a, b in zip(ns[m], ds[m])}) >= 5 and collinearity(log_x[m, 0], log_x[m, 1]) < 1 - 1e-6

    starts = huber_lse.paper_grid(2) if init_grid is None else np.asarray(init_grid, float)
    fitted = _fit(log_x, np.log(ys), starts, valid, n_boot=n_boot, groups=groups, seed=seed,
                  delta=delta, bootstrap_starts=bootstrap_starts, bootstrap_full_grid=bootstrap_full_grid,
                  maxiter=maxiter)
    a, b, e, alpha, beta = fitted.raw
    E, A, B = _exp(e), _exp(a), _exp(b)
    flags = _plausibility({"A": A, "B": B}, {"alpha": alpha, "beta": beta}, E, float(ys.min()))
    if pairs == 5:
        flags.append("only 5 distinct (N, D) pairs for 5 parameters: the surface interpolates them")
    samples = None
    if fitted.samples is not None:
        s = fitted.samples
        samples = np.column_stack([_exp(s[:, 2]), _exp(s[:, 0]), _exp(s[:, 1]), s[:, 3], s[:, 4]])
    return ChinchillaFit(E=E, A=A, B=B, alpha=float(alpha), beta=float(beta), objective=fitted.objective,
                         n_points=len(ys), converged=fitted.converged, flags=_common_flags(who, fitted, flags),
                         samples=samples, level=level, failed_fraction=fitted.failed_fraction)
