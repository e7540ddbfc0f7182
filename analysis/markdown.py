"""Markdown rendering of result tables (no tabulate dependency)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def number(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e7):
        return f"{int(v):,}" if abs(v) >= 1e4 else str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    if isinstance(v, np.integer):
        return number(int(v), digits)
    return str(v)


def with_interval(est, low, high, digits: int = 4) -> str:
    if not (isinstance(low, float) and math.isfinite(low) and isinstance(high, float) and math.isfinite(high)):
        return number(est, digits)
    return f"{number(est, digits)} [{number(low, digits)}, {number(high, digits)}]"


def table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; '|' inside cells is escaped."""
    if df.empty:
        return "_(no rows)_"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = []
    for rec in df.itertuples(index=False):
        cells = [number(v, digits) if not isinstance(v, str) else v for v in rec]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join([head, rule, *rows])
