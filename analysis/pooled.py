"""Arm minus twin pooled over budgets: one relative difference per (budget, seed) pair.

:func:`analysis.compare.paired_differences` answers "at this budget, is the
arm better than its twin?" from that budget's seeds alone. When the question
is the allocation's effect across the budgets of a study, each (budget,
seed) pair is one observation of the *relative* difference
(arm - twin) / twin, and pooling them multiplies the pairs by the number of
budgets: a sweep of 3 budgets x 10 seeds has 30 pairs, so its minimal
detectable difference is about sqrt(3) times smaller than per budget.

What the pooled number means, and what it assumes:

* it is the mean relative effect over these budgets; an effect that changes
  sign with size averages away (read the per-budget table next to it);
* pairs are treated as independent: pairs of one seed at different
  budgets share the data order but not the models, and the seed-to-seed
  spread, which includes the spread between budgets' true effects, only
  makes the interval and the detectable difference larger (conservative);
* the interval and verdict follow the per-budget rules
  (:func:`analysis.compare.mean_interval` and `verdict`); the detectable difference and
  the pairs needed come from :mod:`analysis.power` with the observed sd.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_LEVEL
from analysis.compare import mean_interval, pairs, verdict
from analysis.power import ALPHA, POWER, RELATIVE_TARGETS, min_detectable_effect, seeds_needed

COLUMNS = ["arm", "n_budgets", "n_pairs", "rel_diff", "low", "high", "interval", "seed_sd", "mde_rel",
           *[f"pairs_for_{p * 100:g}%" for p in RELATIVE_TARGETS], "verdict"]


def pooled_relative_differences(df: pd.DataFrame, metric: str = "val_loss", *, n_boot: int = 2000,
                                level: float = DEFAULT_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per arm: the mean of (arm - twin) / twin over every finished (budget, seed) pair; columns ``COLUMNS``.

    ``rel_diff``, ``low``, ``high``, ``seed_sd`` and ``mde_rel`` are relative
    (0.01 = 1%); ``pairs_for_p%`` is the number of (budget, seed) pairs a
    study would need to detect a relative difference of p% with 80% power.
    """
    p = pairs(df, metric)
    p = p[np.isfinite(p["arm_value"]) & np.isfinite(p["twin_value"])]
    rng = np.random.default_rng(seed)
    rows = []
    for arm, g in p.groupby("arm", sort=True):
        # one value per (budget, seed): repeated runs under one seed count once, as per budget
        rel = ((g["arm_value"] - g["twin_value"]) / g["twin_value"].abs()).groupby([g["budget"], g["seed"]]).mean()
        d = rel.to_numpy()
        n = len(d)
        low, high, how = mean_interval(d, n_boot, level, rng)
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        row = {"arm": arm, "n_budgets": g["budget"].nunique(), "n_pairs": n, "rel_diff": float(d.mean()),
               "low": low, "high": high, "interval": how, "seed_sd": sd,
               "mde_rel": min_detectable_effect(sd, n, ALPHA, POWER) if n > 1 else math.nan}
        for target in RELATIVE_TARGETS:
            row[f"pairs_for_{target * 100:g}%"] = seeds_needed(target, sd, ALPHA, POWER) if n > 1 else math.nan
        row["verdict"] = verdict(n, low, high, metric)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)

