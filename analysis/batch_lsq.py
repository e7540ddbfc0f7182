"""Levenberg-Marquardt for many small weighted least-squares problems at once.

Bootstrap replicates of the accuracy fits are the same 2- or 4-parameter
problem under different point weights, started from the full-data estimate;
solving them together in numpy replaces hundreds of ``least_squares`` calls.
Box bounds are kept by clipping each step (the replicates start inside the
box at the estimate, and a replicate whose solution presses on a bound is
reported as such by the caller).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# model(X[B, p]) -> (residuals[B, n], jacobian[B, n, p])
Model = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def levenberg_marquardt(model: Model, x0: np.ndarray, weights: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                        *, maxiter: int = 200, rtol: float = 1e-10):
    """Minimize sum_i w_i r_i(x)^2 for every row of ``x0``; returns (x, cost, converged)."""
    x = np.clip(np.array(x0, float), lower, upper)
    B, p = x.shape
    r, J = model(x)
    cost = (weights * r * r).sum(axis=1)
    lam = np.full(B, 1e-3)
    done = np.zeros(B, bool)
    eye = np.eye(p)
    for _ in range(maxiter):
        act = np.flatnonzero(~done)
        if not len(act):
            break
        w, Ja, ra = weights[act], J[act], r[act]
        JtW = Ja.transpose(0, 2, 1) * w[:, None, :]
        H = JtW @ Ja
        g = (JtW @ ra[..., None])[..., 0]
        damp = lam[act, None, None] * (eye * np.maximum(np.einsum("bii->bi", H), 1e-12)[:, None, :])
        with np.errstate(all="ignore"):
            try:
                step = np.linalg.solve(H + damp, -g[..., None])[..., 0]
            except np.linalg.LinAlgError:
                # Some replicate's system is singular (e.g. flat residuals): the pseudo-inverse
                # gives it a zero step along the flat directions instead of stopping every replicate.
                step = (np.linalg.pinv(H + damp) @ -g[..., None])[..., 0]
        x_new = np.clip(x[act] + np.where(np.isfinite(step), step, 0.0), lower, upper)
        with np.errstate(all="ignore"):
            r_new, J_new = model(x_new)
        cost_new = (w * r_new * r_new).sum(axis=1)
        better = np.isfinite(cost_new) & (cost_new <= cost[act])
        small = np.abs(cost[act] - cost_new) <= rtol * np.maximum(cost[act], 1e-300)
        up = act[better]
        x[up], r[up], J[up] = x_new[better], r_new[better], J_new[better]
        cost[up] = cost_new[better]
        lam[act] = np.where(better, lam[act] / 3.0, lam[act] * 4.0)
        done[act[(better & small) | (lam[act] > 1e12)]] = True
    converged = done & (lam <= 1e12)
    return x, cost, converged
