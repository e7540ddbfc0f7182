"""``python -m analysis.report SWEEP_DIR``: every figure and table of a sweep, in SWEEP_DIR/report/.

Writes report.md (a short plain-language summary, then Markdown tables with
95% intervals) and figures/*.png and *.pdf. Arm-vs-twin differences get no
interval and no verdict below 3 seed pairs and Student t intervals below 5;
a flagged fit's estimates are shown without interval numbers. Works on any sweep the loader can read, however small: a fit the
data cannot support (one budget, one seed, failed runs) is reported with
the reason instead of numbers, and every FitWarning raised while making a
section is listed under it. The report directory is built next to the old
one and swapped in at the end, so a crash never leaves half a report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis import plots
from analysis.accuracy import fit_accuracy_sigmoid, fit_two_step_accuracy
from analysis.compare import (MIN_PAIRS_FOR_BOOTSTRAP, MIN_PAIRS_FOR_INTERVAL, SIZE_GAP_FLAG, effective_multiplier,
                              is_size_grid, paired_differences, rank_arms, size_gaps)
from analysis.fits import FitWarning, InsufficientDataError, fit_chinchilla, fit_power_law
from analysis.isoflop import fit_isoflop
from analysis.load import SweepError, load_curves, load_sweep
from analysis.markdown import number, table, with_interval
from analysis.splits import final_metric, split_problems
from analysis.tuning import main_rows, tune_rows
from analysis.tuning_report import read_tune_record, tuned_label, tuning_section
from analysis.pooled import pooled_relative_differences
from analysis.power import ALPHA, POWER, RELATIVE_TARGETS, detectable_text, power_table, seeds_column

DEFAULT_N_BOOT = 1000


@dataclass
class _Ctx:
    df: pd.DataFrame
    curves: pd.DataFrame
    fig_dir: Path
    n_boot: int
    seed: int
    chance: dict
    figures: list = field(default_factory=list)
    tune: pd.DataFrame | None = None  # tuning runs (role=tune) of a tuned sweep; ``df`` holds the rest
    tune_record: dict | None = None  # the sweep's tune.json

    def figure(self, fig, name: str, caption: str) -> str:
        plots.save_figure(fig, self.fig_dir, name)
        self.figures.append(name)
        return f"![{caption}](figures/{name}.png)\n\n_{caption}_ ([PDF](figures/{name}.pdf))"

    @property
    def done(self) -> pd.DataFrame:
        return self.df[self.df["finished"]]

    @property
    def metric(self) -> str:
        """The final comparison's metric: test loss when every finished run has one, else validation loss."""
        return final_metric(self.df)

    @property
    def isoflop_grid(self) -> bool:
        """Several sizes of one arm at one budget: loss against size is then not a scaling curve."""
        return is_size_grid(self.done)

    @property
    def size(self) -> str:
        """The size column fits use: non-embedding params only when every budget counts those."""
        kinds = set(self.df["budget_kind"].dropna())
        return "non_embedding_params" if kinds == {"non_embedding_params"} else "params"


FLAGGED = "(flagged: no interval)"


def _fit_cell(fit, name: str) -> str:
    """The estimate with its interval; a flagged fit's interval says more about the fitter than the data,
    so only the estimate is shown, marked (its flags are listed next to it)."""
    iv = fit.interval(name)
    return _cell(fit, iv.estimate, iv.low, iv.high)


def _cell(fit, est, low, high, digits: int = 4) -> str:
    if fit.flags:
        return f"{number(est, digits)} {FLAGGED}"
    return with_interval(est, low, high, digits)


def _section(title: str, body: Callable[[], str]) -> str:
    """Run one section, listing the FitWarnings it raised under it (other warnings pass through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        text = body()
    for w in caught:
        if not issubclass(w.category, FitWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, FitWarning)})
    if notes:
        text += "\n\n**Warnings while fitting:**\n\n" + "\n".join(f"- {n}" for n in notes)
    return f"## {title}\n\n{text}\n"


def _overview(ctx: _Ctx) -> str:
    df = ctx.df
    counts = df["status"].value_counts()
    lines = [f"- runs: {len(df)} (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")",
             f"- usable (done, finite val_loss): {int(df['finished'].sum())}",
             f"- arms: {', '.join(sorted(df['arm'].dropna().astype(str).unique())) or '–'}",
             f"- budgets ({', '.join(df['budget_kind'].dropna().astype(str).unique()) or 'none'}): "
             + (", ".join(number(b) for b in sorted(df['budget'].dropna().unique())) or "–"),
             f"- seeds: {', '.join(number(s) for s in sorted(df['seed'].dropna().unique())) or '–'}"]
    lines.append(_splits_line(ctx))
    bad = df[df["status"].isin(["failed", "diverged"]) | ((df["status"] == "done") & ~df["finished"])]
    text = "\n".join(lines)
    if len(bad):
        t = bad[["run", "arm", "budget", "seed", "status", "error"]].copy()
        t["error"] = t["error"].fillna("").astype(str).str.slice(0, 120)
        text += "\n\nRuns left out of every fit:\n\n" + table(t)
    summary = ctx.done.groupby(["arm", "budget"], dropna=False)["val_loss"].agg(["count", "mean", "std"]).reset_index()
    text += "\n\nFinal validation loss per arm and budget (mean and sd over seeds):\n\n"
    return text + table(summary.rename(columns={"count": "seeds"}))


def _splits_line(ctx: _Ctx) -> str:
    problems = split_problems(ctx.df)
    if problems:
        return "- held-out splits: **differ between runs**: " + "; ".join(problems)
    prints = {c: sorted(ctx.done[c].dropna().astype(str).unique()) for c in ("val_fingerprint", "test_fingerprint")}
    shown = ", ".join(f"{c.split('_')[0]} {v[0]}" for c, v in prints.items() if v) or "not recorded (older runs)"
    return (f"- held-out splits (same for every finished run): {shown}; final comparisons use {ctx.metric}"
            + (" (selection used validation only)" if ctx.metric == "test_loss" else ""))


def _comparison(ctx: _Ctx, metric: str) -> str:
    d = paired_differences(ctx.df, metric, n_boot=max(ctx.n_boot, 200), seed=ctx.seed)
    if d.empty:
        return "No layer-wise arms with uniform twins in this sweep: nothing to compare."
    d = power_table(d)
    t = d.assign(**{"arm - twin": [with_interval(a, b, c) for a, b, c in zip(d["diff"], d["low"], d["high"])],
                    "relative": [f"{v:+.2%}" if math.isfinite(v) else "–" for v in d["rel_diff"]],
                    "verdict": [_verdict_cell(r) for r in d.itertuples()]})
    cols = ["arm", "budget", "n_pairs", "arm - twin", "interval", "relative", "arm_mean", "twin_mean", "verdict",
            "note"]
    text = (f"Paired difference of final `{metric}` between each arm and its uniform twin (same budget and seed), "
            f"averaged over seeds, with a 95% interval over the seed pairs: none below {MIN_PAIRS_FOR_INTERVAL} "
            f"pairs (and no verdict), Student t below {MIN_PAIRS_FOR_BOOTSTRAP}, percentile bootstrap from "
            f"{MIN_PAIRS_FOR_BOOTSTRAP}.{tuned_label(ctx)}\n\n" + table(t[cols]) + _size_gap_text(ctx.df))
    if np.isfinite(d["diff"]).any():
        text += "\n\n" + ctx.figure(plots.plot_differences(d, metric), f"diff_{metric.replace('.', '_')}",
                                    f"{metric}: arm minus uniform twin per budget")
    return text


def _verdict_cell(r) -> str:
    """A "no clear difference" is only as strong as the differences the sweep could have seen."""
    if r.verdict == "no clear difference":
        return f"{r.verdict}: {detectable_text(r.mde, r.mde_rel)}"
    return r.verdict


def _power(ctx: _Ctx) -> str:
    d = paired_differences(ctx.df, ctx.metric, n_boot=200, seed=ctx.seed)
    d = d[d["n_pairs"] > 0] if len(d) else d
    if d.empty:
        return "No finished arm/twin pairs: no seed-to-seed spread to plan from."
    d = power_table(d)
    t = d.assign(**{"seed_sd": [number(v, 3) for v in d["seed_sd"]],
                    "detectable (abs)": [number(v, 3) for v in d["mde"]],
                    "detectable (rel)": [f"{v:.2%}" if math.isfinite(v) else "–" for v in d["mde_rel"]],
                    **{f"seeds for {p:.1%}": [_seeds(v) for v in d[seeds_column(p)]] for p in RELATIVE_TARGETS}})
    cols = ["arm", "budget", "n_pairs", "seed_sd", "detectable (abs)", "detectable (rel)",
            *[f"seeds for {p:.1%}" for p in RELATIVE_TARGETS]]
    return (f"The smallest arm-minus-twin difference in {ctx.metric} this sweep can detect with {POWER:.0%} power "
            f"(two-sided paired t-test, alpha {ALPHA:g}), taking the observed seed-to-seed sd of the paired "
            "differences as the true one, and how many seed pairs would detect relative differences of "
            + ", ".join(f"{p:.1%}" for p in RELATIVE_TARGETS) + " (relative to the twin's mean loss). With few "
            "seeds the sd is itself uncertain, so read these as estimates; rows with one pair have no sd.\n\n"
            + table(t[cols]) + _pooled_power(ctx))


def _pooled_power(ctx: _Ctx) -> str:
    """With several budgets: arm vs twin pooled over them, one relative difference per (budget, seed) pair."""
    if ctx.df["budget"].nunique() < 2:
        return ""
    p = pooled_relative_differences(ctx.df, ctx.metric, n_boot=ctx.n_boot, seed=ctx.seed)
    p = p[p["n_budgets"] > 1]
    if p.empty:
        return ""
    pct = lambda v: f"{v:+.2%}" if math.isfinite(v) else "–"  # noqa: E731
    t = p.assign(**{"relative difference [interval]": [f"{pct(r.rel_diff)} [{pct(r.low)}, {pct(r.high)}]"
                                                       for r in p.itertuples()],
                    "detectable (rel)": [f"{v:.2%}" if math.isfinite(v) else "–" for v in p["mde_rel"]],
                    **{f"pairs for {q:.1%}": [_seeds(v) for v in p[f"pairs_for_{q * 100:g}%"]]
                       for q in RELATIVE_TARGETS},
                    "verdict": [v + (f"; we could have seen differences larger than {m:.2%} (relative)"
                                     if v == "no clear difference" and math.isfinite(m) else "")
                                for v, m in zip(p["verdict"], p["mde_rel"])]})
    cols = ["arm", "n_budgets", "n_pairs", "relative difference [interval]", "detectable (rel)",
            *[f"pairs for {q:.1%}" for q in RELATIVE_TARGETS], "verdict"]
    return ("\n\nPooled over budgets (`analysis/pooled.py`): each (budget, seed) pair is one relative difference "
            "(arm - twin) / twin, so the pairs add up across budgets; this is the mean effect over these budgets "
            "(an effect that changes with size averages out), and the spread between budgets' effects only "
            "widens the interval.\n\n" + table(t[cols]))


def _seeds(v: float) -> str:
    return "–" if v != v else ("> 100000" if math.isinf(v) else str(int(v)))


def _size_gap_text(df: pd.DataFrame) -> str:
    gaps = size_gaps(df)
    if gaps.empty:
        return ""
    lines = [f"- {r.run} ({number(r.arm_params)} params) vs twin {r.twin} ({number(r.twin_params)}): "
             f"{r.size_gap:.1%}" for r in gaps.itertuples()]
    return (f"\n\n**Size mismatch:** {len(gaps)} arm/twin pair(s) differ in parameters by more than "
            f"{SIZE_GAP_FLAG:.0%}, so part of their difference may be size (lower match.tolerance):\n\n"
            + "\n".join(lines))


def _multiplier(ctx: _Ctx) -> str:
    res = effective_multiplier(ctx.df, n_boot=ctx.n_boot, seed=ctx.seed)
    parts = []
    for key, fit in res.fits.items():
        parts.append(f"- uniform fit for {' / '.join(map(str, key))}: " +
                     (f"cannot fit: {fit}" if isinstance(fit, str) else
                      f"L = {_fit_cell(fit, 'E')} + {_fit_cell(fit, 'A')} * x^-{_fit_cell(fit, 'alpha')}"
                      + (f" (flags: {'; '.join(fit.flags)})" if fit.flags else "")))
    if not parts:
        return "No finished uniform runs: no uniform scaling curve to read multipliers from."
    t = res.table
    text = ("How many uniform parameters (FLOPs for FLOP budgets) would reach each arm's mean loss, read from a "
            "power law fitted to all uniform runs; the interval resamples both the uniform runs and the arm's "
            "seeds.\n\n" + "\n".join(parts))
    if len(t):
        t = t.assign(multiplier=[f"{number(a, 3)} {FLAGGED}" if f else with_interval(a, b, c, 3)
                                 for a, b, c, f in zip(t["multiplier"], t["low"], t["high"], t["fit_flagged"])])
        text += "\n\n" + table(t[["arm", "budget", "n_seeds", "size", "arm_size", "effective_size", "multiplier",
                                  "note"]])
    return text


def _ranking(ctx: _Ctx) -> str:
    r = rank_arms(ctx.df, n_boot=max(ctx.n_boot, 200), seed=ctx.seed)
    if r.empty:
        return "No finished runs to rank."
    r = r.assign(**{"val_loss": [with_interval(a, b, c) for a, b, c in zip(r["mean"], r["low"], r["high"])],
                    "rank [interval]": [f"{a} [{b}, {c}]" for a, b, c in zip(r["rank"], r["rank_low"], r["rank_high"])]})
    return ("Arms (uniform twins included) ranked by mean final val_loss at each budget; rank intervals and "
            "P(best) from resampling each arm's seeds.\n\n"
            + table(r[["budget", "arm", "n_seeds", "val_loss", "rank [interval]", "p_best", "note"]]))


def _power_laws(ctx: _Ctx, x: str, label: str) -> tuple[dict, str]:
    fits, rows = {}, []
    for arm, g in ctx.done.groupby("arm"):
        try:
            fit = fit_power_law(g[x], g["val_loss"], variable=x, n_boot=ctx.n_boot, seed=ctx.seed)
        except InsufficientDataError as e:
            rows.append({"arm": arm, "points": len(g), "E": "–", "A": "–", "alpha": "–", "note": f"cannot fit: {e}"})
            continue
        fits[str(arm)] = fit
        rows.append({"arm": arm, "points": fit.n_points, "E": _fit_cell(fit, "E"), "A": _fit_cell(fit, "A"),
                     "alpha": _fit_cell(fit, "alpha"), "note": "; ".join(fit.flags)})
    return fits, f"L = E + A * {label}^-alpha per arm (Chinchilla Approach 3 procedure):\n\n" + table(pd.DataFrame(rows))


def _scaling(ctx: _Ctx) -> str:
    if ctx.isoflop_grid:
        return ("Several model sizes share each budget (an isoFLOP grid): loss against size or compute across "
                "all runs is not a scaling curve, so no single-variable fits; see the IsoFLOP section and the "
                "L(N, D) fit below.\n\n" + _chinchilla(ctx))
    size = ctx.size
    fits, text = _power_laws(ctx, size, size)
    out = [text]
    if fits or len(ctx.done):
        out.append(ctx.figure(plots.plot_scaling(ctx.df, "val_loss", size, fits), "loss_vs_params",
                              f"final val_loss vs {size}, fitted power laws with 95% bands"))
    cfits, ctext = _power_laws(ctx, "train_flops", "C")
    out.append(ctext)
    if cfits:
        out.append(ctx.figure(plots.plot_scaling(ctx.df, "val_loss", "train_flops", cfits), "loss_vs_compute",
                              "final val_loss vs training FLOPs"))
    out.append(_chinchilla(ctx))
    return "\n\n".join(out)


def _chinchilla(ctx: _Ctx) -> str:
    parts = ["Chinchilla L(N, D) = E + A/N^alpha + B/D^beta (N = params, D = tokens), Hoffmann et al. App. D.2:"]
    for arm, g in ctx.done.groupby("arm"):
        try:
            fit = fit_chinchilla(g["params"], g["tokens"], g["val_loss"], n_boot=ctx.n_boot, seed=ctx.seed)
        except InsufficientDataError as e:
            parts.append(f"- {arm}: cannot fit: {e}")
            continue
        t = fit.table().reset_index()
        t["value"] = [_cell(fit, a, b, c) for a, b, c in zip(t["estimate"], t["low"], t["high"])]
        top = float(g["train_flops"].max())
        opt = fit.compute_optimal([top, 10 * top, 100 * top])
        opt["N_opt"] = [_cell(fit, a, b, c, 3) for a, b, c in zip(opt["N_opt"], opt["N_opt_low"], opt["N_opt_high"])]
        opt["D_opt"] = [_cell(fit, a, b, c, 3) for a, b, c in zip(opt["D_opt"], opt["D_opt_low"], opt["D_opt_high"])]
        parts.append(f"\n**{arm}** ({fit.n_points} runs, objective {fit.objective:.4g}"
                     + (f"; flags: {'; '.join(fit.flags)}" if fit.flags else "") + ")\n\n"
                     + table(t[["quantity", "value"]]) + "\n\nCompute-optimal allocation (C = 6 N D):\n\n"
                     + table(opt[["C", "N_opt", "D_opt", "tokens_per_param"]]))
    return "\n".join(parts)


def _isoflop(ctx: _Ctx) -> str:
    flops = ctx.df[ctx.df["budget_kind"] == "flops"]
    if flops.empty:
        return "No FLOP budgets in this sweep (Approach 2 needs several model sizes per FLOP budget)."
    parts = []
    for arm, g in flops[flops["finished"]].groupby("arm"):
        try:
            fit = fit_isoflop(g["budget"], g["params"], g["val_loss"], g["tokens"], n_boot=ctx.n_boot, seed=ctx.seed)
        except InsufficientDataError as e:
            parts.append(f"- {arm}: cannot fit: {e}")
            continue
        b = fit.budgets.copy()
        b["N_opt"] = [_cell(fit, x, y, z, 3) for x, y, z in zip(b["N_opt"], b["N_opt_low"], b["N_opt_high"])]
        b["D_opt"] = [_cell(fit, x, y, z, 3) for x, y, z in zip(b["D_opt"], b["D_opt_low"], b["D_opt_high"])]
        exps = (f"a = {_cell(fit, fit.a.estimate, fit.a.low, fit.a.high)}; D_opt ~ C^b with "
                f"b = {_cell(fit, fit.b.estimate, fit.b.low, fit.b.high)}")
        parts.append(f"\n**{arm}**: N_opt ~ C^a with {exps}"
                     + (f" (flags: {'; '.join(fit.flags)})" if fit.flags else "") + "\n\n"
                     + table(b[["C", "sizes", "N_opt", "D_opt", "loss_opt", "note"]]) + "\n\n"
                     + ctx.figure(plots.plot_isoflop(g, fit), f"isoflop_{arm}", f"isoFLOP profiles ({arm})"))
    return "\n".join(parts)


def _accuracy_metrics(df: pd.DataFrame) -> list[str]:
    cols = ["val_acc"] + sorted(c for c in df.columns if str(c).startswith("eval.") and str(c).endswith(".acc"))
    return [c for c in cols if c in df and np.isfinite(pd.to_numeric(df[c], errors="coerce")).any()]


def _accuracy(ctx: _Ctx) -> str:
    metrics = _accuracy_metrics(ctx.done)
    if not metrics:
        return "No accuracy columns with values."
    parts = []
    for metric in metrics:
        parts.append(f"### {metric}")
        if not ctx.isoflop_grid:
            parts += _sigmoids(ctx, metric)
        parts.append(_two_step(ctx, metric))
        parts.append("Paired comparison:\n\n" + _comparison(ctx, metric))
    return "\n\n".join(parts)


def _sigmoids(ctx: _Ctx, metric: str) -> list[str]:
    chance = float(ctx.chance.get(metric, 0.0))
    fits, rows = {}, []
    for arm, g in ctx.done.groupby("arm"):
        try:
            fit = fit_accuracy_sigmoid(g["params"], g[metric], chance=chance, n_boot=ctx.n_boot, seed=ctx.seed)
        except InsufficientDataError as e:
            rows.append({"arm": arm, "k": "–", "N_mid": "–", "note": f"cannot fit: {e}"})
            continue
        fits[str(arm)] = fit
        rows.append({"arm": arm, "k": _fit_cell(fit, "k"), "N_mid": _fit_cell(fit, "N_mid"),
                     "note": "; ".join(fit.flags)})
    return [f"Sigmoid in log N from chance ({chance:g}) to 1, per arm:\n\n" + table(pd.DataFrame(rows)),
            ctx.figure(plots.plot_scaling(ctx.df, metric, "params", fits), f"acc_{metric.replace('.', '_')}",
                       f"{metric} vs params with sigmoid fits")]


def _two_step(ctx: _Ctx, metric: str) -> str:
    try:
        fit = fit_two_step_accuracy(ctx.done["val_loss"], ctx.done[metric],
                                    N=None if ctx.isoflop_grid else ctx.done["params"], n_boot=ctx.n_boot,
                                    seed=ctx.seed)
    except InsufficientDataError as e:
        return f"Two-step fit (accuracy from loss): cannot fit: {e}"
    cells = ", ".join(f"{n} = {_fit_cell(fit, n)}" for n in fit.param_names)
    flags = "; ".join(fit.flags + (fit.loss_fit.flags if fit.loss_fit else ()))
    return (f"Two-step fit over all finished runs, {metric} = a / (1 + exp(-k (L - L0))) + b: {cells}"
            + (f" (flags: {flags})" if flags else ""))


def _bounds(ctx: _Ctx) -> str:
    arms = ctx.df[~ctx.df["is_uniform"]]
    if arms[["alpha_min", "alpha_max"]].drop_duplicates().shape[0] < 2 and \
            arms[["beta_min", "beta_max"]].drop_duplicates().shape[0] < 2:
        return "The arms do not vary their (alpha, beta) bounds: no heatmap."
    d = paired_differences(ctx.df, n_boot=200, seed=ctx.seed)
    d = d[np.isfinite(d["diff"])]
    return "\n\n".join(ctx.figure(plots.plot_bounds_heatmap(ctx.df, d, b), f"bounds_heatmap_{i}",
                                  f"val_loss arm - twin over (alpha, beta) bounds at budget {b:.3g}")
                       for i, b in enumerate(sorted(d["budget"].dropna().unique()))) or "No finished pairs."


def _pictures(ctx: _Ctx) -> str:
    parts = []
    metric = "val_loss" if (ctx.curves["metric"] == "val_loss").any() else "loss"
    if len(ctx.curves):
        parts.append(ctx.figure(plots.plot_training_curves(ctx.curves, ctx.df, metric), "training_curves",
                                f"{metric} during training, per run"))
    else:
        parts.append("No metrics.jsonl logs found: no training curves.")
    if ctx.df["q_heads"].notna().any():
        parts.append(ctx.figure(plots.plot_allocation(ctx.df), "allocation",
                                "per-layer heads and FFN width of each arm (largest budget)"))
    return "\n\n".join(parts)


def write_report(sweep_dir: str | Path, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                 chance: dict | None = None) -> Path:
    """Write SWEEP_DIR/report/report.md and figures; returns the report directory.

    ``chance`` maps accuracy columns to their chance level (default 0, e.g.
    ``{"eval.hellaswag.acc": 0.25}``).
    """
    sweep_dir = Path(sweep_dir)
    everything = load_sweep(sweep_dir)
    _check_chance(chance or {}, everything, sweep_dir)
    df, tune = main_rows(everything), tune_rows(everything)
    curves = load_curves(sweep_dir, df)
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=sweep_dir))
    try:
        ctx = _Ctx(df, curves, tmp / "figures", n_boot, seed, dict(chance or {}), tune=tune,
                   tune_record=read_tune_record(sweep_dir))
        sections = [
            _section("Overview", lambda: _overview(ctx)),
            _section("Layer-wise arm vs uniform twin (matched budgets)", lambda: _comparison(ctx, ctx.metric)),
            _section("Power: what this sweep could detect", lambda: _power(ctx)),
            *([_section("Tuning", lambda: tuning_section(ctx))] if len(tune) else []),
            _section("Effective parameter multiplier", lambda: _multiplier(ctx)),
            _section("Ranking of arms", lambda: _ranking(ctx)),
            _section("Scaling fits", lambda: _scaling(ctx)),
            _section("IsoFLOP analysis (Approach 2)", lambda: _isoflop(ctx)),
            _section("Accuracy", lambda: _accuracy(ctx)),
            _section("(alpha, beta) bounds", lambda: _bounds(ctx)),
            _section("Training curves and allocations", lambda: _pictures(ctx)),
        ]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        head = (f"# Sweep report: {sweep_dir.resolve().name}\n\n{_summary(ctx)}\n\n`{sweep_dir.resolve()}` — "
                f"generated {now} by `python -m analysis.report` ({n_boot} bootstrap replicates, seed {seed}; "
                "intervals are 95%: percentile bootstrap, or Student t for 3-4 seed pairs).\n")
        (tmp / "report.md").write_text("\n".join([head, *sections]))
        return _swap_in(tmp, sweep_dir / "report")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_chance(chance: dict, df: pd.DataFrame, sweep_dir: Path) -> None:
    """A chance level for a column the sweep lacks is a typo that would silently fit against 0."""
    for col, p in chance.items():
        if col not in df.columns:
            have = ", ".join(_accuracy_metrics(df)) or "none"
            raise SweepError(f"--chance {col}={p:g}: {sweep_dir} has no column {col!r} (accuracy columns: {have})")
        if not 0.0 <= p < 1.0:
            raise SweepError(f"--chance {col}={p:g}: a chance level must be in [0, 1)")


def _summary(ctx: _Ctx) -> str:
    """3-5 plain lines: what was compared, the main result with its interval, how far the evidence goes."""
    df = ctx.df
    arms = sorted(df.loc[~df["is_uniform"], "arm"].dropna().astype(str).unique())
    kind = ", ".join(df["budget_kind"].dropna().astype(str).unique()) or "no"
    what = (f"{', '.join(arms)} against {'its' if len(arms) == 1 else 'their'} uniform twin(s)" if arms
            else "uniform models only (no layer-wise arms)")
    metric = ctx.metric
    lines = [f"**Summary.** Compared: {what} at {df['budget'].dropna().nunique()} {kind} budget(s), "
             f"{df['seed'].dropna().nunique()} seed(s); {int(df['finished'].sum())} of {len(df)} runs finished. "
             f"Metric: final {metric} (lower is better)"
             + ("; held-out test split, never used for selection." if metric == "test_loss" else ".")]
    cautions = list(split_problems(df))
    d = paired_differences(df, metric, n_boot=max(ctx.n_boot, 200), seed=ctx.seed) if arms else pd.DataFrame()
    d = d[d["n_pairs"] > 0] if len(d) else d
    if d.empty:
        lines.append("- No finished arm/twin pairs, so no matched-budget comparison; see the scaling sections.")
        lines.append("- Strength of evidence: nothing was compared.")
        return "\n".join(lines + ([f"- Caution: {'; '.join(cautions)}."] if cautions else []))
    shown = sorted(d["arm"].astype(str).unique())
    for arm in shown[:2]:
        g = d[d["arm"].astype(str) == arm]
        results = "; ".join(f"{number(r.budget, 3)}: {with_interval(r.diff, r.low, r.high)}" for r in g.itertuples())
        verdicts = sorted(set(g["verdict"]) & {"arm better", "arm worse"})
        label = " [95% interval]" if (g["interval"] != "none").any() else " (no intervals)"
        lines.append(f"- {arm} minus its twin, {metric} per budget{label}: {results}"
                     + (f" ({', '.join(verdicts)} where the interval excludes 0)." if verdicts else "."))
    with_iv, decided = d[d["interval"] != "none"], d[d["verdict"].isin(["arm better", "arm worse"])]
    pairs_range = f"{int(d['n_pairs'].min())}-{int(d['n_pairs'].max())}" if d["n_pairs"].nunique() > 1 \
        else str(int(d["n_pairs"].iloc[0]))
    strength = ("none: not enough seeds for an interval anywhere (needs "
                f"{MIN_PAIRS_FOR_INTERVAL} seed pairs)" if with_iv.empty else
                f"{len(with_iv)} of {len(d)} arm/budget comparisons have an interval "
                f"({', '.join(sorted(set(with_iv['interval'].str.split(' ').str[0])))}) and {len(decided)} of "
                "those exclude 0" + ("; with so few seeds, treat any verdict as tentative"
                                     if with_iv["n_pairs"].max() < MIN_PAIRS_FOR_BOOTSTRAP else ""))
    more = f"; {len(shown) - 2} more arm(s) in the comparison section" if len(shown) > 2 else ""
    lines.append(f"- Strength of evidence ({pairs_range} seed pair(s) per comparison): {strength}{more}."
                 + _power_summary(d))
    gaps = size_gaps(df)
    if len(gaps):
        cautions.append(f"{len(gaps)} arm/twin pair(s) differ in size by more than {SIZE_GAP_FLAG:.0%} "
                        "(see the comparison section)")
    if cautions:  # one line, so the summary stays within 5 lines
        lines.append(f"- Caution: {'; '.join(cautions)}.")
    return "\n".join(lines)


def _power_summary(d: pd.DataFrame) -> str:
    """Every "no clear difference" in the summary comes with the size of difference it could have seen
    (appended to the strength-of-evidence line, so the summary stays within 5 lines)."""
    p = power_table(d)
    rel = p["mde_rel"].replace([np.inf], np.nan).dropna()
    need = p[seeds_column(0.01)].replace([np.inf], np.nan).dropna()
    none = p[p["verdict"] == "no clear difference"]
    if rel.empty and none.empty:
        return ""
    parts = []
    if len(rel):
        span = f"{rel.min():.2%}" if len(rel) == 1 else f"{rel.min():.2%} to {rel.max():.2%}"
        parts.append(f"the smallest detectable arm-minus-twin difference is {span} relative"
                     + (f" (detecting 1% would take up to {int(need.max())} seed pairs)" if len(need) else ""))
    if len(none):
        parts.append("where there is no clear difference, " + "; ".join(
            f"{r.arm} at {number(r.budget, 3)}: {detectable_text(r.mde, r.mde_rel)}" for r in none.itertuples()))
    return (f" Sensitivity ({POWER:.0%} power, alpha {ALPHA:g}, paired t-test on the observed seed spread): "
            + "; ".join(parts) + ".")


def _swap_in(tmp: Path, final: Path) -> Path:
    old = None
    if final.exists():
        old = final.with_name(f".report.old.{tmp.name}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep directory (with results.parquet or runs/)")
    parser.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap replicates per interval")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--chance", action="append", default=[], metavar="COLUMN=P",
                        help="chance level of an accuracy column, e.g. eval.hellaswag.acc=0.25 (repeatable)")
    args = parser.parse_args(argv)
    try:
        chance = {k: float(v) for k, v in (c.split("=", 1) for c in args.chance)}
    except ValueError:
        parser.error(f"--chance takes COLUMN=PROBABILITY, got {args.chance}")
    try:
        out = write_report(args.sweep_dir, n_boot=args.n_boot, seed=args.seed, chance=chance)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    figures = sorted(p.stem for p in (out / "figures").glob("*.png")) if (out / "figures").exists() else []
    print(f"wrote {out / 'report.md'} and {len(figures)} figures (PNG + PDF) in {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
