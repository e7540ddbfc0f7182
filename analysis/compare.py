"""Allocation arms against their uniform twins at matched budgets.

* :func:`paired_differences`: per (arm, budget), the mean over seeds of
  metric(arm run) - metric(its uniform twin), with an interval over the seed
  pairs: none below 3 pairs (and no verdict), a Student t interval from 3
  to 4 pairs (a bootstrap of so few values only spans their min and max),
  a percentile bootstrap from 5; a note when the seeds disagree more than
  the effect, or when arm and twin differ in size by more than 1%.
* :func:`effective_multiplier`: how many uniform parameters (or FLOPs) reach
  the arm's loss, read off a power law fitted to the uniform runs; the
  interval resamples both the uniform runs (refitting) and the arm's seeds.
* :func:`arm_differences`: each arm minus one reference arm (layer-wise
  against layer-wise, e.g. reverse - linear), paired by budget and seed
  with the same interval and verdict rules;
* :func:`rank_arms`: arms (twins included) ranked by mean metric at each
  budget, with rank intervals and the probability of being best; each
  arm's mean gets an interval by the same seed-count rule as the paired
  differences.

All take the run table of :func:`analysis.load.load_sweep`. Unfinished runs
(failed, diverged, pending, NaN metric) never enter a comparison; a pair
whose twin did not finish is dropped and counted in the ``dropped`` column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_LEVEL, percentile_interval
from analysis.fits import InsufficientDataError, PowerLawFit, fit_power_law

LOWER_IS_BETTER = ("loss", "ppl", "bpb")
MIN_PAIRS_FOR_INTERVAL = 3  # fewer pairs: no interval and no verdict
MIN_PAIRS_FOR_BOOTSTRAP = 5  # fewer: Student t on the paired differences
SIZE_GAP_FLAG = 0.01  # arm and twin parameter counts further apart than this confound the comparison
GROUP = ["sweep", "budget_kind", "budget"]
# The budget kind decides what "size" means for the effective multiplier.
SIZE_OF_KIND = {"params": "params", "non_embedding_params": "non_embedding_params", "flops": "train_flops"}


def context_columns(df: pd.DataFrame) -> list[str]:
    """Swept axes besides seed, budget and the arm itself (e.g. ``axis.optimizer.lr``).

    Comparisons are made within each combination of these. Axes that define
    the arm (allocation, alpha/beta bounds, schedule) are recognised by being
    empty on the uniform twins, which the sweep leaves without arm parts.
    """
    cols = [c for c in df.columns if str(c).startswith("axis.") and c not in ("axis.seed", "axis.budget",
                                                                           "axis.allocation")]
    twins = df[df["is_uniform"]]
    return [c for c in cols if len(twins) and twins[c].notna().any()]


def arm_labels(df: pd.DataFrame) -> pd.Series:
    """Arm names, with uniform runs told apart when a budget holds several uniform shapes
    (each layer-wise arm's twin has that arm's mean multipliers)."""
    labels = df["arm"].astype(object).where(df["arm"].notna(), "?").astype(str)
    uni = df["is_uniform"].astype(bool)
    shapes = df.loc[uni].groupby(["sweep", "budget"], dropna=False)[["alpha_min", "beta_min"]].nunique()
    several = {k for k, v in shapes.iterrows() if (v > 1).any()}
    for i in df.index[uni]:
        if (df.at[i, "sweep"], df.at[i, "budget"]) in several:
            labels[i] = f"uniform a{df.at[i, 'alpha_min']:.3g} b{df.at[i, 'beta_min']:.3g}"
    return labels


def is_size_grid(df: pd.DataFrame, by=("arm", "budget")) -> bool:
    """Whether some budget holds models of clearly different sizes within one arm (an isoFLOP grid).

    Twins of different layer-wise arms share a budget too, but all land
    within the budget's tolerance of each other, far below the 1.5x here.
    """
    if df.empty:
        return False
    spread = df.groupby(list(by), dropna=False)["params"].agg(lambda p: p.max() / p.min() if p.min() > 0 else 1.0)
    return bool(spread.max() > 1.5)


def lower_is_better(metric: str) -> bool:
    return any(metric.endswith(s) for s in LOWER_IS_BETTER)


def _ok(df: pd.DataFrame, metric: str) -> pd.Series:
    if metric not in df.columns:
        raise KeyError(f"no column {metric!r} in the results; columns: {', '.join(map(str, df.columns))}")
    ok = (df["status"] == "done") & np.isfinite(pd.to_numeric(df[metric], errors="coerce"))
    # Tuning runs of a tuned sweep (role=tune) chose the value; they never enter a comparison of arms.
    return ok & (df["role"] != "tune") if "role" in df else ok


def pairs(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """One row per layer-wise run and its uniform twin: arm, budget, seed, context axes, both values.

    The twin is the ``twin`` column's run; where that is empty, the one
    uniform run of the same sweep, budget, seed and context (if exactly one).
    Values are NaN where a run did not finish.
    """
    ok = _ok(df, metric)
    ctx = context_columns(df)
    records = df.assign(_ok=ok).to_dict("records")
    by_name = {(r["sweep"], r["run"]): r for r in records if r["_ok"]}
    uniform = [r for r in records if r["_ok"] and r["is_uniform"]]
    out = []
    for r in records:
        if r["is_uniform"]:
            continue
        twin = by_name.get((r["sweep"], r["twin"])) if isinstance(r["twin"], str) else _match_twin(uniform, r, ctx)
        out.append({"sweep": r["sweep"], "arm": r["arm"], "budget_kind": r["budget_kind"], "budget": r["budget"],
                    **{c: r[c] for c in ctx}, "seed": r["seed"], "run": r["run"],
                    "twin": None if twin is None else twin["run"],
                    "arm_value": r[metric] if r["_ok"] else math.nan,
                    "twin_value": math.nan if twin is None else twin[metric],
                    "arm_params": r["params"], "twin_params": math.nan if twin is None else twin["params"]})
    cols = ["sweep", "arm", "budget_kind", "budget", *ctx, "seed", "run", "twin", "arm_value", "twin_value",
            "arm_params", "twin_params"]
    return pd.DataFrame(out, columns=cols)


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # NaN == NaN for matching


def _match_twin(uniform: list[dict], r: dict, ctx: list[str]):
    keys = ["sweep", "budget", "seed", *ctx]
    same = [u for u in uniform if all(_same(u[k], r[k]) for k in keys)]
    return same[0] if len(same) == 1 else None


def paired_differences(df: pd.DataFrame, metric: str = "val_loss", *, n_boot: int = 2000,
                       level: float = DEFAULT_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Mean paired difference arm - twin per (sweep, arm, budget, context axes), with interval and notes.

    Columns: sweep, arm, budget_kind, budget, context axes, n_pairs,
    dropped, diff, low, high, rel_diff (diff / mean twin value), arm_mean,
    twin_mean, seed_sd, verdict, note. The verdict is "arm better" or "arm
    worse" only when the interval excludes zero.
    """
    p = pairs(df, metric)
    ctx = context_columns(df)
    keys = ["sweep", "arm", "budget_kind", "budget", *ctx]
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in p.groupby(keys, dropna=False, sort=True):
        good = g[np.isfinite(g["arm_value"]) & np.isfinite(g["twin_value"])]
        # Repeated runs under one seed are averaged so that each seed counts once.
        per_seed = (good["arm_value"] - good["twin_value"]).groupby(good["seed"].fillna(-1)).mean().to_numpy()
        rows.append(_diff_row(dict(zip(keys, key)), per_seed, good, len(g) - len(good), metric, n_boot, level, rng))
    cols = keys + ["n_pairs", "dropped", "diff", "low", "high", "interval", "rel_diff", "arm_mean", "twin_mean",
                   "seed_sd", "size_gap", "verdict", "note"]
    return pd.DataFrame(rows, columns=cols)


def size_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """Arm/twin pairs whose parameter counts differ by more than ``SIZE_GAP_FLAG`` (relative to the twin)."""
    p = pairs(df).dropna(subset=["twin"])
    gap = (p["arm_params"] / p["twin_params"] - 1).abs()
    out = p.assign(size_gap=gap)[gap > SIZE_GAP_FLAG]
    return out[["arm", "budget", "run", "twin", "arm_params", "twin_params", "size_gap"]].drop_duplicates(
        ["run", "twin"]).reset_index(drop=True)


def mean_interval(d: np.ndarray, n_boot: int, level: float, rng) -> tuple[float, float, str]:
    """(low, high, method) of the mean of paired differences ``d``; NaN bounds and 'none' below 3 values."""
    n = len(d)
    if n < MIN_PAIRS_FOR_INTERVAL:
        return math.nan, math.nan, "none"
    if n < MIN_PAIRS_FOR_BOOTSTRAP:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
        return float(d.mean()) - half, float(d.mean()) + half, f"t ({n - 1} df)"
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    low, high = percentile_interval(means, level)
    return low, high, "bootstrap"


def _diff_row(key: dict, d: np.ndarray, good: pd.DataFrame, dropped: int, metric: str, n_boot: int,
              level: float, rng) -> dict:
    n = len(d)
    row = {**key, "n_pairs": n, "dropped": dropped, "diff": math.nan, "low": math.nan, "high": math.nan,
           "interval": "none", "rel_diff": math.nan, "arm_mean": math.nan, "twin_mean": math.nan,
           "seed_sd": math.nan, "size_gap": math.nan, "verdict": "no pairs", "note": ""}
    notes = [f"{dropped} pair(s) dropped (arm or twin unfinished)"] if dropped else []
    if n == 0:
        row["note"] = "; ".join(notes or ["no finished pairs"])
        return row
    mean = float(d.mean())
    row.update(diff=mean, arm_mean=float(good["arm_value"].mean()), twin_mean=float(good["twin_value"].mean()))
    row["rel_diff"] = mean / row["twin_mean"] if row["twin_mean"] else math.nan
    row["size_gap"] = float((good["arm_params"] / good["twin_params"] - 1).abs().max())
    if row["size_gap"] > SIZE_GAP_FLAG:
        notes.append(f"arm and twin sizes differ by up to {row['size_gap']:.1%} (> {SIZE_GAP_FLAG:.0%}): "
                     "part of the difference may be size")
    row["low"], row["high"], row["interval"] = mean_interval(d, n_boot, level, rng)
    if n < MIN_PAIRS_FOR_INTERVAL:
        notes.append(f"not enough seeds for an interval ({n} pair{'s' if n > 1 else ''}; needs "
                     f"{MIN_PAIRS_FOR_INTERVAL})")
    if n > 1:
        row["seed_sd"] = float(d.std(ddof=1))
        if row["seed_sd"] > abs(mean) or (d.min() < 0 < d.max()):
            notes.append(f"seeds disagree more than the effect (sd {row['seed_sd']:.3g} vs mean {mean:+.3g})")
    row["verdict"] = verdict(n, row["low"], row["high"], metric)
    row["note"] = "; ".join(notes)
    return row


def verdict(n: int, low: float, high: float, metric: str) -> str:
    """Arm minus reference from ``n`` pairs and its interval: better or worse only when the interval excludes 0."""
    if n < MIN_PAIRS_FOR_INTERVAL:
        return f"undetermined ({n} pair{'s' if n > 1 else ''})"
    if high < 0 or low > 0:
        return "arm better" if (high < 0) == lower_is_better(metric) else "arm worse"
    return "no clear difference"


def arm_differences(df: pd.DataFrame, reference: str, metric: str = "val_loss", *, n_boot: int = 2000,
                    level: float = DEFAULT_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Each arm (twins included, under :func:`arm_labels`) minus arm ``reference``, paired by budget and seed.

    The same columns, intervals, verdicts and notes as :func:`paired_differences`,
    with ``twin_mean`` the reference arm's mean (``rel_diff`` is relative to it).
    Raises ValueError naming the arms present if ``reference`` is not one.
    """
    ok = _ok(df, metric)
    data = df[ok].assign(arm=arm_labels(df[ok]))
    if reference not in set(data["arm"]):
        raise ValueError(f"arm_differences: no finished runs of arm {reference!r}; arms: {sorted(set(data['arm']))}")
    ctx = context_columns(df)
    keys = ["sweep", "budget_kind", "budget", *ctx]
    base = data[data["arm"] == reference][keys + ["seed", metric, "params"]]
    rows = []
    rng = np.random.default_rng(seed)
    for arm in sorted(set(data["arm"]) - {reference}):
        mine = data[data["arm"] == arm][keys + ["seed", metric, "params"]]
        p = mine.merge(base, on=keys + ["seed"], suffixes=("", "_ref"))
        p = p.rename(columns={metric: "arm_value", f"{metric}_ref": "twin_value", "params": "arm_params",
                              "params_ref": "twin_params"})
        for key, g in p.groupby(keys, dropna=False, sort=True):
            d = (g["arm_value"] - g["twin_value"]).groupby(g["seed"]).mean().to_numpy()
            rows.append(_diff_row({"arm": arm, "reference": reference, **dict(zip(keys, key))}, d, g, 0, metric,
                                  n_boot, level, rng))
    cols = ["sweep", "arm", "reference", "budget_kind", "budget", *ctx, "n_pairs", "dropped", "diff", "low", "high",
            "interval", "rel_diff", "arm_mean", "twin_mean", "seed_sd", "size_gap", "verdict", "note"]
    return pd.DataFrame(rows, columns=cols)


@dataclass(frozen=True, eq=False)
class MultiplierResult:
    """Per (arm, budget): effective size multiplier with interval; ``fits`` per sweep and budget kind."""

    table: pd.DataFrame
    fits: dict  # (sweep, budget_kind) -> PowerLawFit, or the reason it could not be fitted (str)


def effective_multiplier(df: pd.DataFrame, metric: str = "val_loss", *, n_boot: int = 1000,
                         level: float = DEFAULT_LEVEL, seed: int = 0) -> MultiplierResult:
    """How many uniform parameters (FLOPs for FLOP budgets) would reach each arm's mean loss.

    The uniform runs of each sweep, budget kind and context are fitted with
    L = E + A x^-alpha; an arm reaching loss L has effective size
    x_eff = (A / (L - E))^(1/alpha) and multiplier x_eff / x_arm.
    """
    ok = _ok(df, metric)
    keys = ["sweep", "budget_kind", *context_columns(df)]
    rows, fits = [], {}
    for key, g in df[ok].groupby(keys, dropna=False, sort=True):
        kind = key[1]
        size = SIZE_OF_KIND.get(kind, "params")
        uni = g[g["is_uniform"]]
        frontier = is_size_grid(uni)
        if frontier:
            # An isoFLOP grid: the uniform curve is the best size at each budget (and seed).
            uni = uni.loc[uni.groupby(["budget", "seed"], dropna=False)[metric].idxmin()]
        try:
            fit = fit_power_law(uni[size], uni[metric], variable=size, n_boot=n_boot, level=level, seed=seed)
        except InsufficientDataError as e:
            fits[key] = str(e) + (" (uniform frontier: best size per budget and seed)" if frontier else "")
            continue
        fits[key] = fit
        rng = np.random.default_rng(seed + 1)
        for (arm, budget), a in g[~g["is_uniform"]].groupby(["arm", "budget"], sort=True):
            row = _multiplier_row(fit, size, arm, budget, a, metric, level, rng)
            rows.append({**dict(zip(keys, key)), **row})
    cols = keys + ["size", "arm", "budget", "n_seeds", "arm_size", "arm_mean", "effective_size", "multiplier",
                   "low", "high", "fit_flagged", "note"]
    return MultiplierResult(table=pd.DataFrame(rows, columns=cols), fits=fits)


def _multiplier_row(fit: PowerLawFit, size, arm, budget, a: pd.DataFrame, metric, level, rng) -> dict:
    values = a[metric].to_numpy(float)
    x_arm = float(a[size].mean())
    mean = float(values.mean())
    x_eff = float(fit.inverse(mean))
    low = high = math.nan
    notes = []
    if fit.samples is not None and len(values) > 0:
        boot_loss = values[rng.integers(0, len(values), size=(len(fit.samples), len(values)))].mean(axis=1)
        s = fit.samples
        fitted = np.isfinite(s).all(axis=1)  # failed replicates are counted by the fit's own flags
        with np.errstate(all="ignore"):
            gap = boot_loss - s[:, 0]
            draws = np.where(gap > 0, (s[:, 1] / gap) ** (1.0 / s[:, 2]), np.nan) / x_arm
        low, high = percentile_interval(draws, level)
        below = float(np.mean(gap[fitted] <= 0)) if fitted.any() else 0.0
        if below > 0.05:
            notes.append(f"{below:.0%} of replicates put the arm at or below the fit's E (no finite multiplier)")
    if not math.isfinite(x_eff):
        notes.append(f"arm loss {mean:.4g} is at or below the uniform fit's E={fit.E:.4g}: no finite multiplier")
    elif not fit.x_range[0] <= x_eff <= fit.x_range[1]:
        notes.append(f"extrapolated beyond the uniform runs ({fit.x_range[0]:.3g}-{fit.x_range[1]:.3g})")
    if len(values) == 1:
        notes.append("single seed")
    if fit.flags:
        notes.append(f"uniform fit flagged ({len(fit.flags)} flag(s), listed with the fit)")
    return {"size": size, "arm": arm, "budget": budget, "n_seeds": len(values),
            "arm_size": x_arm, "arm_mean": mean, "effective_size": x_eff, "multiplier": x_eff / x_arm,
            "low": low, "high": high, "fit_flagged": bool(fit.flags), "note": "; ".join(notes)}


def rank_arms(df: pd.DataFrame, metric: str = "val_loss", *, n_boot: int = 2000, level: float = DEFAULT_LEVEL,
              seed: int = 0) -> pd.DataFrame:
    """Arms ranked (1 = best) by mean metric over seeds at each budget, with bootstrap rank intervals.

    Uniform twins take part under :func:`arm_labels`. Each replicate
    resamples every arm's seeds independently and re-ranks; ``p_best`` is
    the share of replicates in which the arm comes first.
    """
    ok = _ok(df, metric)
    data = df[ok].assign(arm=arm_labels(df[ok]))
    keys = GROUP + context_columns(df)
    rng = np.random.default_rng(seed)
    sign = 1.0 if lower_is_better(metric) else -1.0
    tail = 50.0 * (1.0 - level)
    out = []
    for key, g in data.groupby(keys, dropna=False, sort=True):
        arms = sorted(g["arm"].unique())
        values = [g.loc[g["arm"] == arm, metric].to_numpy(float) for arm in arms]
        means = np.array([v.mean() for v in values])
        boot = np.stack([v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1) for v in values], axis=1)
        ranks = (sign * boot).argsort(axis=1).argsort(axis=1) + 1
        point = (sign * means).argsort().argsort() + 1
        few = min(len(v) for v in values) < MIN_PAIRS_FOR_BOOTSTRAP
        for i, arm in enumerate(arms):
            n = len(values[i])
            # The same rule as for paired differences: a bootstrap of 2 seeds only spans their min and max.
            lo, hi, _ = ((*percentile_interval(boot[:, i], level), "") if n >= MIN_PAIRS_FOR_BOOTSTRAP
                         else mean_interval(values[i], n_boot, level, rng))
            rlo, rhi = np.percentile(ranks[:, i], [tail, 100.0 - tail])
            notes = ["single seed: no interval" if n == 1 else
                     f"not enough seeds for an interval ({n})" if n < MIN_PAIRS_FOR_INTERVAL else ""]
            if few and len(arms) > 1:
                notes.append(f"rank interval and p_best resample under {MIN_PAIRS_FOR_BOOTSTRAP} seeds per arm: rough")
            out.append({**dict(zip(keys, key)), "arm": arm, "n_seeds": n, "mean": means[i],
                        "low": lo, "high": hi, "rank": int(point[i]), "rank_low": int(math.floor(rlo)),
                        "rank_high": int(math.ceil(rhi)), "p_best": float(np.mean(ranks[:, i] == 1)),
                        "note": "; ".join(x for x in notes if x)})
    cols = keys + ["arm", "n_seeds", "mean", "low", "high", "rank", "rank_low", "rank_high", "p_best", "note"]
    return pd.DataFrame(out, columns=cols).sort_values(keys + ["rank"], ignore_index=True)
