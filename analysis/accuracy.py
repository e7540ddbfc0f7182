"""Accuracy against size: a bounded sigmoid in log N, and the two-step form via the loss.

* Sigmoid: acc = chance + (1 - chance) / (1 + exp(-k (log N - x0))), rising
  from the task's chance level to 1; N_mid = exp(x0) is the size halfway up.
* Two-step (loss first, then accuracy): acc = a / (1 + exp(-k (L - L0))) + b,
  with L the loss. Given sizes ``N``, step one fits L(N) = E + A N^-alpha and
  both steps share every bootstrap replicate, so acc(N) bands carry the
  uncertainty of both fits.

Least squares (``scipy.optimize.least_squares``, trust-region reflective
within physical bounds) from a small grid of starts. An estimate on a bound
or a solver that stopped without converging is flagged with a FitWarning.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from analysis.batch_lsq import levenberg_marquardt
from analysis.bootstrap import DEFAULT_LEVEL, MAX_FAILED_FRACTION, Sampled, count_weights
from analysis.fits import (FitWarning, InsufficientDataError, PowerLawFit, column, fit_power_law, labels,
                           usable_points)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)) without overflow warnings


@dataclass(frozen=True)
class _LSQ:
    params: np.ndarray
    converged: bool
    at_bound: tuple[int, ...]


def _lsq(model, starts, lower, upper) -> _LSQ:
    """Best of least_squares (trust-region reflective, in the bounds) from every start.

    ``model`` is batched (see :mod:`analysis.batch_lsq`); here it is
    evaluated on one parameter vector at a time.
    """
    def fun(p):
        return model(p[None])[0][0]

    def jac(p):
        return model(p[None])[1][0]

    best = None
    for x0 in starts:
        x0 = np.clip(x0, lower + 1e-9 * (upper - lower), upper - 1e-9 * (upper - lower))
        with np.errstate(all="ignore"):
            res = least_squares(fun, x0, jac=jac, bounds=(lower, upper), method="trf")
        if best is None or res.cost < best.cost:
            best = res
    span = upper - lower
    on_bound = tuple(i for i, v in enumerate(best.x) if min(v - lower[i], upper[i] - v) <= 1e-4 * span[i])
    return _LSQ(best.x, bool(best.status > 0), on_bound)


def _check_varies(who: str, ys: np.ndarray) -> None:
    """A constant accuracy has no slope to fit: every curve through it is equally good."""
    if np.ptp(ys) == 0:
        raise InsufficientDataError(f"{who}: accuracy is the same ({ys[0]:.4g}) at every point, so there is no "
                                    "curve to fit (too small models or too few task questions?)")


def _flag_and_warn(who, names, fit: _LSQ, failed: float | None, extra=()) -> tuple[str, ...]:
    flags = [] if fit.converged else ["least squares did not converge"]
    flags += [f"{names[i]}={fit.params[i]:.4g} sits on its bound" for i in fit.at_bound]
    flags += list(extra)
    if failed is not None and failed > MAX_FAILED_FRACTION:
        flags.append(f"{failed:.0%} of bootstrap replicates failed; intervals are unreliable")
    for f in flags:
        warnings.warn(f"{who}: {f}", FitWarning, stacklevel=3)
    return tuple(flags)


def _replicates(model, best: _LSQ, counts: np.ndarray, valid, lower, upper):
    """Parameter draws of all replicates (one batched Levenberg-Marquardt run from the estimate);
    NaN rows for replicates that cannot determine the fit or did not converge."""
    x0 = np.tile(best.params, (len(counts), 1))
    x, _, converged = levenberg_marquardt(model, x0, counts.astype(float), lower, upper)
    ok = converged & np.array([valid(c > 0) for c in counts])
    return np.where(ok[:, None], x, np.nan), float(1.0 - ok.mean())


@dataclass(frozen=True, eq=False)
class SigmoidFit(Sampled):
    k: float
    x0: float
    chance: float
    n_points: int
    converged: bool
    flags: tuple[str, ...] = ()
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = DEFAULT_LEVEL

    param_names = ("k", "x0")
    derived_quantities = {"N_mid": lambda p: np.exp(p["x0"])}

    @property
    def ok(self) -> bool:
        return self.converged and not self.flags

    def predict(self, N, params=None):
        p = self.params() if params is None else params
        return self.chance + (1.0 - self.chance) * _sigmoid(p["k"] * (np.log(np.asarray(N, float)) - p["x0"]))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"quantity": n, **vars(self.interval(n))} for n in ("k", "x0", "N_mid")]).set_index("quantity")


def fit_accuracy_sigmoid(N, acc, *, chance: float = 0.0, data: pd.DataFrame | None = None, n_boot: int = 0,
                         level: float = DEFAULT_LEVEL, groups=None, seed: int = 0) -> SigmoidFit:
    """acc = chance + (1 - chance) * sigmoid(k (log N - x0)), k > 0. Needs 3 points at 2+ sizes."""
    who = "fit_accuracy_sigmoid"
    ns, ys = column(data, N, "N"), column(data, acc, "acc")
    keep = usable_points(who, N=ns) & np.isfinite(ys)
    ns, ys = ns[keep], ys[keep]
    if len(ys) < 3 or len(np.unique(ns)) < 2:
        raise InsufficientDataError(f"{who}: needs at least 3 usable points at 2 or more sizes; "
                                    f"got {len(ys)} points at {len(np.unique(ns))} sizes")
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"{who}: chance must be in [0, 1), got {chance}")
    _check_varies(who, ys)
    x = np.log(ns)
    lower = np.array([1e-4, x.min() - 10.0])
    upper = np.array([50.0, x.max() + 10.0])

    def model(P):
        k, x0 = P[:, :1], P[:, 1:2]
        s = _sigmoid(k * (x - x0))
        ds = (1.0 - chance) * s * (1.0 - s)
        return chance + (1.0 - chance) * s - ys, np.stack([ds * (x - x0), -ds * k], axis=2)

    starts = list(itertools.product((0.3, 1.0, 3.0), np.quantile(x, [0.0, 0.5, 1.0]) + [-2.0, 0.0, 2.0]))
    best = _lsq(model, np.array(starts), lower, upper)
    samples, failed = None, None
    if n_boot:
        groups = labels(data, groups)
        counts = count_weights(len(ys), n_boot, np.random.default_rng(seed),
                               groups=None if groups is None else groups[keep])
        samples, failed = _replicates(model, best, counts, lambda m: len(np.unique(ns[m])) >= 2, lower, upper)
    extra = [] if ys.max() > chance + 0.01 else [f"accuracy never rises above chance ({chance:g})"]
    return SigmoidFit(k=float(best.params[0]), x0=float(best.params[1]), chance=chance, n_points=len(ys),
                      converged=best.converged, flags=_flag_and_warn(who, ("k", "x0"), best, failed, extra),
                      samples=samples, level=level)


@dataclass(frozen=True, eq=False)
class TwoStepFit(Sampled):
    """acc = a / (1 + exp(-k (L - L0))) + b on top of a loss fit L(N) (``loss_fit``, when sizes were given)."""

    a: float
    k: float
    L0: float
    b: float
    n_points: int
    converged: bool
    flags: tuple[str, ...] = ()
    samples: np.ndarray | None = field(default=None, repr=False)
    level: float = DEFAULT_LEVEL
    loss_fit: PowerLawFit | None = None

    param_names = ("a", "k", "L0", "b")
    derived_quantities = {}

    @property
    def ok(self) -> bool:
        return self.converged and not self.flags and (self.loss_fit is None or self.loss_fit.ok)

    def predict_from_loss(self, loss, params=None):
        p = self.params() if params is None else params
        return p["a"] * _sigmoid(p["k"] * (np.asarray(loss, float) - p["L0"])) + p["b"]

    def predict(self, N):
        if self.loss_fit is None:
            raise ValueError("this two-step fit was made without sizes; use predict_from_loss")
        return self.predict_from_loss(self.loss_fit.predict(N))

    def band(self, N, level: float | None = None):
        """Percentile band of acc(N), both steps taken from the same bootstrap replicates."""
        if self.samples is None or self.loss_fit is None or self.loss_fit.samples is None:
            return None
        lf = self.loss_fit.samples
        N = np.asarray(N, float)[None, :]
        with np.errstate(all="ignore"):
            loss = lf[:, [0]] + lf[:, [1]] * N ** -lf[:, [2]]
            s = self.samples
            curves = s[:, [0]] * _sigmoid(s[:, [1]] * (loss - s[:, [2]])) + s[:, [3]]
        tail = 100.0 * (1.0 - (self.level if level is None else level)) / 2.0
        return tuple(np.nanpercentile(curves, [tail, 100.0 - tail], axis=0))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"quantity": n, **vars(self.interval(n))} for n in self.param_names]).set_index("quantity")


def fit_two_step_accuracy(loss, acc, *, N=None, data: pd.DataFrame | None = None, n_boot: int = 0,
                          level: float = DEFAULT_LEVEL, seed: int = 0) -> TwoStepFit:
    """Fit acc = a / (1 + exp(-k (L - L0))) + b; with ``N`` also L(N) (jointly bootstrapped)."""
    who = "fit_two_step_accuracy"
    ls, ys = column(data, loss, "loss"), column(data, acc, "acc")
    ns = None if N is None else column(data, N, "N")
    keep = usable_points(who, loss=ls, **({} if ns is None else {"N": ns})) & np.isfinite(ys)
    ls, ys = ls[keep], ys[keep]
    ns = None if ns is None else ns[keep]
    if len(ys) < 5 or len(np.unique(ls)) < 4:
        raise InsufficientDataError(f"{who}: needs at least 5 usable points with 4 distinct losses (4 parameters); "
                                    f"got {len(ys)} points, {len(np.unique(ls))} distinct losses")
    _check_varies(who, ys)
    lower = np.array([1e-6, -200.0, ls.min() - 5.0, 0.0])
    upper = np.array([1.0, -1e-4, ls.max() + 5.0, 1.0])

    def model(P):
        a, k, l0, b = (P[:, i:i + 1] for i in range(4))
        s = _sigmoid(k * (ls - l0))
        ds = a * s * (1.0 - s)
        return a * s + b - ys, np.stack([s, ds * (ls - l0), -ds * k, np.ones_like(s)], axis=2)

    starts = [np.array([a, k, l0, max(0.0, ys.min() - 0.01)]) for a in (0.5, 1.0) for k in (-1.0, -5.0, -20.0)
              for l0 in np.quantile(ls, [0.25, 0.5, 0.75])]
    best = _lsq(model, starts, lower, upper)
    loss_fit = None if ns is None else fit_power_law(ns, ls, n_boot=n_boot, level=level, seed=seed)
    samples, failed = None, None
    if n_boot:
        # The same seed and points give the loss fit's replicates, so row i of both sample arrays is one replicate.
        counts = count_weights(len(ys), n_boot, np.random.default_rng(seed))
        samples, failed = _replicates(model, best, counts, lambda m: len(np.unique(ls[m])) >= 4, lower, upper)
    return TwoStepFit(a=float(best.params[0]), k=float(best.params[1]), L0=float(best.params[2]),
                      b=float(best.params[3]), n_points=len(ys), converged=best.converged,
                      flags=_flag_and_warn(who, ("a", "k", "L0", "b"), best, failed), samples=samples, level=level,
                      loss_fit=loss_fit)
