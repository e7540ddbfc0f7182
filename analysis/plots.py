"""Seaborn figures for sweeps: scaling curves with bands, arm-vs-twin differences,
(alpha, beta) heatmaps, training curves, per-layer allocations, isoFLOP parabolas.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot,
so nothing depends on (or changes) the global backend or figure registry:
figures render with Agg in scripts and inline in notebooks, and
:func:`save_figure` writes PNG and PDF atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.compare import arm_labels, lower_is_better

STYLE = "whitegrid"


def palette(names) -> dict:
    names = sorted({str(n) for n in names})
    return dict(zip(names, sns.color_palette("colorblind", max(len(names), 1))))


def save_figure(fig: Figure, directory: str | Path, name: str, dpi: int = 110) -> list[Path]:
    """Write ``name``.png and ``name``.pdf into ``directory`` (tmp file + rename); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        final = directory / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".{ext}", dir=directory)
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext, dpi=dpi)  # constrained layout already fits the labels
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(final)
    return paths


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.2, **kw):
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _curve(fit, x):
    """The fit's curve at x and its band (None when not bootstrapped)."""
    y = fit.predict(x)
    band = fit.band(lambda p: fit.predict(x, params=p)) if getattr(fit, "samples", None) is not None else None
    return y, band


def _clip_y(ax, values: np.ndarray) -> None:
    """Keep the y-axis on the data and fitted curves: a poorly determined fit's
    bootstrap band can span orders of magnitude and would flatten everything
    else into a line (the band is still drawn, just cut at the frame)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return
    lo, hi = float(values.min()), float(values.max())
    pad = 0.5 * max(hi - lo, 1e-3 * max(abs(hi), 1e-12))
    ax.set_ylim(lo - pad, hi + pad)


def plot_scaling(df: pd.DataFrame, metric: str = "val_loss", size: str = "params", fits: dict | None = None,
                 title: str | None = None) -> Figure:
    """Finished runs' ``metric`` against ``size`` (log x), one colour per arm, fitted curves with bands.

    ``fits`` maps arm name -> a fit with ``predict(x, params=None)`` (power
    law, sigmoid) and optional bootstrap ``samples``.
    """
    data = df[(df["status"] == "done") & np.isfinite(pd.to_numeric(df[metric], errors="coerce"))]
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = palette(list(data["arm"].astype(str)) + list((fits or {}).keys()))
    if len(data):
        sns.scatterplot(data=data.assign(arm=data["arm"].astype(str)), x=size, y=metric, hue="arm",
                        style="arm", palette=colors, ax=ax, s=40)
    shown = [pd.to_numeric(data[metric]).to_numpy(float)]
    for arm, fit in (fits or {}).items():
        sub = data[data["arm"].astype(str) == arm]
        lo_x = sub[size].min() if len(sub) else fit.x_range[0] if hasattr(fit, "x_range") else 1.0
        hi_x = sub[size].max() if len(sub) else fit.x_range[1] if hasattr(fit, "x_range") else 10.0
        x = np.geomspace(lo_x, hi_x, 100)
        y, band = _curve(fit, x)
        ax.plot(x, y, color=colors[arm], lw=1.5)  # solid over the data's range only
        shown.append(np.asarray(y, float))
        if band is not None:
            ax.fill_between(x, band[0], band[1], color=colors[arm], alpha=0.18, lw=0)
        for ends in ((lo_x / 1.5, lo_x), (hi_x, hi_x * 1.5)):  # a short extrapolation, marked dashed
            xe = np.geomspace(*ends, 20)
            ax.plot(xe, fit.predict(xe), color=colors[arm], lw=1.2, ls="--", alpha=0.8)
    _clip_y(ax, np.concatenate(shown))
    ax.set_xscale("log")
    ax.set(xlabel=size, ylabel=metric, title=title or f"{metric} vs {size}")
    if fits:
        ax.text(0.99, 0.01, "dashed: fit extrapolated beyond the runs", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="0.35")
    return fig


def plot_differences(diffs: pd.DataFrame, metric: str = "val_loss") -> Figure:
    """Arm minus uniform twin per budget, mean over seeds with bootstrap error bars."""
    fig, axes = _figure()
    ax = axes[0, 0]
    arms = sorted(diffs["arm"].astype(str).unique())
    colors = palette(arms)
    offsets = np.linspace(-0.04, 0.04, len(arms)) if len(arms) > 1 else [0.0]
    for off, arm in zip(offsets, arms):
        g = diffs[diffs["arm"].astype(str) == arm].sort_values("budget")
        x = g["budget"].to_numpy(float) * 10 ** off  # small log-offsets keep the bars apart
        y = g["diff"].to_numpy(float)
        err = np.vstack([y - g["low"].to_numpy(float), g["high"].to_numpy(float) - y])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=colors[arm], label=arm)
    ax.axhline(0.0, color="0.3", lw=1, ls="--")
    ax.set_xscale("log")
    better = "lower" if lower_is_better(metric) else "higher"
    ax.set(xlabel="budget", ylabel=f"{metric}: arm - uniform twin", title=f"arm minus uniform twin ({better} is better)")
    if arms:
        ax.legend(fontsize=8)
    return fig


def bounds_table(df: pd.DataFrame, diffs: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Mean paired difference at ``budget`` with each arm's alpha/beta bounds and schedule."""
    arms = df[~df["is_uniform"]].groupby("arm")[["alpha_min", "alpha_max", "beta_min", "beta_max", "qkv_schedule"]]
    bounds = arms.first().reset_index()
    d = diffs[np.isclose(diffs["budget"].astype(float), budget)][["arm", "diff"]]
    t = bounds.merge(d, on="arm", how="inner")
    t["alpha bounds"] = [f"[{a:g}, {b:g}]" for a, b in zip(t["alpha_min"], t["alpha_max"])]
    t["beta bounds"] = [f"[{a:g}, {b:g}]" for a, b in zip(t["beta_min"], t["beta_max"])]
    return t


def plot_bounds_heatmap(df: pd.DataFrame, diffs: pd.DataFrame, budget: float, metric: str = "val_loss") -> Figure:
    """Heatmap of arm - twin over (alpha bounds, beta bounds) at one budget, one panel per schedule."""
    t = bounds_table(df, diffs, budget)
    schedules = sorted(t["qkv_schedule"].astype(str).unique()) or ["-"]
    fig, axes = _figure(ncols=len(schedules), width=4.8, height=4.0)
    lim = float(np.nanmax(np.abs(t["diff"]))) if len(t) and np.isfinite(t["diff"]).any() else 1.0
    cmap = "RdBu_r" if lower_is_better(metric) else "RdBu"  # blue = better for the arm either way
    for ax, sched in zip(axes[0], schedules):
        pivot = t[t["qkv_schedule"].astype(str) == sched].pivot_table(index="alpha bounds", columns="beta bounds",
                                                                      values="diff", aggfunc="mean")
        if pivot.empty:
            ax.set_axis_off()
            continue
        with warnings.catch_warnings():  # seaborn 0.13 calls a colormap method matplotlib 3.11 deprecates
            warnings.filterwarnings("ignore", "The set_bad function", PendingDeprecationWarning)
            sns.heatmap(pivot, annot=True, fmt=".3f", cmap=cmap, vmin=-lim, vmax=lim, center=0.0, ax=ax,
                        cbar_kws={"label": f"{metric} arm - twin"})
        ax.set_title(f"schedule {sched}, budget {budget:.3g}")
    return fig


def plot_training_curves(curves: pd.DataFrame, df: pd.DataFrame | None = None, metric: str = "val_loss") -> Figure:
    """``metric`` against tokens for every run, coloured by arm, one panel per budget."""
    data = curves[curves["metric"] == metric].copy()
    if df is not None and len(data):
        labels = dict(zip(zip(df["sweep"], df["run"]), arm_labels(df)))
        data["arm"] = [labels.get((s, r), a) for s, r, a in zip(data["sweep"], data["run"], data["arm"])]
    data["arm"] = data["arm"].astype(str)
    budgets = sorted(data["budget"].dropna().unique()) or [None]
    fig, axes = _figure(ncols=len(budgets), width=4.6, height=3.8, sharey=True)
    colors = palette(data["arm"].unique())
    for ax, budget in zip(axes[0], budgets):
        sub = data if budget is None else data[data["budget"] == budget]
        if len(sub):
            # Eval metrics have few points (every eval_every steps): mark each one so the line is not mistaken
            # for a dense curve.
            evals = bool((sub["kind"] == "eval").any())
            sns.lineplot(data=sub, x="tokens", y="value", hue="arm", units="run", estimator=None, palette=colors,
                         ax=ax, lw=1.2, legend=ax is axes[0, 0], marker="o" if evals else None,
                         markersize=4 if evals else None)
        ax.set(xlabel="tokens", ylabel=metric, title="all runs" if budget is None else f"budget {budget:.3g}")
    return fig


def plot_allocation(df: pd.DataFrame, budget: float | None = None) -> Figure:
    """Query/KV heads and FFN width against depth for one run of each arm (largest budget by default)."""
    rows = df[df["q_heads"].notna() & df["ffn_dims"].notna()]
    if budget is None and rows["budget"].notna().any():
        budget = float(rows["budget"].max())
    if budget is not None:
        rows = rows[np.isclose(rows["budget"].astype(float), budget)]
    rows = rows.assign(label=arm_labels(rows)).drop_duplicates("label")
    fig, axes = _figure(ncols=2, width=5.0, height=3.8)
    ax_h, ax_f = axes[0]
    colors = palette(rows["label"])
    for r in rows.itertuples(index=False):
        q, kv, ffn = (json.loads(v) for v in (r.q_heads, r.kv_heads, r.ffn_dims))
        depth = np.arange(len(q))
        ax_h.plot(depth, q, "o-", color=colors[r.label], label=f"{r.label} (query)")
        ax_h.plot(depth, kv, ".--", color=colors[r.label], alpha=0.7)
        ax_f.plot(depth, ffn, "o-", color=colors[r.label], label=r.label)
    for ax in (ax_h, ax_f):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))  # head counts are whole numbers
    title = "" if budget is None else f" (budget {budget:.3g})"
    ax_h.set(xlabel="layer", ylabel="heads (solid: query, dashed: KV)", title="attention heads" + title)
    ax_f.set(xlabel="layer", ylabel="FFN width", title="FFN width" + title)
    if len(rows):
        ax_f.legend(fontsize=7)
    return fig


def plot_isoflop(df: pd.DataFrame, fit, size: str = "params", metric: str = "val_loss") -> Figure:
    """Loss against size per FLOP budget with the fitted parabolas' minima (Approach 2)."""
    data = df[(df["status"] == "done") & np.isfinite(pd.to_numeric(df[metric], errors="coerce"))]
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = dict(zip(sorted(data["budget"].unique()), sns.color_palette("viridis", data["budget"].nunique())))
    for budget, g in data.groupby("budget"):
        ax.scatter(g[size], g[metric], color=colors[budget], s=25, label=f"C={budget:.3g}")
        x = np.log(g[size].to_numpy(float))
        if len(np.unique(x)) >= 3:
            c = np.polyfit(x, g[metric].to_numpy(float), 2)
            xs = np.linspace(x.min(), x.max(), 60)
            ax.plot(np.exp(xs), np.polyval(c, xs), color=colors[budget], lw=1)
    opt = fit.budgets
    ax.errorbar(opt["N_opt"], opt["loss_opt"], xerr=[opt["N_opt"] - opt["N_opt_low"], opt["N_opt_high"] - opt["N_opt"]]
                if opt["N_opt_low"].notna().all() else None, fmt="k*", ms=10, label="N_opt")
    ax.set_xscale("log")
    ax.set(xlabel=size, ylabel=metric, title=f"isoFLOP profiles: N_opt ~ C^{fit.a.estimate:.3g}")
    ax.legend(fontsize=7)
    return fig


def _loss_vs_value(ax, curve: pd.DataFrame, x: str, color, label: str) -> None:
    """One curve of mean loss (sd error bars) against column ``x``, its lowest finite point starred."""
    curve = curve.sort_values(x)
    ax.errorbar(curve[x], curve["mean"], yerr=curve["sd"].fillna(0.0), marker="o", capsize=3, color=color,
                label=label)
    ok = curve[np.isfinite(curve["mean"])]
    if len(ok):
        best = ok.loc[ok["mean"].idxmin()]
        ax.plot([best[x]], [best["mean"]], marker="*", markersize=14, color=color, linestyle="")


def plot_tuning_curves(curves: pd.DataFrame, budget: float, axis: str = "optimizer.lr",
                       metric: str = "val_loss") -> Figure:
    """Loss against the tuned value (log x) per arm at one budget; the best value of each arm is marked."""
    g = curves[curves["budget"] == budget]
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = palette(g["arm"])
    for arm, a in g.groupby("arm", sort=True):
        _loss_vs_value(ax, a, "value", colors[str(arm)], str(arm))
    ax.set_xscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{metric} (mean over tuning seeds)")
    ax.set_title(f"tuning at budget {budget:.3g} (star: best per arm)")
    if len(g):
        _clip_y(ax, g["mean"].to_numpy(float))
        ax.legend(fontsize=8)
    return fig


def plot_lr_transfer(curves: pd.DataFrame, metric: str = "val_loss", arm: str | None = None) -> Figure:
    """Loss against lr (log x), one line per width, one panel per parametrization; stars mark each width's best.

    ``arm`` picks one model family of :func:`analysis.lr_transfer.lr_curves` (default: the first)."""
    if "arm" in curves and len(curves):
        arm = sorted(curves["arm"].astype(str).unique())[0] if arm is None else arm
        curves = curves[curves["arm"].astype(str) == arm]
    params = sorted(curves["parametrization"].astype(str).unique()) or ["standard"]
    fig, axes = _figure(ncols=len(params), sharey=True)
    colors = palette(curves["width"].astype(str))
    for ax, param in zip(axes[0], params):
        g = curves[curves["parametrization"].astype(str) == param]
        for width, w in g.groupby("width", sort=True):
            _loss_vs_value(ax, w, "lr", colors[str(width)], f"width {width}")
        ax.set_xscale("log")
        ax.set(xlabel="optimizer.lr", ylabel=f"{metric} (mean over seeds)",
               title=f"{arm + ': ' if arm else ''}{param} (star: best per width)")
        if len(g):
            _clip_y(ax, g["mean"].to_numpy(float))
            ax.legend(fontsize=8)
    return fig
