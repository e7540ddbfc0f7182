"""The batched L-BFGS: every row is an independent, correctly converged run."""

import numpy as np
import pytest
from scipy.optimize import minimize

from analysis.lbfgs import FTOL, GTOL, MAXITER, NONFINITE, minimize_batch


def rosenbrock(params):
    """A batch of shifted Rosenbrock functions (any dimension); row i has its minimum at x = shift[i] everywhere."""
    shift = params

    def fg(x, rows):
        s = shift[rows][:, None]
        y = x - s + 1.0  # minimum of the standard function at y = 1
        f = (100.0 * (y[:, 1:] - y[:, :-1] ** 2) ** 2 + (1.0 - y[:, :-1]) ** 2).sum(axis=1)
        g = np.zeros_like(x)
        g[:, :-1] += -400.0 * y[:, :-1] * (y[:, 1:] - y[:, :-1] ** 2) - 2.0 * (1.0 - y[:, :-1])
        g[:, 1:] += 200.0 * (y[:, 1:] - y[:, :-1] ** 2)
        return f, g

    return fg


def test_converges_to_each_rows_own_minimum():
    shift = np.array([0.0, 1.0, 2.0, -1.0, 3.0])
    rng = np.random.default_rng(0)
    x0 = shift[:, None] - 1.0 + rng.normal(0, 0.5, (5, 4))
    res = minimize_batch(rosenbrock(shift), x0, gtol=1e-9, ftol=0.0, floor=0.0)
    assert res.converged.all()
    np.testing.assert_allclose(res.x, np.repeat(shift[:, None], 4, axis=1), atol=1e-6)


def test_agrees_with_scipy_lbfgsb():
    shift = np.zeros(3)
    x0 = np.array([[-1.2, 1.0, -0.5, 0.3], [2.0, -1.0, 0.5, 1.5], [0.1, 0.2, 0.3, 0.4]])
    fg = rosenbrock(shift)
    res = minimize_batch(fg, x0, gtol=1e-8, ftol=0.0, floor=0.0)
    for i in range(3):
        ref = minimize(lambda v: tuple(a[0] for a in fg(v[None], np.array([i]))), x0[i], jac=True,
                       method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-15})
        np.testing.assert_allclose(res.x[i], ref.x, atol=1e-5)
        assert res.fun[i] <= ref.fun + 1e-10


def test_rows_do_not_influence_each_other():
    shift = np.array([0.5, -0.5, 0.0])
    x0 = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-2.0, 1.0, 0.0, 1.0]])
    together = minimize_batch(rosenbrock(shift), x0)
    for i in range(3):
        alone = minimize_batch(lambda x, rows: rosenbrock(shift)(x, rows + i), x0[i:i + 1])
        np.testing.assert_allclose(together.x[i], alone.x[0], rtol=1e-12, atol=1e-12)
        assert together.nit[i] == alone.nit[0]


def test_status_codes():
    def quad(x, rows):
        return (x * x).sum(axis=1), 2.0 * x

    res = minimize_batch(quad, np.array([[0.0, 0.0], [np.nan, 1.0], [3.0, -4.0]]))
    assert res.status[0] == GTOL and res.status[1] == NONFINITE
    assert res.status[2] in (GTOL, FTOL) and np.abs(res.x[2]).max() < 1e-5
    slow = minimize_batch(rosenbrock(np.zeros(1)), np.array([[-1.2, 1.0, -1.2, 1.0]]), maxiter=3)
    assert slow.status[0] == MAXITER and not slow.converged[0]


@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_relative_decrease_test_scale(floor):
    """scipy's floor of 1 makes the decrease test absolute, which stops a tiny objective far from
    its minimum (Besiroglu et al.'s diagnosis of the original fits); floor 0 is scale-free."""
    fg = rosenbrock(np.zeros(1))

    def tiny(x, rows):
        f, g = fg(x, rows)
        return 1e-6 * f, 1e-6 * g

    # 2-D (the 4-D function also has a local minimum); the standard start (-1.2, 1) in shifted coordinates.
    res = minimize_batch(tiny, np.array([[-2.2, 0.0]]), gtol=1e-14, floor=floor)
    err = np.abs(res.x).max()
    if floor == 0.0:
        assert err < 1e-4
    else:
        assert res.status[0] == FTOL and err > 1e-2
