"""Analysis of tuned sweeps on synthetic results: optimum location and width, tuned vs shared-value comparisons."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.load import load_sweep
from analysis.report import write_report
from analysis.tuning import optimum_table, shared_value_differences, tune_rows
from sweep_helpers import write_grid
from sweeps.driver import prepare
from sweeps.grid import load_grid
from sweeps.plan import build_plan
from sweeps.results import write_results
from sweeps.tune import plan_stage, write_tune_record
from elmjax import run_dir as rd

AXES = {"budget": {"kind": "params", "values": [4e4, 8e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"},
        "seed": [0, 1, 2]}
OPT = {False: 2e-3, True: 4e-3}  # true optimum lr: layer-wise arm, uniform twin


def loss(row, rng):
    """A bowl in log lr, optimum OPT, curvature 0.05; the arm is 0.02 better at its optimum; small seed noise."""
    x = math.log(row["tune_value"] / OPT[bool(row["is_uniform"])])
    return 3.0 + 0.05 * x * x - (0.0 if row["is_uniform"] else 0.02) + rng.normal(0, 0.002)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("tuned")
    grid = load_grid(write_grid(d / "g.yaml", AXES, tune={"axis": "optimizer.lr", "seeds": [100, 101],
                                                           "values": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]}))
    base, out, rng = build_plan(grid), d / "sweep", np.random.default_rng(0)
    for _ in range(3):  # tuning, then the main runs it unlocks
        stage = plan_stage(grid, base, out)
        for r in prepare(grid, stage.runs, out):
            if rd.read_status(r.config.run_dir)["state"] != "done":
                rd.write_status(r.config.run_dir, "done", step=1, total_steps=1)
                rd.write_final(r.config.run_dir, {"val_loss": loss(r.row, rng), "params": r.row["params"]})
    write_tune_record(grid, stage, out)
    write_results(out)
    return out


def test_optimum_location_and_width_recover_the_bowl(sweep):
    o = optimum_table(load_sweep(sweep))
    assert len(o) == 4  # 2 budgets x (arm, twin)
    for r in o.itertuples():
        true = OPT[r.arm == "uniform"]
        assert r.best == pytest.approx(true) and not r.at_edge
        assert r.fit_vertex == pytest.approx(true, rel=0.15)
        # within 1% of ~3.0 is 0.03 = 0.05 x^2 -> |x| = 0.775: the parabola's range is exp(+-0.775) around the optimum
        assert r.fit_high / r.fit_low == pytest.approx(math.exp(2 * 0.775), rel=0.1)
        assert r.near_low <= true <= r.near_high


def test_tuned_comparison_uses_main_runs_and_shared_value_comparison_uses_tuning_runs(sweep):
    df = load_sweep(sweep)
    from analysis.compare import paired_differences

    tuned = paired_differences(df)
    assert set(tuned["n_pairs"]) == {3}  # the grid's 3 seeds; tuning runs never enter
    assert (tuned["diff"] - (-0.02)).abs().max() < 0.01  # each at its own optimum: the arm's true 0.02 advantage
    shared = shared_value_differences(df)
    assert set(shared["n_pairs"]) == {2} and shared["axis.tune_value"].nunique() == 6
    at_4e3 = shared[np.isclose(shared["axis.tune_value"], 4e-3)]["diff"]
    # at the twin's optimum the arm is off its own: 0.05 ln(2)^2 - 0.02 = +0.004
    assert at_4e3.to_numpy() == pytest.approx(0.05 * math.log(2) ** 2 - 0.02, abs=0.006)
    assert len(tune_rows(df)) == 2 * 2 * 6 * 2


def test_report_has_the_tuning_section_curves_and_labels_the_tuned_comparison(sweep):
    report = write_report(sweep, n_boot=50)
    text = (report / "report.md").read_text()
    assert "## Tuning" in text and "**Tuned:**" in text and "**At a shared value** (not tuned)" in text
    assert "quadratic optimum [1% width]" in text and "no extensions" in text
    assert {"tuning_0", "tuning_1"} <= {p.stem for p in (report / "figures").glob("*.png")}
    overview = text.split("## Overview")[1].split("##")[0]
    assert "- runs: 12 (" in overview  # main runs only (2 budgets x 2 models x 3 seeds)
