"""IsoFLOP (Approach 2): per-budget optima, exponents, coverage, degenerate budgets."""

import warnings

import numpy as np
import pandas as pd
import pytest

from analysis.fits import FitWarning, InsufficientDataError
from analysis.isoflop import fit_isoflop

E, A, B, ALPHA, BETA = 1.7, 400.0, 1500.0, 0.34, 0.30
S = ALPHA + BETA
G = (ALPHA * A / (BETA * B)) ** (1 / S)
A_TRUE, B_TRUE = BETA / S, ALPHA / S


def loss(N, D):
    return E + A * N ** -ALPHA + B * D ** -BETA


def isoflop_data(seed=0, noise=0.003, budgets=(1e18, 1e19, 1e20, 1e21), spread=6.0, sizes=7, center=1.0):
    """Sizes log-spaced around the true optimum (times ``center``) at each budget, D = C / 6N."""
    rng = np.random.default_rng(seed)
    C, N = [], []
    for c in budgets:
        n0 = G * (c / 6) ** A_TRUE * center
        for f in np.geomspace(1 / spread, spread, sizes):
            C.append(c)
            N.append(n0 * f)
    C, N = np.array(C), np.array(N)
    D = C / (6 * N)
    return C, N, D, loss(N, D) * np.exp(rng.normal(0, noise, len(N)))


def test_recovers_exponents_and_optima_on_exact_data():
    C, N, D, L = isoflop_data(noise=0.0)
    fit = fit_isoflop(C, N, L, D)
    assert fit.ok, fit.flags
    # a parabola in log N is only an approximation of the isoFLOP profile: small, known bias
    assert fit.a.estimate == pytest.approx(A_TRUE, abs=0.01)
    assert fit.b.estimate == pytest.approx(B_TRUE, abs=0.01)
    true_opt = G * (fit.budgets["C"].to_numpy() / 6) ** A_TRUE
    np.testing.assert_allclose(fit.budgets["N_opt"], true_opt, rtol=0.05)
    np.testing.assert_allclose(fit.n_opt(1e20), G * (1e20 / 6) ** A_TRUE, rtol=0.05)
    # D_opt read from the runs' tokens agrees with C / 6 N_opt here, since D = C / 6N exactly
    np.testing.assert_allclose(fit.budgets["D_opt"], fit.budgets["C"] / (6 * fit.budgets["N_opt"]), rtol=1e-9)


def test_bootstrap_interval_of_the_exponent_covers_truth():
    hits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        for i in range(50):
            fit = fit_isoflop(*isoflop_data(seed=100 + i)[:3], n_boot=100, seed=i)
            hits.append(fit.a.covers(A_TRUE))
            assert fit.budgets["N_opt_low"].le(fit.budgets["N_opt"]).all()
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_dataframe_columns():
    C, N, D, L = isoflop_data(seed=1)
    df = pd.DataFrame({"budget": C, "params": N, "tokens": D, "val_loss": L})
    a = fit_isoflop("budget", "params", "val_loss", "tokens", data=df)
    b = fit_isoflop(C, N, L, D)
    assert a.a.estimate == pytest.approx(b.a.estimate)


def test_single_budget_gives_optimum_but_no_exponent():
    C, N, D, L = isoflop_data(budgets=(1e19,))
    with pytest.warns(FitWarning, match="exponents need 2 budgets"):
        fit = fit_isoflop(C, N, L, D)
    assert not fit.ok and np.isnan(fit.a.estimate)
    assert len(fit.budgets) == 1 and np.isfinite(fit.budgets["N_opt"].iloc[0])


def test_budgets_with_too_few_sizes():
    C, N, D, L = isoflop_data(sizes=2)
    with pytest.raises(InsufficientDataError, match="no FLOP budget has 3 or more model sizes"):
        fit_isoflop(C, N, L, D)
    C, N, D, L = isoflop_data()
    keep = ~((C == 1e18) & (np.arange(len(C)) % 7 > 1))  # budget 1e18 keeps 2 sizes
    with pytest.warns(FitWarning, match="only 2 model sizes; skipped"):
        fit = fit_isoflop(C[keep], N[keep], L[keep], D[keep])
    assert 1e18 not in set(fit.budgets["C"])


def test_minimum_outside_the_sampled_sizes_is_flagged_and_left_out():
    C, N, D, L = isoflop_data(noise=0.0)
    shifted = isoflop_data(noise=0.0, budgets=(1e21,), center=30.0, spread=3.0)  # all sizes far too large
    C2, N2, D2, L2 = (np.concatenate([a[C < 1e21], b]) for a, b in zip((C, N, D, L), shifted))
    with pytest.warns(FitWarning, match="outside the sampled sizes"):
        fit = fit_isoflop(C2, N2, L2, D2)
    row = fit.budgets.set_index("C").loc[1e21]
    assert "extrapolated" in row["note"]
    # the exponent comes from the three good budgets and is still right
    assert fit.a.estimate == pytest.approx(A_TRUE, abs=0.01)


def test_concave_profile_has_no_minimum():
    C = np.repeat([1e19, 1e20], 4)
    N = np.tile(np.geomspace(1e8, 1e9, 4), 2)
    L = 3.0 + 0.1 * (np.log(N) - np.log(3e8)) ** 2 * -1.0  # a maximum, not a minimum
    with pytest.warns(FitWarning) as caught:
        fit = fit_isoflop(C, N, L)
    messages = [str(w.message) for w in caught]
    assert any("not convex" in m for m in messages) and any("exponents need 2 budgets" in m for m in messages)
    assert fit.budgets["N_opt"].isna().all() and np.isnan(fit.a.estimate)
