"""Figures: built without pyplot, saved as PNG and PDF, drawing the data they are given."""

import json
import sys

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from analysis import plots
from analysis.compare import paired_differences
from analysis.fits import fit_power_law
from analysis.load import load_curves, load_sweep
from analysis_fixtures import write_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = write_sweep(tmp_path_factory.mktemp("plots") / "s", arms=("openelm", "a0.25-1.0_b1.0-3.0",
                                                                    "a0.5-1.5_b1.0-3.0", "a0.25-1.0_b0.5-4.0"))
    df = load_sweep(path)
    return df, load_curves(path, df), paired_differences(df, n_boot=200)


def test_save_writes_png_and_pdf_atomically(sweep, tmp_path):
    df, _, _ = sweep
    paths = plots.save_figure(plots.plot_scaling(df), tmp_path / "figs", "scaling")
    assert [p.name for p in paths] == ["scaling.png", "scaling.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["scaling.pdf", "scaling.png"]  # no temp files


def test_no_pyplot_state(sweep):
    df, curves, diffs = sweep
    for fig in (plots.plot_scaling(df), plots.plot_differences(diffs), plots.plot_training_curves(curves, df),
                plots.plot_allocation(df), plots.plot_bounds_heatmap(df, diffs, 2.5e5)):
        assert isinstance(fig, Figure)
    if "matplotlib.pyplot" in sys.modules:  # another test may have imported it; we must not add figures
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_scaling_plot_draws_points_curves_and_bands(sweep):
    df, _, _ = sweep
    uni = df[df["is_uniform"] & df["finished"]]
    fit = fit_power_law(uni["params"], uni["val_loss"], n_boot=100)
    ax = plots.plot_scaling(df, fits={"uniform": fit}).axes[0]
    assert ax.get_xscale() == "log"
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the band
    points = np.vstack([c.get_offsets() for c in ax.collections if not isinstance(c, PolyCollection)])
    assert len(points) == df["finished"].sum()
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(y, fit.predict(x))


def test_an_exploding_band_does_not_flatten_the_scaling_plot(sweep):
    df, _, _ = sweep

    class WildFit:  # a fit whose bootstrap band spans eight orders of magnitude
        samples = np.zeros((2, 1))

        def predict(self, x, params=None):
            return 2.0 + 0.0 * np.asarray(x, float)

        def band(self, f):
            y = f(None)
            return y - 1e8, y + 1e8

    ax = plots.plot_scaling(df, fits={"uniform": WildFit()}).axes[0]
    lo, hi = ax.get_ylim()
    losses = df.loc[df["finished"], "val_loss"]
    assert lo >= min(losses.min(), 2.0) - (max(losses.max(), 2.0) - min(losses.min(), 2.0))
    assert hi <= max(losses.max(), 2.0) + (max(losses.max(), 2.0) - min(losses.min(), 2.0))


def test_difference_plot_shows_each_arm_and_zero_line(sweep):
    _, _, diffs = sweep
    ax = plots.plot_differences(diffs).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == sorted(diffs["arm"].unique())


def test_heatmap_holds_the_mean_differences(sweep):
    df, _, diffs = sweep
    table = plots.bounds_table(df, diffs, 2.5e5)
    assert set(table["arm"]) == set(diffs["arm"])
    fig = plots.plot_bounds_heatmap(df, diffs, 2.5e5)
    mesh = fig.axes[0].collections[0]
    values = np.sort(np.asarray(mesh.get_array()).ravel()[~np.isnan(np.asarray(mesh.get_array()).ravel())])
    expected = np.sort(diffs[np.isclose(diffs["budget"], 2.5e5)]["diff"].to_numpy())
    np.testing.assert_allclose(values, expected)


def test_allocation_plot_draws_the_per_layer_widths(sweep):
    df, _, _ = sweep
    fig = plots.plot_allocation(df, budget=1.5e5)
    ax_heads, ax_ffn = fig.axes[:2]
    rows = df[np.isclose(df["budget"], 1.5e5)]
    drawn_ffn = {tuple(line.get_ydata()) for line in ax_ffn.lines}
    assert {tuple(json.loads(v)) for v in rows[~rows["is_uniform"]]["ffn_dims"]} <= drawn_ffn
    drawn_heads = {tuple(line.get_ydata()) for line in ax_heads.lines}
    assert {tuple(json.loads(v)) for v in rows["q_heads"]} <= drawn_heads


def test_training_curves_one_panel_per_budget(sweep):
    df, curves, _ = sweep
    fig = plots.plot_training_curves(curves, df, "val_loss")
    assert len(fig.axes) == 3
    n_runs = curves[(curves["metric"] == "val_loss") & (curves["budget"] == 1.5e5)]["run"].nunique()
    assert len([line for line in fig.axes[0].lines if len(line.get_xdata()) == 3]) == n_runs


def test_fitted_curves_are_solid_over_the_data_and_dashed_beyond(sweep):
    df, _, _ = sweep
    uni = df[df["is_uniform"] & df["finished"]]
    fit = fit_power_law(uni["params"], uni["val_loss"], n_boot=50)
    ax = plots.plot_scaling(df, fits={"uniform": fit}).axes[0]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    lo, hi = uni["params"].min(), uni["params"].max()
    assert len(solid) == 1 and len(dashed) == 2
    x = solid[0].get_xdata()
    assert x.min() == pytest.approx(lo) and x.max() == pytest.approx(hi)  # not extended beyond the runs
    assert max(d.get_xdata().max() for d in dashed) > hi and min(d.get_xdata().min() for d in dashed) < lo
    assert any("extrapolated" in t.get_text() for t in ax.texts)


def test_head_counts_get_integer_ticks_and_eval_points_are_marked(sweep):
    df, curves, _ = sweep
    small = df[~df["is_uniform"]].head(1).assign(q_heads="[1, 2, 2]", kv_heads="[1, 1, 1]", ffn_dims="[32, 48, 64]")
    ax_h = plots.plot_allocation(small).axes[0]  # 1-2 heads: a default axis would tick 1.2, 1.4, ...
    ticks = ax_h.get_yticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    ax = plots.plot_training_curves(curves, df, "val_loss").axes[0]
    assert ax.lines and all(ln.get_marker() == "o" for ln in ax.lines if len(ln.get_xdata()))
