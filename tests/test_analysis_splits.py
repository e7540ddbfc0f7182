"""Analysis of held-out splits: test loss for the final comparison, and a flag when runs saw different data."""

import numpy as np
import pandas as pd

from analysis.compare import paired_differences
from analysis.load import load_sweep
from analysis.report import write_report
from analysis.splits import final_metric, split_problems
from analysis_fixtures import write_sweep


def _with_test_split(sweep, shift: float = 0.5, odd_run: int | None = None, missing: int | None = None):
    """Give every run test metrics (val_loss + shift, so the table tells which one the report used)."""
    df = pd.read_parquet(sweep / "results.parquet")
    df["test_loss"] = df["val_loss"] + shift
    df["test_bpb"] = df["test_loss"] / np.log(2)
    df["val_fingerprint"], df["test_fingerprint"] = "aaaa", "bbbb"
    if odd_run is not None:
        df.loc[odd_run, "test_fingerprint"] = "cccc"
    if missing is not None:
        df.loc[missing, ["test_loss", "test_fingerprint"]] = [np.nan, None]
    df.to_parquet(sweep / "results.parquet", index=False)
    return df


def test_final_comparison_uses_test_loss_when_every_run_has_it(tmp_path):
    sweep = write_sweep(tmp_path / "s", seeds=(0, 1, 2))
    assert final_metric(load_sweep(sweep)) == "val_loss"  # older sweeps: no test split
    _with_test_split(sweep)
    df = load_sweep(sweep)
    assert final_metric(df) == "test_loss" and split_problems(df) == []
    d = paired_differences(df, "test_loss")
    assert (d["twin_mean"] - paired_differences(df, "val_loss")["twin_mean"]).round(9).eq(0.5).all()
    text = (write_report(sweep, n_boot=50) / "report.md").read_text()
    assert "Metric: final test_loss" in text and "never used for selection" in text
    assert "val aaaa, test bbbb" in text
    assert "Paired difference of final `test_loss`" in text


def test_runs_on_different_splits_are_flagged_and_named(tmp_path):
    sweep = write_sweep(tmp_path / "s", seeds=(0, 1))
    df0 = _with_test_split(sweep, odd_run=3)
    problems = split_problems(load_sweep(sweep))
    assert len(problems) == 1 and "2 different test splits" in problems[0] and df0.loc[3, "run"] in problems[0]
    text = (write_report(sweep, n_boot=50) / "report.md").read_text()
    assert "- Caution: sweep s: 2 different test splits" in text.split("## ")[0]  # in the summary


def test_a_run_without_test_split_falls_back_to_validation_and_says_so(tmp_path):
    sweep = write_sweep(tmp_path / "s", seeds=(0, 1))
    _with_test_split(sweep, missing=0)
    df = load_sweep(sweep)
    assert final_metric(df) == "val_loss"
    assert any("have no test split" in p for p in split_problems(df))
