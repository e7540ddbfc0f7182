"""Matched-budget comparisons: paired differences, effective multipliers, rankings."""

import numpy as np
import pandas as pd
import pytest

from analysis.compare import (arm_labels, effective_multiplier, is_size_grid, pairs, paired_differences,
                              rank_arms, size_gaps)
from analysis.fits import FitWarning
from analysis.load import load_sweep
from analysis_fixtures import MULT, write_isoflop_sweep, write_sweep


def results_frame(effect=-0.03, seeds=6, budgets=(1e6, 3e6), noise=0.01, seed=0, seed_sd=0.05):
    """An in-memory results table: arm 'deep' and its twin per budget and seed.

    The twin's loss is base + seed effect + noise; the arm's is that plus ``effect``
    (the seed effect is shared, as data order and init are in a real sweep).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for b in budgets:
        for s in range(seeds):
            shared = 3.0 - 0.1 * np.log10(b) + rng.normal(0, seed_sd)
            twin = f"u-{b:g}-{s}"
            rows.append(dict(run=twin, arm="uniform", is_uniform=True, twin=None, seed=s,
                             val_loss=shared + rng.normal(0, noise), alpha_min=0.75, beta_min=2.25))
            rows.append(dict(run=f"d-{b:g}-{s}", arm="deep", is_uniform=False, twin=twin, seed=s,
                             val_loss=shared + effect + rng.normal(0, noise), alpha_min=0.5, beta_min=0.5))
            for r in rows[-2:]:
                r.update(sweep="s", status="done", budget_kind="params", budget=b, params=b)
    return pd.DataFrame(rows)


def test_paired_difference_recovers_the_effect_and_its_uncertainty():
    hits = []
    for i in range(50):
        d = paired_differences(results_frame(seed=i), n_boot=1000, seed=i)
        assert list(d["n_pairs"]) == [6, 6]
        hits += [lo <= -0.03 <= hi for lo, hi in zip(d["low"], d["high"])]
    # percentile intervals from 6 seeds run short of 95%, but not by much
    assert np.mean(hits) >= 0.8, np.mean(hits)
    d = paired_differences(results_frame(noise=0.002, seed=1))
    assert (d["verdict"] == "arm better").all()
    np.testing.assert_allclose(d["diff"], -0.03, atol=0.005)
    # pairing removes the shared seed effect: the arm's spread over seeds is far larger than the interval
    assert (d["high"] - d["low"] < 0.02).all()


def test_accuracy_differences_read_higher_as_better():
    df = results_frame(noise=0.002).rename(columns={"val_loss": "val_acc"})
    d = paired_differences(df, "val_acc")
    assert (d["diff"] < 0).all() and (d["verdict"] == "arm worse").all()


def test_single_seed_and_disagreeing_seeds_are_noted():
    d = paired_differences(results_frame(seeds=1))
    assert (d["verdict"] == "undetermined (1 pair)").all() and d["low"].isna().all()
    assert d["note"].str.contains("not enough seeds for an interval").all()
    d = paired_differences(results_frame(effect=-0.002, noise=0.05, seeds=4, seed=3))
    assert d["note"].str.contains("seeds disagree more than the effect").all()


def test_unfinished_runs_never_enter_a_comparison():
    df = results_frame()
    df.loc[df["run"] == "u-1e+06-0", "status"] = "failed"  # a twin failed
    df.loc[df["run"] == "d-3e+06-1", ["status", "val_loss"]] = ["diverged", np.nan]
    d = paired_differences(df).set_index("budget")
    assert d.loc[1e6, "n_pairs"] == 5 and d.loc[1e6, "dropped"] == 1
    assert d.loc[3e6, "n_pairs"] == 5 and "dropped" in d.loc[3e6, "note"]


def test_twin_found_by_budget_and_seed_when_the_column_is_empty():
    df = results_frame()
    with_names = pairs(df)
    df["twin"] = None
    matched = pairs(df)
    assert (matched["twin"] == with_names["twin"]).all()


def test_context_axes_keep_comparisons_apart():
    a = results_frame(effect=-0.05, noise=0.002).assign(**{"axis.optimizer.lr": 1e-3})
    b = results_frame(effect=+0.05, noise=0.002, seed=5).assign(**{"axis.optimizer.lr": 3e-3})
    b["run"], b["twin"] = "b" + b["run"], np.where(b["twin"].notna(), "b" + b["twin"].astype(str), None)
    d = paired_differences(pd.concat([a, b], ignore_index=True))
    assert len(d) == 4
    by_lr = d.groupby("axis.optimizer.lr")["diff"].mean()
    assert by_lr[1e-3] == pytest.approx(-0.05, abs=0.01) and by_lr[3e-3] == pytest.approx(0.05, abs=0.01)
    # without a twin name, matching also respects the context
    c = pd.concat([a, b], ignore_index=True).assign(twin=None)
    assert len(paired_differences(c)) == 4


@pytest.fixture(scope="module")
def five_budget_sweep(tmp_path_factory):
    path = write_sweep(tmp_path_factory.mktemp("mult") / "sweep", budgets=(1.0e5, 1.6e5, 2.5e5, 4.0e5, 6.5e5),
                       arms=("openelm", "reverse"), seeds=(0, 1, 2), noise=0.002)
    return load_sweep(path)


def test_effective_multiplier_recovers_the_true_multiplier(five_budget_sweep):
    res = effective_multiplier(five_budget_sweep, n_boot=300)
    fit = next(iter(res.fits.values()))
    assert not isinstance(fit, str) and fit.converged
    t = res.table
    assert set(t["arm"]) == {"openelm", "reverse"} and len(t) == 10
    for arm in ("openelm", "reverse"):
        rows = t[t["arm"] == arm]
        np.testing.assert_allclose(rows["multiplier"], MULT[arm], rtol=0.1)
        covered = [lo <= MULT[arm] <= hi for lo, hi in zip(rows["low"], rows["high"])]
        assert np.mean(covered) >= 0.6, rows[["budget", "multiplier", "low", "high"]]


def test_rank_arms_orders_by_true_quality(five_budget_sweep):
    r = rank_arms(five_budget_sweep, n_boot=500)
    for _, g in r.groupby("budget"):
        best, worst = g.iloc[0], g.iloc[-1]
        assert best["arm"] == "openelm" and best["rank"] == 1 and best["p_best"] > 0.9
        assert worst["arm"] == "reverse"
        assert (g["rank_low"] <= g["rank"]).all() and (g["rank"] <= g["rank_high"]).all()


def test_uniform_shapes_are_told_apart(tmp_path):
    df = load_sweep(write_sweep(tmp_path / "s", arms=("openelm", "middle"), seeds=(0,)))
    labels = set(arm_labels(df))
    uniform = {x for x in labels if x.startswith("uniform")}
    assert len(uniform) == 2 and all(" a" in x and " b" in x for x in uniform)  # two twins, two mean shapes


def test_isoflop_grids_use_the_uniform_frontier(tmp_path):
    iso = load_sweep(write_isoflop_sweep(tmp_path / "iso", seeds=(0, 1)))
    params = load_sweep(write_sweep(tmp_path / "p", arms=("openelm", "middle")))
    assert is_size_grid(iso) and not is_size_grid(params)
    with pytest.warns(FitWarning):  # 3 budgets x 2 seeds: 3 distinct sizes for 3 parameters, and it says so
        res = effective_multiplier(iso, n_boot=50)
    fit = next(iter(res.fits.values()))
    assert not fit.ok
    assert fit.n_points == 6  # best size per budget and seed, not all 42 runs


def test_two_pairs_give_no_interval_and_no_verdict_however_large_the_effect():
    """With 2 seeds the bootstrap 'interval' was just the min and max of two numbers, and gave verdicts."""
    d = paired_differences(results_frame(seeds=2, effect=-0.3, noise=0.001))
    assert (d["n_pairs"] == 2).all() and d["low"].isna().all() and d["high"].isna().all()
    assert (d["interval"] == "none").all() and (d["verdict"] == "undetermined (2 pairs)").all()
    assert d["note"].str.contains("not enough seeds for an interval").all()


def test_three_or_four_pairs_get_student_t_intervals_with_their_nominal_coverage():
    from scipy import stats

    d = paired_differences(results_frame(seeds=3, seed=7)).iloc[0]
    pairs_ = pairs(results_frame(seeds=3, seed=7))
    diffs = (pairs_["arm_value"] - pairs_["twin_value"])[pairs_["budget"] == d["budget"]].to_numpy()
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert d["interval"] == "t (2 df)"
    np.testing.assert_allclose([d["low"], d["high"]], [diffs.mean() - half, diffs.mean() + half])
    # Normal paired differences: t intervals cover the true effect ~95% of the time (a 3-value
    # percentile bootstrap covers it far less often).
    hits = []
    for i in range(300):
        for n in (3, 4):
            row = paired_differences(results_frame(seeds=n, seed=i, budgets=(1e6,)), seed=i).iloc[0]
            hits.append(row["low"] <= -0.03 <= row["high"])
    assert 0.9 <= np.mean(hits) <= 0.99, np.mean(hits)
    assert paired_differences(results_frame(seeds=5))["interval"].eq("bootstrap").all()


def test_arm_twin_pairs_of_different_sizes_are_flagged():
    df = results_frame(seeds=3)
    assert size_gaps(df).empty and paired_differences(df)["size_gap"].eq(0).all()
    df.loc[df["run"] == "d-1e+06-1", "params"] = 1e6 * 1.044  # the 4.4% gap of a loose budget tolerance
    gaps = size_gaps(df)
    assert list(gaps["run"]) == ["d-1e+06-1"] and gaps["size_gap"].iloc[0] == pytest.approx(0.044)
    d = paired_differences(df).set_index("budget")
    assert "sizes differ by up to 4.4% (> 1%)" in d.loc[1e6, "note"] and "sizes differ" not in d.loc[3e6, "note"]


def test_rank_arms_gives_few_seeds_no_or_t_intervals_and_says_so():
    from scipy import stats

    for seeds, method in ((2, "none"), (3, "t"), (6, "bootstrap")):
        r = rank_arms(results_frame(seeds=seeds, budgets=(1e6,)), n_boot=300)
        if method == "none":
            assert r["low"].isna().all() and r["note"].str.contains("not enough seeds for an interval").all()
        elif method == "t":
            df = results_frame(seeds=3, budgets=(1e6,))
            v = df.loc[df["arm"] == "deep", "val_loss"].to_numpy()
            half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
            row = r[r["arm"] == "deep"].iloc[0]
            np.testing.assert_allclose([row["low"], row["high"]], [v.mean() - half, v.mean() + half])
        else:
            assert r["low"].notna().all() and not r["note"].str.contains("rough").any()
        if seeds < 5:
            assert r["note"].str.contains("rough").all()


def test_arm_differences_pair_two_layer_wise_arms_by_budget_and_seed():
    from analysis.compare import arm_differences

    df = results_frame(effect=-0.03, noise=0.002, seed=3)
    # a second layer-wise arm, 0.02 worse than 'deep' on the same seeds (shared seed effect)
    deep = df[df["arm"] == "deep"]
    rev = deep.assign(arm="rev", run=deep["run"].str.replace("d-", "r-"), alpha_min=1.0,
                      val_loss=deep["val_loss"] + 0.02 + np.random.default_rng(0).normal(0, 0.002, len(deep)))
    df = pd.concat([df, rev], ignore_index=True)
    d = arm_differences(df, "deep", n_boot=500)
    rev_rows = d[d["arm"] == "rev"]
    assert list(rev_rows["n_pairs"]) == [6, 6]
    np.testing.assert_allclose(rev_rows["diff"], 0.02, atol=0.004)
    assert (rev_rows["verdict"] == "arm worse").all()
    # pairing by seed removes the shared seed effect (sd 0.05): intervals are far narrower than it
    assert (rev_rows["high"] - rev_rows["low"] < 0.01).all()
    twin_rows = d[d["arm"] != "rev"]
    np.testing.assert_allclose(twin_rows["diff"], 0.03, atol=0.005)  # the uniform twin is 0.03 worse than deep
    with pytest.raises(ValueError, match="no finished runs of arm 'nope'"):
        arm_differences(df, "nope")
