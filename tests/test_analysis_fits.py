"""Power-law and Chinchilla fits: recovery, bootstrap coverage, degenerate input, flags."""

import warnings

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import count_weights
from analysis.fits import FitWarning, InsufficientDataError, fit_chinchilla, fit_power_law
from analysis.huber_lse import paper_grid

PL = {"E": 2.0, "A": 400.0, "alpha": 0.3}
CH = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.30}


def power_law_data(seed, noise=0.01, sizes=6, seeds=2):
    rng = np.random.default_rng(seed)
    x = np.repeat(np.geomspace(1e6, 1e9, sizes), seeds)
    y = (PL["E"] + PL["A"] * x ** -PL["alpha"]) * np.exp(rng.normal(0, noise, len(x)))
    return x, y


def chinchilla_data(seed, noise=0.005, budgets=4, per_budget=6):
    """An isoFLOP-style design: sizes spread around C = 6 N D at each budget."""
    rng = np.random.default_rng(seed)
    N, D = [], []
    for C in np.geomspace(1e18, 1e21, budgets):
        for f in np.geomspace(0.25, 4, per_budget):
            n = 0.1 * np.sqrt(C / 6) * f
            N.append(n)
            D.append(C / (6 * n))
    N, D = np.array(N), np.array(D)
    L = (CH["E"] + CH["A"] * N ** -CH["alpha"] + CH["B"] * D ** -CH["beta"]) * np.exp(rng.normal(0, noise, len(N)))
    return N, D, L


def test_power_law_recovers_exact_data():
    x, y = power_law_data(0, noise=0.0)
    fit = fit_power_law(x, y)
    assert fit.converged and fit.ok, fit.flags
    for k, v in PL.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-3)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-5)
    np.testing.assert_allclose(fit.inverse(fit.predict(3e7)), 3e7, rtol=1e-6)
    assert np.isnan(fit.inverse(fit.E - 0.1))  # below the irreducible loss: never reached


def test_power_law_recovers_noisy_data_and_reads_dataframes():
    x, y = power_law_data(1, noise=0.005)
    df = pd.DataFrame({"params": x, "val_loss": y})
    fit = fit_power_law("params", "val_loss", data=df, n_boot=100)
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    assert fit.E == pytest.approx(2.0, rel=0.05)
    same = fit_power_law(x, y)
    assert same.alpha == pytest.approx(fit.alpha, rel=1e-9)
    table = fit.table()
    assert list(table.index) == ["E", "A", "alpha"]
    assert (table["low"] <= table["estimate"]).all() and (table["estimate"] <= table["high"]).all()


def _coverage(fits_and_truth):
    hits = {}
    for fit, truth in fits_and_truth:
        for k, v in truth.items():
            hits.setdefault(k, []).append(fit.interval(k).covers(v))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_power_law_bootstrap_intervals_cover_truth():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        cov = _coverage((fit_power_law(*power_law_data(100 + i), n_boot=100, seed=i), PL) for i in range(50))
    # nominal 95%; percentile intervals on 12 points may run a little short, never far
    assert min(cov.values()) >= 0.8, cov


@pytest.mark.slow
def test_power_law_bootstrap_coverage_large():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        cov = _coverage((fit_power_law(*power_law_data(1000 + i), n_boot=400, seed=i), PL) for i in range(300))
    assert min(cov.values()) >= 0.88, cov


def test_chinchilla_recovers_parameters_with_the_paper_procedure():
    N, D, L = chinchilla_data(0, noise=0.003)
    fit = fit_chinchilla(N, D, L)  # the full 4,500-start grid of App. D.2
    assert fit.ok, fit.flags
    assert fit.alpha == pytest.approx(CH["alpha"], abs=0.02)
    assert fit.beta == pytest.approx(CH["beta"], abs=0.02)
    assert fit.E == pytest.approx(CH["E"], rel=0.05)
    assert fit.A == pytest.approx(CH["A"], rel=0.35) and fit.B == pytest.approx(CH["B"], rel=0.35)
    a_true = CH["beta"] / (CH["alpha"] + CH["beta"])
    assert fit.interval("a").estimate == pytest.approx(a_true, abs=0.02)


def test_compute_optimal_allocation_formulas():
    N, D, L = chinchilla_data(1)
    fit = fit_chinchilla(N, D, L, init_grid=paper_grid(2)[::10], n_boot=50)
    C = np.array([1e21, 1e23])
    n, d = fit.n_opt(C), fit.d_opt(C)
    np.testing.assert_allclose(6 * n * d, C, rtol=1e-12)
    s = fit.alpha + fit.beta
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / s)
    np.testing.assert_allclose(n, G * (C / 6) ** (fit.beta / s), rtol=1e-12)
    np.testing.assert_allclose(d, (C / 6) ** (fit.alpha / s) / G, rtol=1e-12)
    # N_opt minimizes the fitted loss along the budget: nearby allocations are worse
    for c, n0 in zip(C, n):
        for f in (0.8, 1.25):
            assert fit.predict(n0 * f, c / (6 * n0 * f)) > fit.predict(n0, c / (6 * n0))
    table = fit.compute_optimal(C)
    assert (table["N_opt_low"] <= table["N_opt"]).all() and (table["N_opt"] <= table["N_opt_high"]).all()
    np.testing.assert_allclose(table["tokens_per_param"], d / n)


def test_chinchilla_bootstrap_intervals_cover_truth():
    # A 100-start subset of the grid keeps 50 fits fast; the slow test below uses the full grid.
    grid = paper_grid(2)[::45]
    truth = {**CH, "a": CH["beta"] / (CH["alpha"] + CH["beta"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        cov = _coverage((fit_chinchilla(*chinchilla_data(200 + i), n_boot=50, seed=i, init_grid=grid), truth)
                        for i in range(50))
    assert min(cov.values()) >= 0.8, cov


@pytest.mark.slow
def test_chinchilla_bootstrap_coverage_full_grid():
    truth = {**CH, "a": CH["beta"] / (CH["alpha"] + CH["beta"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        cov = _coverage((fit_chinchilla(*chinchilla_data(2000 + i), n_boot=200, seed=i), truth) for i in range(100))
    assert min(cov.values()) >= 0.85, cov


def test_too_few_points_is_a_clear_error():
    with pytest.raises(InsufficientDataError, match="needs at least 4 usable points with 3 distinct"):
        fit_power_law([1e6, 1e6, 1e7, 1e7], [3.0, 3.1, 2.8, 2.9])
    N, D, L = chinchilla_data(0)
    with pytest.raises(InsufficientDataError, match="5 distinct"):
        fit_chinchilla(N[:4], D[:4], L[:4])


def test_nan_and_nonpositive_points_are_dropped_with_a_warning():
    x, y = power_law_data(2)
    y = y.copy()
    y[0], y[3] = np.nan, -1.0
    with pytest.warns(FitWarning, match="dropped 2 of 12 points"):
        fit = fit_power_law(x, y)
    assert fit.n_points == 10
    x, y = power_law_data(2)
    y = np.full_like(y, np.nan)
    with pytest.warns(FitWarning), pytest.raises(InsufficientDataError, match="got 0 points"):
        fit_power_law(x, y)


def test_collinear_tokens_cannot_separate_the_two_terms():
    N = np.geomspace(1e7, 1e9, 8)
    with pytest.raises(InsufficientDataError, match="lockstep"):
        fit_chinchilla(N, 20 * N, 2 + 100 * N ** -0.3)  # tokens = 20 x params: one curve, not a surface
    # Fixed tokens are not "lockstep with N (R^2=1.0)": the error says the tokens are constant.
    with pytest.raises(InsufficientDataError, match=r"tokens D are the same \(1e\+09\) for every run") as e:
        fit_chinchilla(N, np.full(8, 1e9), 2 + 100 * N ** -0.3)
    assert "lockstep" not in str(e.value)
    with pytest.raises(InsufficientDataError, match="parameters N are the same"):
        fit_chinchilla(np.full(8, 1e8), N, 2 + 100 * N ** -0.3)


def test_flat_data_is_flagged_not_reported_as_a_law():
    x = np.repeat(np.geomspace(1e6, 1e9, 5), 2)
    y = 3.0 + np.random.default_rng(0).normal(0, 0.01, len(x))  # no size dependence at all
    with pytest.warns(FitWarning):
        fit = fit_power_law(x, y)
    assert not fit.ok
    assert any("alpha" in f or "collapsed" in f or "diverged" in f for f in fit.flags), fit.flags


def test_non_convergence_is_flagged():
    x, y = power_law_data(3)
    with pytest.warns(FitWarning, match="did not converge"):
        fit = fit_power_law(x, y, maxiter=2)
    assert not fit.converged and not fit.ok


def test_three_sizes_for_three_parameters_is_flagged():
    x, y = power_law_data(4, sizes=3, seeds=3)
    with pytest.warns(FitWarning, match="only 3 distinct"):
        fit = fit_power_law(x, y, n_boot=50)
    assert not fit.ok


def test_bands_and_derived_numbers_come_from_the_same_draws():
    x, y = power_law_data(5)
    fit = fit_power_law(x, y, n_boot=200)
    grid = np.geomspace(1e6, 1e9, 7)
    low, high = fit.band(lambda p: fit.predict(grid, params=p))
    pred = fit.predict(grid)
    assert low.shape == grid.shape and (low <= pred + 1e-9).all() and (pred <= high + 1e-9).all()
    iv = fit.derived(lambda p: p["E"] + p["A"] * 1e7 ** -p["alpha"])
    assert iv.estimate == pytest.approx(fit.predict(1e7))
    i = list(grid).index(1e7) if 1e7 in grid else None
    assert i is None or (iv.low == pytest.approx(low[i]) and iv.high == pytest.approx(high[i]))
    with pytest.raises(KeyError, match="unknown quantity"):
        fit.interval("beta")


def test_grouped_bootstrap_moves_seeds_together():
    x, y = power_law_data(6, seeds=3)
    df = pd.DataFrame({"N": x, "L": y, "config": [f"size-{i // 3}" for i in range(len(x))]})
    fit = fit_power_law("N", "L", data=df, n_boot=100, groups="config")  # all seeds of one size form a group
    same = fit_power_law(x, y, n_boot=100, groups=np.repeat(np.arange(6), 3))
    np.testing.assert_array_equal(fit.samples, same.samples)
    assert fit.samples.shape == (100, 3)
    assert np.isfinite(fit.samples).all(axis=1).mean() > 0.5
    # whole groups drawn: every replicate has a multiple of 3 points of each size
    counts = count_weights(len(x), 100, np.random.default_rng(0), groups=df["config"])
    assert (counts.reshape(100, 6, 3).std(axis=2) == 0).all()
