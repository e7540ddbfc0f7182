"""Loading sweep directories per the run/sweep-directory contract."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.load import CONTRACT_COLUMNS, SweepError, finished, load_curves, load_sweep
from analysis_fixtures import write_sweep
from elmjax.layout import param_counts
from elmjax.config_io import from_dict, load_yaml
from elmjax.model_config import ModelConfig


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return write_sweep(tmp_path_factory.mktemp("load") / "quick", arms=("openelm",),
                       failed=(("openelm", 2.5e5, 1),), diverged=(("uniform", 4.0e5, 0),),
                       pending=(("openelm", 4.0e5, 1),), eval_tasks=("toy",))


def test_one_row_per_run_with_contract_columns(sweep):
    df = load_sweep(sweep)
    assert len(df) == 12 and df["run"].is_unique
    assert set(CONTRACT_COLUMNS) <= set(df.columns) and "eval.toy.acc" in df.columns
    assert df.attrs["missing_columns"] == []
    assert (df["sweep"] == "quick").all() and df["sweep_dir"].iloc[0] == str(sweep.resolve())
    assert df["status"].value_counts().to_dict() == {"done": 9, "failed": 1, "diverged": 1, "pending": 1}
    assert df["finished"].sum() == 9 and not df.loc[df["status"] != "done", "finished"].any()
    for col in ("params", "val_loss", "budget", "seed", "train_flops"):
        assert df[col].dtype == np.float64
    assert df["is_uniform"].dtype == bool and df["is_uniform"].sum() == 6
    # JSON per-layer columns decode to one entry per layer
    assert all(len(json.loads(v)) == 4 for v in df["q_heads"])
    assert len(finished(df)) == 9
    with pytest.raises(KeyError, match="no column 'val_nope'"):
        finished(df, "val_nope")


def test_csv_when_no_parquet_and_corrupt_parquet_falls_back(sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    reference = load_sweep(copy)
    (copy / "results.parquet").write_bytes(b"not parquet at all")
    with pytest.warns(UserWarning, match="results.parquet: unreadable"):
        df = load_sweep(copy)
    assert df.attrs["sources"] == [str(copy / "results.csv")]
    pd.testing.assert_series_equal(df["val_loss"], reference["val_loss"])
    (copy / "results.parquet").unlink()
    assert len(load_sweep(copy)) == 12


def test_run_directories_alone(sweep, tmp_path):
    copy = tmp_path / "bare"
    shutil.copytree(sweep, copy)
    for name in ("results.parquet", "results.csv"):
        (copy / name).unlink()
    df = load_sweep(copy).set_index("run")
    reference = load_sweep(sweep).set_index("run")
    assert set(df.index) == set(reference.index)
    assert (df["status"] == reference.loc[df.index, "status"]).all()
    done = reference.index[reference["status"] == "done"]
    np.testing.assert_allclose(df.loc[done, "val_loss"], reference.loc[done, "val_loss"])
    # sizes and layout come from config.yaml through elmjax.layout, as the sweep computes them
    run = done[0]
    model = from_dict(ModelConfig, load_yaml(copy / "runs" / run / "config.yaml")["model"])
    assert df.loc[run, "params"] == param_counts(model).total == reference.loc[run, "params"]
    assert df.loc[run, "q_heads"] == reference.loc[run, "q_heads"]
    assert (df["is_uniform"] == reference.loc[df.index, "is_uniform"]).all()
    assert set(df.loc[df["is_uniform"], "arm"]) == {"uniform"}
    assert df["twin"].isna().all()  # planning columns are unknown without the results table


def test_missing_columns_are_added_and_listed(tmp_path):
    (tmp_path / "s").mkdir()
    pd.DataFrame({"run": ["a", "b"], "status": ["done", "failed"], "val_loss": [3.0, None]}).to_csv(
        tmp_path / "s" / "results.csv", index=False)
    df = load_sweep(tmp_path / "s")
    assert "params" in df.attrs["missing_columns"] and df["params"].isna().all()
    assert list(df["finished"]) == [True, False]


def test_clear_errors(tmp_path):
    with pytest.raises(SweepError, match="no such sweep directory"):
        load_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepError, match="no results.parquet, results.csv or run directories"):
        load_sweep(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "odd" / "results.csv", index=False)
    with pytest.raises(SweepError, match=r"results.csv: required column\(s\) run, status missing"):
        load_sweep(tmp_path / "odd")
    with pytest.raises(SweepError, match="no sweep directories"):
        load_sweep([])


def test_several_sweeps(sweep, tmp_path):
    other = write_sweep(tmp_path / "other", arms=("middle",), seeds=(0,))
    df = load_sweep([sweep, other])
    assert set(df["sweep"]) == {"quick", "other"} and len(df) == 12 + 6


def test_training_curves_long_format(sweep, tmp_path):
    df = load_sweep(sweep)
    curves = load_curves(sweep, df)
    assert list(curves.columns) == ["sweep", "run", "arm", "budget", "seed", "is_uniform", "status", "kind",
                                    "step", "tokens", "metric", "value"]
    assert {"loss", "val_loss", "val_acc", "lr"} <= set(curves["metric"])
    assert "batch_fingerprint" not in set(curves["metric"])
    pending = df.loc[df["status"] == "pending", "run"].iloc[0]
    assert pending not in set(curves["run"])  # never started: no log
    one = curves[(curves["run"] == df["run"].iloc[0]) & (curves["metric"] == "val_loss")]
    assert list(one["step"]) == [100, 200, 300] and one["tokens"].is_monotonic_increasing
    # a torn last line (killed mid-write) is skipped; NaN losses (divergence) are dropped
    copy = tmp_path / "torn"
    shutil.copytree(sweep, copy)
    log = copy / "runs" / df["run"].iloc[0] / "metrics.jsonl"
    log.write_text(log.read_text() + '{"kind": "train", "step": 31')
    again = load_curves(copy)
    assert len(again) == len(curves)
    assert np.isfinite(again["value"]).all()
