import math

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.lr_transfer import LR, PARAM, WIDTH, best_lr_table, lr_curves, transfer_table

LRS = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]


def grid_frame(optimum, seeds=2, noise=0.002, seed=0):
    """Runs of a (parametrization, width, lr, seed) grid whose loss is a parabola in log lr around ``optimum[(p, w)]``."""
    rng = np.random.default_rng(seed)
    rows = []
    for (param, width), best in optimum.items():
        for lr in LRS:
            for s in range(seeds):
                loss = 2.0 - 0.1 * math.log2(width) + 0.05 * math.log2(lr / best) ** 2 + rng.normal(0, noise)
                rows.append({PARAM: param, WIDTH: width, LR: lr, "seed": s, "status": "done", "val_loss": loss})
    return pd.DataFrame(rows)


def test_a_width_dependent_optimum_does_not_transfer_and_a_fixed_one_does():
    df = grid_frame({("standard", 64): 1.6e-2, ("standard", 256): 4e-3, ("mup", 64): 8e-3, ("mup", 256): 8e-3})
    best = best_lr_table(lr_curves(df))
    got = {(r.parametrization, r.width): r.best_lr for r in best.itertuples()}
    assert got == {("standard", 64): 1.6e-2, ("standard", 256): 4e-3, ("mup", 64): 8e-3, ("mup", 256): 8e-3}
    t = transfer_table(best).set_index("parametrization")
    assert t.loc["standard", "shift_steps"] == -2 and not t.loc["standard", "transfers"]
    assert t.loc["mup", "shift_steps"] == 0 and t.loc["mup", "transfers"]
    assert len(plots.plot_lr_transfer(lr_curves(df)).axes) == 2  # one panel per parametrization


def test_model_families_are_separate_questions():
    """A layer-wise grid trains uniform twins too: each family gets its own optimum and shift."""
    a = grid_frame({("standard", 64): 1.6e-2, ("standard", 256): 4e-3}).assign(arm="linear")
    b = grid_frame({("standard", 64): 8e-3, ("standard", 256): 8e-3}, seed=1).assign(arm="uniform")
    t = transfer_table(best_lr_table(lr_curves(pd.concat([a, b])))).set_index("arm")
    assert t.loc["linear", "shift_steps"] == -2 and t.loc["uniform", "shift_steps"] == 0


def test_unfinished_runs_and_edges_are_flagged_not_hidden():
    df = grid_frame({("standard", 64): 1e-3, ("standard", 256): 1e-3})
    df.loc[(df[WIDTH] == 256) & (df[LR] == 2e-3) & (df["seed"] == 0), "status"] = "diverged"
    curves = lr_curves(df)
    assert math.isnan(curves[(curves["width"] == 256) & (curves["lr"] == 2e-3)]["mean"].iloc[0])
    t = transfer_table(best_lr_table(curves))
    assert "edge" in t["note"].iloc[0]


def test_a_grid_without_width_or_lr_axes_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="model.model_dim and optimizer.lr"):
        lr_curves(pd.DataFrame({"status": ["done"], "val_loss": [1.0], LR: [1e-3]}))
