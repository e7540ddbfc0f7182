"""L-BFGS run on many independent problems at once, vectorized with numpy.

The Chinchilla procedure (Hoffmann et al. 2022, App. D.2) starts L-BFGS from
every point of a 4,500-point initialization grid and keeps the best result.
Looping ``scipy.optimize.minimize`` over the grid costs seconds per fit
(per-iteration Python overhead dominates for a few dozen data points), which
rules out bootstrapping. Here every start is its own L-BFGS run -- its own
history, step lengths and stopping test -- but the arithmetic of all runs
still active is done in one batched numpy call.

Algorithm per run: two-loop recursion over the last ``memory`` pairs with the
usual ``s.y / y.y`` initial scaling; an Armijo line search that backtracks by
safeguarded quadratic interpolation and lengthens steps that still descend
steeply (the Wolfe curvature condition); pairs with ``s.y <= eps * y.y``
skipped, which keeps the inverse-Hessian estimate positive definite.
Stopping tests mirror scipy's L-BFGS-B: max |gradient| <= ``gtol`` or
relative decrease <= ``ftol``; both count as converged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# f_and_grad(x[k, p], rows[k]) -> (f[k], g[k, p]); ``rows`` says which of the
# batch's problems the k points belong to (problems may differ in their data).
FunGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

RUNNING, GTOL, FTOL, MAXITER, LINESEARCH, NONFINITE = range(6)
STATUS_TEXT = ("running", "gradient tolerance reached", "relative decrease below ftol",
               "iteration limit reached", "line search failed", "objective not finite at start")


@dataclass(frozen=True)
class BatchResult:
    x: np.ndarray  # (B, p) final points
    fun: np.ndarray  # (B,) final objective values
    status: np.ndarray  # (B,) one of the codes above
    nit: np.ndarray  # (B,) iterations taken

    @property
    def converged(self) -> np.ndarray:
        return (self.status == GTOL) | (self.status == FTOL)


def _dot(a, b):
    return (a * b).sum(axis=-1)


def _direction(g, S, Y, rho):
    """-H g for a batch by the two-loop recursion; empty history slots (rho = 0) drop out."""
    q = g.copy()
    m = S.shape[1]
    alphas = np.empty((g.shape[0], m))
    for i in range(m - 1, -1, -1):
        alphas[:, i] = rho[:, i] * _dot(S[:, i], q)
        q -= alphas[:, i, None] * Y[:, i]
    # Initial scaling gamma = s.y / y.y = 1 / (rho y.y) of the newest pair; 1 without history.
    has = rho[:, -1] > 0
    gamma = np.ones(len(g))
    gamma[has] = 1.0 / (rho[has, -1] * _dot(Y[has, -1], Y[has, -1]))
    r = gamma[:, None] * q
    for i in range(m):
        r += S[:, i] * (alphas[:, i] - rho[:, i] * _dot(Y[:, i], r))[:, None]
    return -r


def _line_search(fg, x, f, g, d, rows, t, c1, c2, max_steps):
    """Armijo line search for every row; returns the new point, f, g and an ok-mask.

    Rows whose first trial fails the sufficient-decrease test backtrack
    (safeguarded quadratic interpolation); rows whose first trial passes but
    still descend steeply (curvature condition g_new.d >= c2 g.d violated)
    lengthen the step by 4x while the objective keeps falling. Without the
    lengthening, runs whose L-BFGS steps are too short (kinks of the Huber
    loss inflate the curvature pairs) crawl for thousands of iterations.
    Both kinds of trial share one objective call per round.
    """
    gd = _dot(g, d)
    with np.errstate(all="ignore"):
        x_new = x + t[:, None] * d
        f_new, g_new = fg(x_new, rows)
    ok = np.isfinite(f_new) & np.isfinite(g_new).all(axis=1) & (f_new <= f + c1 * t * gd)
    back = np.flatnonzero(~ok)
    grow = np.flatnonzero(ok & (_dot(g_new, d) < c2 * gd))
    for _ in range(max_steps):
        if not len(back) and not len(grow):
            break
        tb, ftb = t[back], f_new[back]
        denom = 2.0 * (ftb - f[back] - gd[back] * tb)
        with np.errstate(all="ignore"):
            t_quad = np.where(np.isfinite(ftb) & (denom > 0), -gd[back] * tb * tb / denom, 0.1 * tb)
        idx = np.concatenate([back, grow])
        tt = np.concatenate([np.clip(t_quad, 0.1 * tb, 0.5 * tb), 4.0 * t[grow]])
        with np.errstate(all="ignore"):
            xt = x[idx] + tt[:, None] * d[idx]
            ft, gt = fg(xt, rows[idx])
        armijo = np.isfinite(ft) & np.isfinite(gt).all(axis=1) & (ft <= f[idx] + c1 * tt * gd[idx])
        nb = len(back)
        # Backtracking rows keep their latest trial (the next interpolation needs it).
        t[back], x_new[back], f_new[back], g_new[back] = tt[:nb], xt[:nb], ft[:nb], gt[:nb]
        ok[back[armijo[:nb]]] = True
        # Growing rows move only to a better point.
        acc = armijo[nb:] & (ft[nb:] < f_new[grow])
        upd = grow[acc]
        t[upd], x_new[upd], f_new[upd], g_new[upd] = tt[nb:][acc], xt[nb:][acc], ft[nb:][acc], gt[nb:][acc]
        back = back[~armijo[:nb]]
        grow = upd[_dot(gt[nb:][acc], d[upd]) < c2 * gd[upd]]
    return x_new, f_new, g_new, ok


def minimize_batch(fg: FunGrad, x0: np.ndarray, rows: np.ndarray | None = None, *, memory: int = 10,
                   gtol: float = 1e-5, ftol: float = 2.220446049250313e-09, maxiter: int = 15000,
                   c1: float = 1e-4, c2: float = 0.9, max_line_steps: int = 30, floor: float = 1.0) -> BatchResult:
    """Minimize B independent problems from the B rows of ``x0``.

    ``rows[i]`` names the problem the i-th start belongs to (passed back to
    ``fg``), default ``arange(B)``. Defaults are scipy L-BFGS-B's (maxcor=10,
    pgtol=1e-5, factr*eps=2.2e-9, maxiter=15000); ``floor`` is the smallest
    |f| the relative-decrease test divides by (scipy: 1, which makes the test
    absolute for objectives below 1 -- pass 0 for a scale-free test).
    """
    x_out = np.array(x0, dtype=float, copy=True)
    n, p = x_out.shape
    rows_all = np.arange(n) if rows is None else np.asarray(rows)
    with np.errstate(all="ignore"):
        f_out, g0 = fg(x_out, rows_all)
    status = np.where(np.isfinite(f_out) & np.isfinite(g0).all(axis=1), RUNNING, NONFINITE)
    status[(status == RUNNING) & (np.abs(g0).max(axis=1) <= gtol)] = GTOL
    nit = np.zeros(n, int)
    # Working state holds only the runs still going; it is compacted whenever
    # some finish, so the long tail of slow starts costs per-call overhead
    # rather than gathers over the whole batch.
    idx = np.flatnonzero(status == RUNNING)
    x, f, g, rows = x_out[idx], f_out[idx], g0[idx], rows_all[idx]
    S, Y, rho = np.zeros((len(idx), memory, p)), np.zeros((len(idx), memory, p)), np.zeros((len(idx), memory))
    for it in range(maxiter):
        if not len(idx):
            break
        d = _direction(g, S, Y, rho)
        restart = ~(_dot(g, d) < 0)  # not a descent direction (round-off): forget the history
        if restart.any():
            d[restart] = -g[restart]
            S[restart], Y[restart], rho[restart] = 0.0, 0.0, 0.0
        fresh = rho[:, -1] == 0
        t0 = np.where(fresh, np.minimum(1.0, 1.0 / np.maximum(np.sqrt(_dot(d, d)), 1e-300)), 1.0)
        x_new, f_new, g_new, ok = _line_search(fg, x, f, g, d, rows, t0, c1, c2, max_line_steps)
        s, y = x_new - x, g_new - g
        sy = _dot(s, y)
        keep = ok & (sy > np.finfo(float).eps * _dot(y, y))
        S[keep, :-1], Y[keep, :-1], rho[keep, :-1] = S[keep, 1:], Y[keep, 1:], rho[keep, 1:]
        S[keep, -1], Y[keep, -1], rho[keep, -1] = s[keep], y[keep], 1.0 / np.where(keep, sy, 1.0)[keep]
        f_old = f
        x, f, g = np.where(ok[:, None], x_new, x), np.where(ok, f_new, f), np.where(ok[:, None], g_new, g)
        nit[idx[ok]] += 1
        done = np.where(ok, RUNNING, LINESEARCH)
        small_step = (f_old - f) <= ftol * np.maximum(np.maximum(np.abs(f_old), np.abs(f)), floor)
        done[ok & small_step] = FTOL
        done[ok & (np.abs(g).max(axis=1) <= gtol)] = GTOL
        if (done != RUNNING).any():
            fin = done != RUNNING
            status[idx[fin]] = done[fin]
            x_out[idx[fin]], f_out[idx[fin]] = x[fin], f[fin]
            live = ~fin
            idx, x, f, g, rows = idx[live], x[live], f[live], g[live], rows[live]
            S, Y, rho = S[live], Y[live], rho[live]
    status[idx] = MAXITER
    x_out[idx], f_out[idx] = x, f
    return BatchResult(x=x_out, fun=f_out, status=status, nit=nit)
