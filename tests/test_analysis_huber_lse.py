"""The Chinchilla Approach-3 objective, grid and multi-start search."""

import itertools

import numpy as np
from scipy.optimize import minimize

from analysis import huber_lse


def _chinchilla_points(seed=0, noise=0.005):
    rng = np.random.default_rng(seed)
    N, D = [], []
    for C in np.geomspace(1e18, 1e21, 4):
        for f in np.geomspace(0.25, 4, 6):
            n = 0.1 * np.sqrt(C / 6) * f
            N.append(n)
            D.append(C / (6 * n))
    N, D = np.array(N), np.array(D)
    L = (1.7 + 400 * N ** -0.34 + 1500 * D ** -0.3) * np.exp(rng.normal(0, noise, len(N)))
    return np.log(np.column_stack([N, D])), np.log(L)


def test_paper_grid_is_hoffmann_app_d2():
    grid = huber_lse.paper_grid(2)
    assert grid.shape == (4500, 5)
    a, b, e, alpha, beta = (set(np.round(grid[:, i], 6)) for i in range(5))
    assert a == b == {0.0, 5.0, 10.0, 15.0, 20.0, 25.0}
    assert e == {-1.0, -0.5, 0.0, 0.5, 1.0}
    assert alpha == beta == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert len({tuple(r) for r in grid}) == 4500
    assert huber_lse.paper_grid(1).shape == (150, 3)


def test_huber_matches_definition():
    r = np.array([-0.01, -1e-3, -1e-4, 0.0, 5e-4, 2e-3])
    d = 1e-3
    expected = np.where(np.abs(r) <= d, 0.5 * r ** 2, d * (np.abs(r) - 0.5 * d))
    np.testing.assert_allclose(huber_lse.huber(r, d), expected)


def test_objective_value_and_gradient():
    log_x, log_y = _chinchilla_points()
    rng = np.random.default_rng(1)
    weights = rng.integers(0, 3, (2, len(log_y))).astype(float)
    fg = huber_lse.objective(log_x, log_y, weights)
    x = np.array([[6.0, 7.3, 0.5, 0.33, 0.3], [5.0, 8.0, 0.2, 0.3, 0.35]])
    f, g = fg(x, np.array([0, 1]))
    pred = huber_lse.predict_log(x, log_x)
    np.testing.assert_allclose(f, (weights * huber_lse.huber(pred - log_y)).sum(axis=1), rtol=1e-12)
    eps = 1e-7
    for j in range(5):
        step = np.zeros_like(x)
        step[:, j] = eps
        num = (fg(x + step, np.array([0, 1]))[0] - fg(x - step, np.array([0, 1]))[0]) / (2 * eps)
        np.testing.assert_allclose(g[:, j], num, rtol=1e-4, atol=1e-9)


def test_count_weights_equal_resampled_data():
    """A bootstrap replicate as integer weights is the same problem as the explicitly resampled data."""
    log_x, log_y = _chinchilla_points(seed=3)
    counts = np.random.default_rng(0).multinomial(len(log_y), np.full(len(log_y), 1 / len(log_y)))
    idx = np.repeat(np.arange(len(log_y)), counts)
    starts = huber_lse.paper_grid(2)[::150]
    weighted = huber_lse.fit_multistart(log_x, log_y, starts, counts[None].astype(float))
    explicit = huber_lse.fit_multistart(log_x[idx], log_y[idx], starts)
    np.testing.assert_allclose(weighted.fun, explicit.fun, rtol=1e-9)
    np.testing.assert_allclose(weighted.params, explicit.params, atol=1e-4)  # the (a, alpha) ridge is flat


def test_grid_search_matches_scipy_loop():
    """The batched search finds what looping scipy's L-BFGS-B over the same starts finds."""
    log_x, log_y = _chinchilla_points(seed=5)
    grid = huber_lse.paper_grid(2)
    starts = grid[np.random.default_rng(0).choice(len(grid), 20, replace=False)]
    ours = huber_lse.fit_multistart(log_x, log_y, starts)
    fg = huber_lse.objective(log_x, log_y, np.ones((1, len(log_y))))

    def f(v):
        value, grad = fg(v[None], np.zeros(1, int))
        return value[0], grad[0]

    ref = min((minimize(f, s, jac=True, method="L-BFGS-B") for s in starts), key=lambda r: r.fun)
    assert ours.converged[0]
    assert ours.fun[0] <= ref.fun * (1 + 1e-9)
    # ... and scipy cannot improve on our optimum: it is a genuine local minimum.
    polished = minimize(f, ours.params[0], jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    assert polished.fun >= ours.fun[0] * (1 - 1e-9)
    np.testing.assert_allclose(polished.x, ours.params[0], atol=1e-4)


def test_distinct_best_keeps_one_start_per_minimum():
    log_x, log_y = _chinchilla_points(seed=7)
    res = huber_lse.fit_multistart(log_x, log_y, huber_lse.paper_grid(2)[::20])
    starts = huber_lse.distinct_best(res, 4)
    assert 1 <= len(starts) <= 4
    for p, q in itertools.combinations(starts, 2):
        assert np.abs(p - q).max() > 0.05
    np.testing.assert_allclose(starts[0], res.params[0])  # the polished winner comes first
    fg = huber_lse.objective(log_x, log_y, np.ones((1, len(log_y))))
    values = fg(starts, np.zeros(len(starts), int))[0]
    assert (values <= 3.0 * res.fun[0] * (1 + 1e-12)).all()  # only competitive minima
