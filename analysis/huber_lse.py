"""The Chinchilla objective: Huber loss on log L against a log-sum-exp model.

For K scaling variables X_1..X_K (N alone, C alone, or N and D) the model is

    log L_hat = LSE(a_1 - alpha_1 log X_1, ..., a_K - alpha_K log X_K, e)

i.e. L_hat = E + sum_k A_k / X_k^alpha_k with A_k = exp(a_k), E = exp(e).
Parameters are ordered ``[a_1..a_K, e, alpha_1..alpha_K]`` -- for K = 2 that
is Hoffmann et al.'s (a, b, e, alpha, beta). The objective is the Huber loss
(delta = 1e-3) of the log residuals, *summed* over points: Besiroglu et al.
(2024) trace Hoffmann et al.'s unconverged estimates to a badly scaled
objective, and the sum keeps L-BFGS's relative stopping test meaningful.

Resampling is expressed as integer weights per point (a bootstrap replicate
is the full data set weighted by how often each point was drawn), so every
replicate of every start is one row of a single batched L-BFGS run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from analysis.lbfgs import BatchResult, minimize_batch

DELTA = 1e-3
# Hoffmann et al. (2022) App. D.2 initialization grid.
PAPER_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
PAPER_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
PAPER_COEFS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def paper_grid(k: int) -> np.ndarray:
    """The App. D.2 grid in parameter order [a.., e, alpha..]: 4,500 starts for k = 2."""
    axes = [PAPER_COEFS] * k + [PAPER_E] + [PAPER_EXPONENTS] * k
    return np.array(list(itertools.product(*axes)), dtype=float)


def predict_log(params: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """log L_hat for params (P, 2k+1) at points log_x (n, k) -> (P, n)."""
    params = np.atleast_2d(params)
    k = log_x.shape[1]
    a, e, alpha = params[:, :k], params[:, k], params[:, k + 1:]
    terms = a[:, None, :] - alpha[:, None, :] * log_x[None, :, :]
    terms = np.concatenate([terms, np.broadcast_to(e[:, None, None], terms.shape[:2] + (1,))], axis=2)
    top = terms.max(axis=2, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(axis=2, keepdims=True)))[..., 0]


def objective(log_x: np.ndarray, log_y: np.ndarray, weights: np.ndarray, delta: float = DELTA):
    """f_and_grad(x, rows) for :func:`minimize_batch`; ``weights[rows]`` weight the points.

    Written term by term on (starts, points) arrays: reductions over a
    length-3 axis are several times slower in numpy than elementwise ops.
    """
    k = log_x.shape[1]
    cols = [np.ascontiguousarray(log_x[:, j]) for j in range(k)]
    unweighted = bool(np.all(weights == 1.0))

    def fg(x: np.ndarray, rows: np.ndarray):
        terms = [x[:, j, None] - x[:, k + 1 + j, None] * cols[j][None, :] for j in range(k)]
        top = np.maximum(x[:, k, None], terms[0])
        for t in terms[1:]:
            np.maximum(top, t, out=top)
        ex = [np.exp(t - top) for t in terms]
        ex_e = np.exp(x[:, k, None] - top)
        total = ex_e + sum(ex)
        r = top + np.log(total) - log_y[None, :]
        c = np.clip(r, -delta, delta)  # the Huber derivative; huber(r) = c * (r - c / 2)
        if unweighted:
            f = (c * (r - 0.5 * c)).sum(axis=1)
            psi = c / total  # times d LSE / d exp(term) below
        else:
            w = weights[rows]
            f = (w * c * (r - 0.5 * c)).sum(axis=1)
            psi = w * c / total
        g = np.empty_like(x)
        for j in range(k):
            pe = psi * ex[j]
            g[:, j] = pe.sum(axis=1)
            g[:, k + 1 + j] = -(pe @ cols[j])
        g[:, k] = (psi * ex_e).sum(axis=1)
        return f, g

    return fg


@dataclass(frozen=True)
class MultiStart:
    """Best start per problem: params (R, 2k+1), objective (R,), converged (R,)."""

    params: np.ndarray
    fun: np.ndarray
    converged: np.ndarray
    raw: BatchResult  # every start, for diagnostics and for choosing bootstrap starts


def fit_multistart(log_x: np.ndarray, log_y: np.ndarray, starts: np.ndarray, weights: np.ndarray | None = None,
                   *, delta: float = DELTA, chunk: int = 600_000, polish: bool = True, **lbfgs) -> MultiStart:
    """L-BFGS from every start for every weight row; the lowest objective wins per row.

    With ``polish`` each row's winner is then run on to gtol=1e-10 (it can
    only improve; its convergence flag stays that of the grid run).

    ``weights`` is (R, n) (one row per problem, e.g. bootstrap replicate) or
    None for a single unweighted problem. Runs are chunked so the (starts x
    points) work arrays stay a few hundred MB at most.
    """
    log_x = np.asarray(log_x, float).reshape(len(log_y), -1)
    weights = np.ones((1, len(log_y))) if weights is None else np.asarray(weights, float)
    n_prob, n_start = weights.shape[0], starts.shape[0]
    fg = objective(log_x, np.asarray(log_y, float), weights, delta)
    x0 = np.tile(starts, (n_prob, 1))
    rows = np.repeat(np.arange(n_prob), n_start)
    per = max(n_start, (chunk // max(len(log_y), 1)) // n_start * n_start)
    # Scale-free relative-decrease test: scipy's max(|f|, 1) makes it absolute
    # for this objective (a sum of Huber terms of ~1e-3-sized log residuals is
    # far below 1), which stops runs started near an optimum -- bootstrap
    # replicates -- after a handful of iterations.
    lbfgs.setdefault("floor", 0.0)
    parts = [minimize_batch(fg, x0[i:i + per], rows[i:i + per], **lbfgs) for i in range(0, len(x0), per)]
    raw = BatchResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "fun", "status", "nit")))
    fun = np.where(np.isfinite(raw.fun), raw.fun, np.inf).reshape(n_prob, n_start)
    best = fun.argmin(axis=1)
    pick = np.arange(n_prob) * n_start + best
    params, value, converged = raw.x[pick], raw.fun[pick], raw.converged[pick]
    if polish:
        # The objective is very flat along (a, alpha) ridges, where scipy's
        # gtol=1e-5 leaves the winner a few percent off in A; continuing the
        # winners to a much tighter tolerance makes the estimate reproducible.
        tight = {**lbfgs, "gtol": 1e-10, "ftol": 1e-14}
        more = minimize_batch(fg, params, np.arange(n_prob), **tight)
        better = np.isfinite(more.fun) & (more.fun <= value)
        params = np.where(better[:, None], more.x, params)
        value = np.where(better, more.fun, value)
    return MultiStart(params=params, fun=value, converged=converged, raw=raw)


def distinct_best(result: MultiStart, count: int, tol: float = 0.05, within: float = 3.0) -> np.ndarray:
    """Bootstrap starts from a single-problem run: its (polished) winner, then up to
    ``count - 1`` other end points that differ from every chosen one by more
    than ``tol`` in some parameter and whose objective is within ``within``
    times the best -- one start per competitive local minimum. Minima far
    worse than the best on the full data rarely win a resample but would
    cost most of the bootstrap's iterations."""
    fun = np.where(np.isfinite(result.raw.fun), result.raw.fun, np.inf)
    limit = within * max(float(result.fun[0]), np.finfo(float).tiny)
    out: list[np.ndarray] = [result.params[0]]
    for i in np.argsort(fun):
        x = result.raw.x[i]
        if len(out) == count or not fun[i] <= limit:
            break
        if np.all(np.isfinite(x)) and all(np.abs(x - y).max() > tol for y in out):
            out.append(x)
    return np.array(out)
