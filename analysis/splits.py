"""The held-out splits of a sweep: which metric the final comparison uses, and whether every run saw the same data.

Runs record the fingerprints of their validation and test rows in
final.json (``val_fingerprint``, ``test_fingerprint``). A sweep whose runs
disagree compares models on different data; :func:`split_problems` says
so, naming the runs, and the report puts it in its summary.

Selection (tuning, early choices) uses validation loss only; the final
comparison uses test loss where every finished run has one
(:func:`final_metric`), so the number reported was never used to choose.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def final_metric(df: pd.DataFrame) -> str:
    """``test_loss`` when every finished run of the table has a finite one, else ``val_loss``."""
    done = df[df["status"] == "done"] if "status" in df else df
    if "test_loss" not in df or done.empty:
        return "val_loss"
    test = pd.to_numeric(done["test_loss"], errors="coerce")
    return "test_loss" if np.isfinite(test).all() else "val_loss"


def split_problems(df: pd.DataFrame) -> list[str]:
    """One line per sweep and split whose finished runs do not all share one fingerprint (or some lack a test split)."""
    out = []
    done = df[df["status"] == "done"]
    for sweep, g in done.groupby("sweep" if "sweep" in done else (lambda _: ""), sort=True):
        where = f"sweep {sweep}: " if sweep else ""
        for split, col in (("validation", "val_fingerprint"), ("test", "test_fingerprint")):
            if col not in g:
                continue
            have = g[col].dropna()
            prints = have.value_counts()
            if len(prints) > 1:
                odd = g.loc[g[col].notna() & (g[col] != prints.index[0]), "run"].astype(str).tolist()
                out.append(f"{where}{len(prints)} different {split} splits among finished runs "
                           f"(fingerprints {', '.join(prints.index[:3])}); runs off the most common one: "
                           f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}")
            if split == "test" and 0 < len(have) < len(g):
                out.append(f"{where}{len(g) - len(have)} of {len(g)} finished runs have no test split "
                           "(data.test_sequences differs between runs): comparing on validation loss")
    return out
