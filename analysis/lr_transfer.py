"""Does the best learning rate transfer across widths? The table and figure of a width x lr grid.

A grid sweeping ``model.model_dim`` and ``optimizer.lr`` (and, to compare
them, ``model.parametrization``: standard vs muP) answers it directly:
under a parametrization whose optimum transfers, the best lr at every
width is the same grid point, up to noise. :func:`best_lr_table` finds the
best lr per (parametrization, width), mean over seeds of the selection
metric, as an index on the lr grid; :func:`transfer_table` reads off, per
parametrization, how many grid steps the optimum moves between the
narrowest and the widest model. ``sweeps/grids/mup_transfer.yaml`` is the
shipped demonstration. Pure pandas: no JAX.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

PARAM, WIDTH, LR = "axis.model.parametrization", "axis.model.model_dim", "axis.optimizer.lr"


def lr_curves(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Mean and sd over seeds of ``metric`` per (arm, parametrization, width, lr); unfinished runs count as NaN.

    ``arm`` keeps model families apart: a layer-wise grid also trains each
    run's uniform twin, and the two are separate transfer questions.
    """
    missing = [c for c in (WIDTH, LR) if c not in df]
    if missing:
        raise ValueError(f"lr_curves: the table has no {', '.join(missing)} column(s): the grid must sweep "
                         "model.model_dim and optimizer.lr (lr)")
    d = df.assign(_param=df[PARAM] if PARAM in df else "standard", _arm=df["arm"] if "arm" in df else "",
                  _v=pd.to_numeric(df[metric], errors="coerce").where(df["status"] == "done"))
    rows = []
    for (arm, param, width, lr), g in d.groupby(["_arm", "_param", WIDTH, LR], sort=True):
        v = g["_v"].to_numpy(float)
        rows.append({"arm": arm, "parametrization": param, "width": int(width), "lr": float(lr),
                     "mean": float(v.mean()) if np.isfinite(v).all() else math.nan,
                     "sd": float(v.std(ddof=1)) if len(v) > 1 and np.isfinite(v).all() else math.nan, "n": len(v)})
    return pd.DataFrame(rows, columns=["arm", "parametrization", "width", "lr", "mean", "sd", "n"])


def best_lr_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, parametrization, width): the best lr, its loss, its index on the sorted lr grid, and whether it is an edge."""
    grid = sorted(curves["lr"].unique())
    rows = []
    for (arm, param, width), g in curves.groupby(["arm", "parametrization", "width"], sort=True):
        ok = g[np.isfinite(g["mean"])]
        if ok.empty:
            rows.append({"arm": arm, "parametrization": param, "width": width, "best_lr": math.nan,
                         "best_loss": math.nan, "step": math.nan, "at_edge": False})
            continue
        best = ok.loc[ok["mean"].idxmin()]
        step = grid.index(best["lr"])
        rows.append({"arm": arm, "parametrization": param, "width": width, "best_lr": float(best["lr"]),
                     "best_loss": float(best["mean"]), "step": step, "at_edge": step in (0, len(grid) - 1)})
    return pd.DataFrame(rows)


def transfer_table(best: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, parametrization): the best lr's shift in grid steps from the narrowest to the widest width.

    ``transfers`` is True when the optimum moves by at most one grid step
    (the grid's resolution); a note flags optima at an edge of the grid,
    where the true optimum may lie beyond it and the shift is a lower bound.
    """
    rows = []
    for (arm, param), g in best.groupby(["arm", "parametrization"], sort=True):
        g = g.sort_values("width")
        narrow, wide = g.iloc[0], g.iloc[-1]
        shift = wide["step"] - narrow["step"]
        note = "an optimum sits at an edge of the lr grid: the shift is a lower bound" if g["at_edge"].any() else ""
        rows.append({"arm": arm, "parametrization": param, "narrow": int(narrow["width"]), "wide": int(wide["width"]),
                     "best_lr_narrow": narrow["best_lr"], "best_lr_wide": wide["best_lr"], "shift_steps": shift,
                     "transfers": bool(abs(shift) <= 1) if shift == shift else False, "note": note})
    return pd.DataFrame(rows)
