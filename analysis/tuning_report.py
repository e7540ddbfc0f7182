"""The report's Tuning section for sweeps with a ``tune:`` block (see :mod:`analysis.tuning`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from analysis import plots
from analysis.markdown import number, table, with_interval
from analysis.tuning import WITHIN, optimum_table, shared_value_differences, tuning_curves

TUNE_FILE = "tune.json"  # written by sweeps.tune (not imported: analysis never needs the sweep package)


def read_tune_record(sweep_dir: str | Path) -> dict | None:
    path = Path(sweep_dir) / TUNE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None  # a torn tune.json only loses the extension notes; the runs themselves are in the table


def tuned_label(ctx) -> str:
    """The sentence that labels a comparison of main runs as "tuned" (empty for untuned sweeps)."""
    if ctx.tune is None or not len(ctx.tune):
        return ""
    axis = str(ctx.tune["tune_axis"].dropna().iloc[0]) if ctx.tune["tune_axis"].notna().any() else "the tuned value"
    return (f"\n\n**Tuned:** each arm and each uniform twin runs at its own tuned `{axis}` (chosen on the "
            "validation loss of the tuning seeds, which are not among these seeds; see the Tuning section, which "
            "also compares arms at shared values).")


def tuning_section(ctx) -> str:
    t = ctx.tune
    axis = str(t["tune_axis"].dropna().iloc[0]) if t["tune_axis"].notna().any() else "value"
    select = (ctx.tune_record or {}).get("select_on", "val_loss")
    parts = [f"{len(t)} tuning runs ({int((t['status'] == 'done').sum())} done) of `{axis}` on seed(s) "
             f"{', '.join(number(s) for s in sorted(t['seed'].dropna().unique()))}, selected on {select}."]
    parts.append(_optimum(ctx, select, axis))
    parts.append(_extensions(ctx))
    parts.append(_shared(ctx, select))
    curves = tuning_curves(t, select)
    for i, budget in enumerate(sorted(curves["budget"].dropna().unique())):
        parts.append(ctx.figure(plots.plot_tuning_curves(curves, budget, axis, select), f"tuning_{i}",
                                f"{select} vs {axis} per arm at budget {budget:.3g}"))
    return "\n\n".join(p for p in parts if p)


def _optimum(ctx, select: str, axis: str) -> str:
    o = optimum_table(ctx.tune, select)
    if o.empty:
        return "No tuning cell has results yet."
    o = o.assign(**{
        "best": [number(v, 3) for v in o["best"]],
        "best_loss": [number(v, 4) for v in o["best_loss"]],
        f"within {WITHIN:.0%}": [f"{number(a, 3)}-{number(b, 3)}" if math.isfinite(a) else "–"
                                 for a, b in zip(o["near_low"], o["near_high"])],
        "quadratic optimum [1% width]": [with_interval(v, a, b, 3) if math.isfinite(v) else "–"
                                         for v, a, b in zip(o["fit_vertex"], o["fit_low"], o["fit_high"])]})
    return (f"Optimum of `{axis}` per cell: the best tried value (mean {select} over tuning seeds), the tried values "
            f"within {WITHIN:.0%} of the best loss, and the vertex of a quadratic in log({axis}) with the range "
            f"where that parabola is within {WITHIN:.0%} of its minimum:\n\n"
            + table(o[["arm", "budget", "values", "best", "best_loss", f"within {WITHIN:.0%}",
                       "quadratic optimum [1% width]", "note"]]))


def _extensions(ctx) -> str:
    cells = (ctx.tune_record or {}).get("cells", [])
    lines = [f"- {c['arm']} at budget {number(c['budget'], 3)}: extended {', '.join(c['extended'])}"
             + (f" ({c['note']})" if c.get("note") else "") for c in cells if c.get("extended")]
    lines += [f"- {c['arm']} at budget {number(c['budget'], 3)}: {c['note']}" for c in cells
              if c.get("status") == "failed"]
    if not lines:
        return "No cell's best value was at an edge of the range: no extensions." if cells else ""
    return "Range extensions (the best value was at an edge) and cells without a result:\n\n" + "\n".join(lines)


def _shared(ctx, select: str) -> str:
    d = shared_value_differences(ctx.tune, select, n_boot=200, seed=ctx.seed)
    if d.empty or not np.isfinite(d["diff"]).any():
        return "No arm and twin share a tried value: no comparison at a shared value."
    d = d[np.isfinite(d["diff"])]
    t = d.assign(**{"value": d["axis.tune_value"].map(lambda v: number(v, 3)),
                    "arm - twin": [with_interval(a, b, c) for a, b, c in zip(d["diff"], d["low"], d["high"])],
                    "relative": [f"{v:+.2%}" if math.isfinite(v) else "–" for v in d["rel_diff"]]})
    return (f"**At a shared value** (not tuned): arm minus twin in {select} at each value both were trained at, "
            "paired over the tuning seeds (intervals need 3 or more; the tuning runs also chose the value, so this "
            "table is descriptive):\n\n" + table(t[["arm", "budget", "value", "n_pairs", "arm - twin", "relative",
                                                    "verdict"]]))
