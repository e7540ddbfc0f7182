"""IsoFLOP analysis (Hoffmann et al. 2022, Approach 2).

For every FLOP budget C with at least three model sizes, fit a parabola of
loss in log N and take its vertex as the compute-optimal size N_opt(C); then
fit the power laws N_opt = k_N C^a and D_opt = k_D C^b across budgets by least
squares in log-log space. D_opt is read off the budget's own runs (log D
linear in log N within the budget, evaluated at N_opt) when tokens are
given, else C / (6 N_opt).

A parabola that opens downward has no minimum, and a vertex outside the
sampled sizes is an extrapolation: such budgets are flagged and left out of
the exponent fit. Bootstrap replicates resample runs within each budget.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_LEVEL, Interval, count_weights, interval
from analysis.fits import FitWarning, InsufficientDataError, column, usable_points


@dataclass(frozen=True)
class _Vertex:
    log_n: float  # NaN: no minimum
    loss: float
    log_d: float
    curvature: float
    inside: bool


def _vertex(log_n, loss, log_d, weights, log_c) -> _Vertex:
    use = weights > 0
    if len(np.unique(log_n[use])) < 3:
        return _Vertex(math.nan, math.nan, math.nan, math.nan, False)
    w = np.sqrt(weights[use])  # polyfit weights multiply residuals: sqrt(count) = count-weighted squares
    c2, c1, c0 = np.polyfit(log_n[use], loss[use], 2, w=w)
    if not c2 > 0:
        return _Vertex(math.nan, math.nan, math.nan, float(c2), False)
    x = -c1 / (2.0 * c2)
    inside = bool(log_n[use].min() <= x <= log_n[use].max())
    if log_d is None:
        ld = log_c - math.log(6.0) - x
    else:
        d1, d0 = np.polyfit(log_n[use], log_d[use], 1, w=w)
        ld = d0 + d1 * x
    return _Vertex(float(x), float(c0 + c1 * x + c2 * x * x), float(ld), float(c2), inside)


def _power_fit(log_c: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """(exponent, log prefactor) of y = k C^e by least squares; NaN with fewer than 2 budgets."""
    ok = np.isfinite(log_y)
    if ok.sum() < 2 or np.ptp(log_c[ok]) == 0:
        return math.nan, math.nan
    e, log_k = np.polyfit(log_c[ok], log_y[ok], 1)
    return float(e), float(log_k)


@dataclass(frozen=True, eq=False)
class IsoFlopFit:
    """Per-budget optima (``budgets``) and the exponents N_opt ~ C^a, D_opt ~ C^b."""

    budgets: pd.DataFrame
    a: Interval
    b: Interval
    log_k_n: float
    log_k_d: float
    flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.flags and math.isfinite(self.a.estimate)

    def n_opt(self, C):
        return np.exp(self.log_k_n) * np.asarray(C, float) ** self.a.estimate

    def d_opt(self, C):
        return np.exp(self.log_k_d) * np.asarray(C, float) ** self.b.estimate

    def __str__(self) -> str:
        lines = [f"IsoFLOP: N_opt ~ C^a, a = {self.a};  D_opt ~ C^b, b = {self.b}"]
        lines += [f"  ! {f}" for f in self.flags]
        return "\n".join(lines)


def fit_isoflop(C, N, loss, D=None, *, data: pd.DataFrame | None = None, n_boot: int = 0,
                level: float = DEFAULT_LEVEL, seed: int = 0) -> IsoFlopFit:
    """Approach 2 on runs grouped by FLOP budget ``C`` (arrays or, with ``data``, column names)."""
    cs, ns, ys = column(data, C, "C"), column(data, N, "N"), column(data, loss, "loss")
    ds = None if D is None else column(data, D, "D")
    arrays = {"C": cs, "N": ns, "loss": ys} | ({} if ds is None else {"D": ds})
    keep = usable_points("fit_isoflop", **arrays)
    cs, ns, ys = cs[keep], ns[keep], ys[keep]
    log_d = None if ds is None else np.log(ds[keep])
    budgets = np.unique(cs)
    sizes = {c: len(np.unique(ns[cs == c])) for c in budgets}
    usable = [c for c in budgets if sizes[c] >= 3]
    if not usable:
        raise InsufficientDataError("fit_isoflop: no FLOP budget has 3 or more model sizes (sizes per budget: "
                                    + ", ".join(f"{c:.3g}: {k}" for c, k in sizes.items()) + ")")
    log_n = np.log(ns)

    def solve(weights):
        verts = {c: _vertex(log_n[cs == c], ys[cs == c], None if log_d is None else log_d[cs == c],
                            weights[cs == c], math.log(c)) for c in usable}
        good = [c for c in usable if math.isfinite(verts[c].log_n) and verts[c].inside]
        lc = np.log(np.array(good, float))
        a = _power_fit(lc, np.array([verts[c].log_n for c in good]))
        b = _power_fit(lc, np.array([verts[c].log_d for c in good]))
        return verts, good, a, b

    verts, good, (a, log_k_n), (b, log_k_d) = solve(np.ones(len(ys)))
    boot = _bootstrap(solve, cs, usable, good, n_boot, seed)
    table = pd.DataFrame([_budget_row(c, sizes[c], verts[c], boot, level) for c in usable])
    flags = [f"budget {c:.3g}: {row}" for c, row in zip(usable, table["note"]) if row]
    flags += [f"budget {c:.3g}: only {sizes[c]} model sizes; skipped (a parabola needs 3)"
              for c in budgets if c not in usable]
    if len(good) < 2:
        flags.append(f"exponents need 2 budgets with an interior minimum; have {len(good)}")
    elif len(good) == 2:
        flags.append("exponents rest on 2 budgets only")
    for flag in flags:
        warnings.warn(f"fit_isoflop: {flag}", FitWarning, stacklevel=2)
    return IsoFlopFit(budgets=table, a=interval(a, None if boot is None else boot["a"], level),
                      b=interval(b, None if boot is None else boot["b"], level), log_k_n=log_k_n,
                      log_k_d=log_k_d, flags=tuple(flags))


def _bootstrap(solve, cs, usable, good, n_boot, seed):
    if not n_boot:
        return None
    counts = count_weights(len(cs), n_boot, np.random.default_rng(seed), strata=cs)
    out = {"a": np.full(n_boot, np.nan), "b": np.full(n_boot, np.nan),
           **{("N", c): np.full(n_boot, np.nan) for c in usable}, **{("D", c): np.full(n_boot, np.nan) for c in usable}}
    for i, w in enumerate(counts):
        verts, good_i, (a, _), (b, _) = solve(w.astype(float))
        for c in usable:
            out[("N", c)][i], out[("D", c)][i] = verts[c].log_n, verts[c].log_d
        if set(good_i) == set(good):  # the same budgets as the estimate, or the exponent means something else
            out["a"][i], out["b"][i] = a, b
    return out


def _budget_row(c, n_sizes, v: _Vertex, boot, level) -> dict:
    note = ""
    if not math.isfinite(v.log_n):
        note = "loss is not convex in log N here (no minimum)" if math.isfinite(v.curvature) else "no fit"
    elif not v.inside:
        note = "minimum outside the sampled sizes (extrapolated; left out of the exponent fit)"
    n = interval(math.exp(v.log_n) if math.isfinite(v.log_n) else math.nan,
                 None if boot is None else np.exp(boot[("N", c)]), level)
    d = interval(math.exp(v.log_d) if math.isfinite(v.log_d) else math.nan,
                 None if boot is None else np.exp(boot[("D", c)]), level)
    return {"C": c, "sizes": n_sizes, "N_opt": n.estimate, "N_opt_low": n.low, "N_opt_high": n.high,
            "D_opt": d.estimate, "D_opt_low": d.low, "D_opt_high": d.high, "loss_opt": v.loss, "note": note}
