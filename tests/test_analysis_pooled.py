"""Arm minus twin pooled over budgets, on synthetic sweeps with a known relative effect and noise."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.compare import paired_differences
from analysis.pooled import pooled_relative_differences
from analysis.power import min_detectable_effect, power_table


def _sweep(effect: float, noise: float, budgets=(1e5, 2e5, 4e5), seeds=range(10), rng_seed=0) -> pd.DataFrame:
    """Twin loss falls with budget; arm loss = twin * (1 + effect + N(0, noise)), per (budget, seed)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for b in budgets:
        twin_loss = 3.0 * (b / 1e5) ** -0.1
        for s in seeds:
            t = twin_loss * (1 + rng.normal(0, noise / 2))
            rows.append({"sweep": "s", "run": f"u-{b}-{s}", "arm": "uniform", "is_uniform": True, "twin": None,
                         "budget_kind": "params", "budget": b, "seed": s, "params": b, "status": "done",
                         "val_loss": t, "role": "main"})
            rows.append({"sweep": "s", "run": f"a-{b}-{s}", "arm": "openelm", "is_uniform": False,
                         "twin": f"u-{b}-{s}", "budget_kind": "params", "budget": b, "seed": s, "params": b,
                         "status": "done", "val_loss": t * (1 + effect + rng.normal(0, noise)), "role": "main"})
    return pd.DataFrame(rows)


def test_pooling_three_budgets_finds_an_effect_each_budget_alone_cannot_and_says_so():
    df = _sweep(effect=0.008, noise=0.01)
    pooled = pooled_relative_differences(df, n_boot=2000).iloc[0]
    assert pooled["n_pairs"] == 30 and pooled["n_budgets"] == 3
    assert pooled["low"] <= 0.008 <= pooled["high"] and pooled["verdict"] == "arm worse"
    per_budget = power_table(paired_differences(df, n_boot=2000))
    # each budget's 10 pairs detect ~1% at best; 30 pooled pairs about sqrt(3) better
    assert (per_budget["mde_rel"] > pooled["mde_rel"] * 1.4).all()
    assert pooled["mde_rel"] == pytest.approx(min_detectable_effect(pooled["seed_sd"], 30))
    assert pooled["seed_sd"] == pytest.approx(0.01, rel=0.35)


def test_no_effect_gives_no_clear_difference_with_the_pairs_a_1_percent_effect_would_need():
    df = _sweep(effect=0.0, noise=0.02, rng_seed=3)
    pooled = pooled_relative_differences(df).iloc[0]
    assert pooled["verdict"] == "no clear difference" and pooled["low"] < 0 < pooled["high"]
    # (z_0.975 + z_0.8)^2 * (sd / 1%)^2 ~ 7.85 * 4 = 31 pairs for sd 2%, a little more for the t-test
    assert 25 <= pooled["pairs_for_1%"] <= 50
    assert pooled["pairs_for_0.5%"] > 3 * pooled["pairs_for_1%"]


def test_unfinished_pairs_are_left_out_and_two_pairs_give_no_verdict():
    df = _sweep(effect=0.05, noise=0.01, budgets=(1e5,), seeds=range(3))
    df.loc[df["run"] == "u-100000.0-0", "status"] = "failed"
    pooled = pooled_relative_differences(df).iloc[0]
    assert pooled["n_pairs"] == 2 and pooled["verdict"].startswith("undetermined")
    assert math.isnan(pooled["low"])
