"""Accuracy fits: bounded sigmoid in log N and the two-step form via the loss."""

import warnings

import numpy as np
import pytest
from scipy.optimize import least_squares

from analysis.accuracy import fit_accuracy_sigmoid, fit_two_step_accuracy
from analysis.batch_lsq import levenberg_marquardt
from analysis.fits import FitWarning, InsufficientDataError

K, X0, CHANCE = 0.8, np.log(3e8), 0.25
TS = {"a": 0.7, "k": -4.0, "L0": 3.0, "b": 0.1}


def sigmoid_data(seed, noise=0.02):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(1e6, 1e10, 8), 2)
    acc = CHANCE + (1 - CHANCE) / (1 + np.exp(-K * (np.log(N) - X0))) + rng.normal(0, noise, len(N))
    return N, acc


def two_step_data(seed, noise=0.01):
    """Sizes -> loss by a power law, loss -> accuracy by the two-step sigmoid."""
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(1e6, 1e10, 10), 2)
    L = (1.8 + 60 * N ** -0.25) * np.exp(rng.normal(0, 0.005, len(N)))
    acc = TS["a"] / (1 + np.exp(-TS["k"] * (L - TS["L0"]))) + TS["b"] + rng.normal(0, noise, len(N))
    return N, L, acc


def test_sigmoid_recovers_parameters():
    N, acc = sigmoid_data(0, noise=0.0)
    fit = fit_accuracy_sigmoid(N, acc, chance=CHANCE)
    assert fit.ok, fit.flags
    assert fit.k == pytest.approx(K, rel=1e-4) and fit.x0 == pytest.approx(X0, rel=1e-5)
    np.testing.assert_allclose(fit.predict(N), acc, atol=1e-6)
    assert fit.interval("N_mid").estimate == pytest.approx(3e8, rel=1e-3)
    # the curve runs from chance to 1
    assert fit.predict(1.0) == pytest.approx(CHANCE, abs=1e-5) and fit.predict(1e30) == pytest.approx(1.0, abs=1e-5)


def test_sigmoid_bootstrap_covers_truth():
    hits = {"k": [], "x0": []}
    for i in range(50):
        fit = fit_accuracy_sigmoid(*sigmoid_data(300 + i), chance=CHANCE, n_boot=150, seed=i)
        hits["k"].append(fit.interval("k").covers(K))
        hits["x0"].append(fit.interval("x0").covers(X0))
    cov = {k: np.mean(v) for k, v in hits.items()}
    assert min(cov.values()) >= 0.8, cov


def test_two_step_recovers_parameters_and_chains_the_loss_fit():
    N, L, acc = two_step_data(0, noise=0.002)
    fit = fit_two_step_accuracy(L, acc, N=N, n_boot=100)
    assert fit.a == pytest.approx(TS["a"], rel=0.1) and fit.k == pytest.approx(TS["k"], rel=0.15)
    assert fit.L0 == pytest.approx(TS["L0"], abs=0.05) and fit.b == pytest.approx(TS["b"], abs=0.03)
    assert fit.loss_fit is not None and fit.loss_fit.alpha == pytest.approx(0.25, abs=0.05)
    grid = np.geomspace(1e6, 1e10, 5)
    pred = fit.predict(grid)
    np.testing.assert_allclose(pred, fit.predict_from_loss(fit.loss_fit.predict(grid)))
    low, high = fit.band(grid)
    assert (low <= pred + 1e-9).all() and (pred <= high + 1e-9).all()
    truth = TS["a"] / (1 + np.exp(-TS["k"] * (1.8 + 60 * grid ** -0.25 - TS["L0"]))) + TS["b"]
    np.testing.assert_allclose(pred, truth, atol=0.03)


def test_two_step_bootstrap_covers_truth():
    hits = {k: [] for k in TS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        for i in range(50):
            _, L, acc = two_step_data(400 + i)
            fit = fit_two_step_accuracy(L, acc, n_boot=150, seed=i)
            for k, v in TS.items():
                hits[k].append(fit.interval(k).covers(v))
    cov = {k: np.mean(v) for k, v in hits.items()}
    assert min(cov.values()) >= 0.8, cov


def test_batched_replicates_match_least_squares():
    """The vectorized Levenberg-Marquardt used for replicates lands where scipy's solver does."""
    N, acc = sigmoid_data(7)
    x = np.log(N)
    rng = np.random.default_rng(0)
    weights = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=5).astype(float)

    def model(P):
        k, x0 = P[:, :1], P[:, 1:2]
        s = 1 / (1 + np.exp(-k * (x - x0)))
        ds = (1 - CHANCE) * s * (1 - s)
        return CHANCE + (1 - CHANCE) * s - acc, np.stack([ds * (x - x0), -ds * k], axis=2)

    lower, upper = np.array([1e-4, x.min() - 10]), np.array([50.0, x.max() + 10])
    got, _, ok = levenberg_marquardt(model, np.tile([1.0, 19.0], (5, 1)), weights, lower, upper)
    assert ok.all()
    for w, g in zip(weights, got):
        ref = least_squares(lambda p: np.sqrt(w) * model(p[None])[0][0], [1.0, 19.0], bounds=(lower, upper))
        np.testing.assert_allclose(g, ref.x, rtol=1e-4)


def test_degenerate_input():
    with pytest.raises(InsufficientDataError, match="at 2 or more sizes"):
        fit_accuracy_sigmoid([1e6, 1e6, 1e6], [0.3, 0.31, 0.29])
    with pytest.raises(ValueError, match="chance must be in"):
        fit_accuracy_sigmoid(*sigmoid_data(0), chance=1.0)
    N, L, acc = two_step_data(1)
    with pytest.raises(InsufficientDataError, match="4 distinct losses"):
        fit_two_step_accuracy(L[:4], acc[:4])
    acc = acc.copy()
    acc[:3] = np.nan  # NaN accuracies are simply not points
    assert fit_two_step_accuracy(L, acc).n_points == len(L) - 3


def test_accuracy_at_chance_and_steps_are_flagged():
    N = np.repeat(np.geomspace(1e6, 1e9, 5), 2)
    with pytest.warns(FitWarning) as caught:
        # (an exactly constant column is not fittable at all: see the test below)
        flat = fit_accuracy_sigmoid(N, 0.25 + np.tile([0.0, 0.002], len(N) // 2), chance=0.25)
    assert not flat.ok and any("never rises above chance" in str(w.message) for w in caught)
    falling = np.linspace(0.9, 0.3, len(N))  # accuracy falling with size: the slope is pinned at its floor
    with pytest.warns(FitWarning, match="sits on its bound"):
        fit = fit_accuracy_sigmoid(N, falling, chance=0.25)
    assert not fit.ok and fit.k == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("value", [0.0, 0.2, 0.5, 1.0])
def test_a_constant_accuracy_is_unfittable_with_the_reason(value):
    """A constant column used to raise LinAlgError (Singular matrix) from the bootstrap replicates."""
    rng = np.random.default_rng(0)
    N = np.repeat([1.49e5, 2.5e5, 4e5], 4)
    loss = 3 - 0.3 * np.log(N / 1e5) + rng.normal(0, 0.02, 12)
    acc = np.full(12, value)
    with pytest.raises(InsufficientDataError, match=f"accuracy is the same \\({value:g}\\) at every point"):
        fit_accuracy_sigmoid(N, acc, n_boot=200)
    for sizes in (N, None):
        with pytest.raises(InsufficientDataError, match="accuracy is the same"):
            fit_two_step_accuracy(loss, acc, N=sizes, n_boot=200)


def test_a_nearly_constant_accuracy_does_not_crash_the_bootstrap():
    """Replicates of an almost flat accuracy drive the damped normal equations exactly singular, which used
    to raise LinAlgError for the whole batch; such replicates now just fail to move."""
    N = np.repeat([1.49e5, 2.5e5, 4e5], 4)
    loss = 3 - 0.3 * np.log(N / 1e5) + np.random.default_rng(0).normal(0, 0.02, 12)
    acc = np.full(12, 0.5)
    acc[0] += 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        fit = fit_two_step_accuracy(loss, acc, n_boot=1000)
    assert fit.samples.shape == (1000, 4)
