"""Tuned sweeps (``tune:`` in the grid): the optimum of each cell, the comparison at shared values, the curves.

A tuned sweep's results table has ``role`` = ``tune`` for the tuning runs
(every candidate value of ``tune_axis`` on the tuning seeds) and ``main``
for the grid's seeds at each cell's chosen value (``tune_value``). The
comparisons of :mod:`analysis.compare` use the main runs only: that is the
"tuned" comparison, each arm and each uniform twin at its own tuned value.

* :func:`optimum_table`: per tuning cell, the best candidate (mean over the
  tuning seeds of the selection metric), the range of values within 1% of
  the best loss, and a quadratic fit of loss in log(value) (vertex and the
  width where the parabola is within 1% of its minimum);
* :func:`shared_value_differences`: arm minus twin at each value both were
  trained at (tuning runs, paired by tuning seed);
* :func:`tuning_curves`: the long table the loss-vs-value plots draw.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.compare import arm_labels, paired_differences

WITHIN = 0.01  # "near the optimum": within 1% of the best loss


def tune_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["role"] == "tune"] if "role" in df else df.iloc[:0]


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Everything but tuning runs (untuned sweeps have no role column, or role empty)."""
    return df[df["role"] != "tune"] if "role" in df else df


def tuning_curves(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Per tuning cell and value: mean, sd and count of ``metric`` over the tuning seeds (NaN mean if a seed failed)."""
    t = tune_rows(df)
    if t.empty:
        return pd.DataFrame(columns=["sweep", "tune_cell", "arm", "budget", "value", "mean", "sd", "n", "n_failed"])
    t = t.assign(arm=arm_labels(t), _v=pd.to_numeric(t[metric], errors="coerce").where(t["status"] == "done"))
    rows = []
    for (sweep, cell, arm, budget, value), g in t.groupby(["sweep", "tune_cell", "arm", "budget", "tune_value"],
                                                          sort=True):
        v = g["_v"].to_numpy(float)
        ok = np.isfinite(v)
        rows.append({"sweep": sweep, "tune_cell": cell, "arm": arm, "budget": budget, "value": value,
                     "mean": float(v.mean()) if ok.all() else math.nan,
                     "sd": float(v.std(ddof=1)) if ok.sum() > 1 else math.nan,
                     "n": int(ok.sum()), "n_failed": int((~ok).sum())})
    return pd.DataFrame(rows)


def optimum_table(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Per tuning cell: best value, whether it is an edge, the within-1% range and a quadratic fit in log value."""
    curves = tuning_curves(df, metric)
    rows = []
    for (sweep, cell, arm, budget), g in curves.groupby(["sweep", "tune_cell", "arm", "budget"], sort=True):
        g = g.sort_values("value")
        ok = g[np.isfinite(g["mean"])]
        row = {"sweep": sweep, "tune_cell": cell, "arm": arm, "budget": budget, "values": len(g),
               "best": math.nan, "best_loss": math.nan, "at_edge": False, "near_low": math.nan,
               "near_high": math.nan, "fit_vertex": math.nan, "fit_low": math.nan, "fit_high": math.nan,
               "note": ""}
        if ok.empty:
            row["note"] = "no candidate finished"
            rows.append(row)
            continue
        i = int(ok["mean"].to_numpy().argmin())
        best, best_loss = float(ok["value"].iloc[i]), float(ok["mean"].iloc[i])
        near = ok[ok["mean"] <= best_loss * (1 + WITHIN)]["value"]
        row.update(best=best, best_loss=best_loss, at_edge=best in (float(g["value"].min()), float(g["value"].max())),
                   near_low=float(near.min()), near_high=float(near.max()))
        row.update(_parabola(np.log(ok["value"].to_numpy(float)), ok["mean"].to_numpy(float)))
        notes = [row.pop("fit_note")] if row.get("fit_note") else []
        if row["at_edge"]:
            notes.append("best value at an edge of the tried range: the optimum may lie beyond it")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


def _parabola(x: np.ndarray, y: np.ndarray) -> dict:
    """Vertex and within-1% width of loss = a x^2 + b x + c in x = log(value); NaN unless >= 3 points and convex."""
    out = {"fit_vertex": math.nan, "fit_low": math.nan, "fit_high": math.nan, "fit_note": ""}
    if len(x) < 3:
        out["fit_note"] = "fewer than 3 finished values: no quadratic fit"
        return out
    a, b, c = np.polyfit(x, y, 2)
    if not a > 0:
        out["fit_note"] = "loss is not convex in log(value) over the tried range: no quadratic optimum"
        return out
    xv = -b / (2 * a)
    ymin = c - b * b / (4 * a)
    half = math.sqrt(WITHIN * abs(ymin) / a)
    out.update(fit_vertex=math.exp(xv), fit_low=math.exp(xv - half), fit_high=math.exp(xv + half))
    if not x.min() <= xv <= x.max():
        out["fit_note"] = "the fitted optimum lies outside the tried range (extrapolated)"
    return out


def shared_value_differences(df: pd.DataFrame, metric: str = "val_loss", **kw) -> pd.DataFrame:
    """Arm minus twin at each tuning value both were trained at (tuning seeds): the untuned comparison.

    Column ``axis.tune_value`` holds the shared value.
    """
    t = tune_rows(df)
    if t.empty:
        return pd.DataFrame()
    t = t.assign(role="main", **{"axis.tune_value": t["tune_value"]})
    return paired_differences(t, metric, **kw)
