"""Sweep directories -> tidy DataFrames: one row per run, and a long table of training curves.

The source of truth is the sweep's ``results.parquet`` (or ``results.csv``),
whose columns are the contract in ``notes/contract.md`` / ``sweeps.rows``.
A directory without a results file (a sweep in progress on another machine,
or a folder of hand-made runs) is read from its run directories instead;
those rows lack the sweep's planning columns (arm, twin, budget), which are
then derived from the config where possible and left empty otherwise.

Reads files only: never imports JAX or the training code.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from elmjax import run_dir as rd

NUMERIC_COLUMNS = (
    "budget", "budget_rel_error", "seed", "num_layers", "model_dim", "head_dim", "num_gqa_groups",
    "alpha_min", "alpha_max", "beta_min", "beta_max", "params", "non_embedding_params", "flops_per_token",
    "tokens", "train_flops", "lr", "seq_len", "batch_size", "val_loss", "val_ppl", "val_bpb", "val_acc",
    "train_loss", "final_step", "tokens_seen", "wall_time_s",
)
TEXT_COLUMNS = ("run", "run_dir", "status", "error", "arm", "twin", "budget_kind", "qkv_schedule", "ffn_schedule",
                "q_heads", "kv_heads", "ffn_dims")
CONTRACT_COLUMNS = TEXT_COLUMNS + ("is_uniform",) + NUMERIC_COLUMNS
# Columns newer sweeps write (test split, tuning); added empty for older ones without being "missing".
OPTIONAL_NUMERIC = ("test_loss", "test_bpb", "tune_value")
OPTIONAL_TEXT = ("val_fingerprint", "test_fingerprint", "role", "tune_axis", "tune_cell")
STATUSES = ("pending", "running", "done", "failed", "diverged")
RESULTS = ("results.parquet", "results.csv")
# metrics.jsonl keys that are not metrics.
_CURVE_KEYS = ("kind", "step", "tokens", "time", "batch_fingerprint")


class SweepError(ValueError):
    """A sweep directory or results file cannot be read; the message names the file and the reason."""


def load_sweep(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run of one or several sweep directories.

    Adds ``sweep`` (the directory name), ``sweep_dir`` (its absolute path)
    and ``finished`` (status done with a finite val_loss). Columns of the
    contract the file lacks are added empty and listed in
    ``df.attrs["missing_columns"]``.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise SweepError("load_sweep: no sweep directories given")
    frames = [_load_one(Path(p)) for p in paths]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df.attrs = {"missing_columns": sorted(set().union(*(f.attrs.get("missing_columns", ()) for f in frames))),
                "sources": [f.attrs["source"] for f in frames]}
    return df


def _load_one(path: Path) -> pd.DataFrame:
    if not path.is_dir():
        raise SweepError(f"{path}: no such sweep directory")
    df, source = _read_results(path)
    if df is None:
        rows = [_row_from_run_dir(run, path) for run in _run_dirs(path)]
        if not rows:
            raise SweepError(f"{path}: no results.parquet, results.csv or run directories (config.yaml) found")
        df, source = pd.DataFrame(rows), f"{path} (run directories)"
    missing = [c for c in ("run", "status") if c not in df.columns]
    if missing:
        raise SweepError(f"{source}: required column(s) {', '.join(missing)} missing; not a sweep results table")
    df = _normalize(df)
    df.attrs = {"source": str(source), "missing_columns": [c for c in CONTRACT_COLUMNS if df[c].isna().all()]}
    df.insert(0, "sweep", path.resolve().name)
    df.insert(1, "sweep_dir", str(path.resolve()))
    return df


def _read_results(path: Path):
    """The results table, parquet first; a corrupt file falls through to the next with a warning."""
    for name in RESULTS:
        file = path / name
        if not file.exists():
            continue
        try:
            df = pd.read_parquet(file) if name.endswith(".parquet") else pd.read_csv(file)
        except Exception as e:  # pyarrow and the csv parser raise many types; all mean "unreadable"
            warnings.warn(f"{file}: unreadable ({type(e).__name__}: {e}); trying the next source", stacklevel=3)
            continue
        return df, file
    return None, None


def _run_dirs(path: Path) -> list[Path]:
    if (path / "config.yaml").exists():
        return [path]
    return list(rd.iter_run_dirs(path / "runs" if (path / "runs").is_dir() else path))


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in CONTRACT_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    for col in OPTIONAL_NUMERIC + OPTIONAL_TEXT:
        if col not in df.columns:
            df[col] = np.nan
    for col in NUMERIC_COLUMNS + OPTIONAL_NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in TEXT_COLUMNS + OPTIONAL_TEXT:
        df[col] = df[col].astype("object").where(df[col].notna(), None)
    df["status"] = [str(s).strip().lower() if s is not None else "pending" for s in df["status"]]
    df["is_uniform"] = _is_uniform(df)
    df["finished"] = (df["status"] == "done") & np.isfinite(df["val_loss"])
    return df


def _is_uniform(df: pd.DataFrame) -> pd.Series:
    """The is_uniform column as bool; where missing, uniform means scalar alpha and beta."""
    derived = (df["alpha_min"] == df["alpha_max"]) & (df["beta_min"] == df["beta_max"])
    given = df["is_uniform"].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                 else str(v).strip().lower() in ("true", "1", "1.0"))
    return given.where(given.notna(), derived).astype(bool)


def _row_from_run_dir(run: Path, sweep: Path) -> dict:
    """What a run directory alone tells: config, status and final metrics (no arm/budget/twin)."""
    from elmjax.config_io import load_yaml

    status = _read_json(rd.read_status, run, "status.json")
    final = _read_json(rd.read_final, run, "final.json") or {}
    row = {"run": run.name, "run_dir": str(run.relative_to(sweep)) if run != sweep else ".",
           "status": status.get("state", "pending"), "error": status.get("error"),
           **{k: final.get(k) for k in ("val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss", "wall_time_s",
                                        "params", "non_embedding_params", "flops_per_token", "test_loss",
                                        "test_bpb", "val_fingerprint", "test_fingerprint")},
           "final_step": final.get("step"), "tokens_seen": final.get("tokens")}
    try:
        cfg = load_yaml(run / "config.yaml")
    except Exception as e:  # a broken config leaves the row with what status/final say
        warnings.warn(f"{run / 'config.yaml'}: unreadable ({e}); the row lacks config columns", stacklevel=4)
        return row
    row.update(_config_columns(cfg))
    return row


def _read_json(reader, run: Path, name: str):
    """``reader(run)``, or a SweepError naming the file when it is torn (e.g. copied mid-write) or not an object."""
    try:
        value = reader(run)
    except ValueError as e:
        raise SweepError(str(e) if name in str(e) else f"{run / name}: not valid JSON ({e})") from None
    if value is not None and not isinstance(value, dict):
        raise SweepError(f"{run / name}: expected a JSON object, got {type(value).__name__}")
    return value


def _config_columns(cfg: dict) -> dict:
    model, data, opt, train = (cfg.get(k) or {} for k in ("model", "data", "optimizer", "train"))
    out = {k: model.get(k) for k in ("num_layers", "model_dim", "head_dim", "num_gqa_groups",
                                     "qkv_schedule", "ffn_schedule")}
    out.update(lr=opt.get("lr"), seq_len=data.get("seq_len"), batch_size=data.get("batch_size"),
               seed=train.get("seed"))
    try:
        from elmjax.config_io import from_dict
        from elmjax.layout import layer_layout, layer_multipliers, param_counts
        from elmjax.model_config import ModelConfig

        m = from_dict(ModelConfig, model, source="config.yaml: model")
        layout = layer_layout(m)
        alphas = layer_multipliers(m.qkv_multipliers, m.qkv_schedule, m.num_layers)
        betas = layer_multipliers(m.ffn_multipliers, m.ffn_schedule, m.num_layers)
        counts = param_counts(m)
    except Exception:  # an older or foreign config: keep the plain columns
        return out
    out.update(alpha_min=min(alphas), alpha_max=max(alphas), beta_min=min(betas), beta_max=max(betas),
               q_heads=json.dumps([x.q_heads for x in layout]), kv_heads=json.dumps([x.kv_heads for x in layout]),
               ffn_dims=json.dumps([x.ffn_dim for x in layout]), params=counts.total,
               non_embedding_params=counts.non_embedding)
    uniform = out["alpha_min"] == out["alpha_max"] and out["beta_min"] == out["beta_max"]
    out["arm"] = "uniform" if uniform else (f"a{out['alpha_min']:g}-{out['alpha_max']:g}_"
                                            f"b{out['beta_min']:g}-{out['beta_max']:g}_{m.qkv_schedule}")
    return out


def finished(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Runs that completed with a finite ``metric``."""
    if metric not in df.columns:
        raise KeyError(f"no column {metric!r} in the results; columns: {', '.join(df.columns)}")
    values = pd.to_numeric(df[metric], errors="coerce")
    return df[(df["status"] == "done") & np.isfinite(values)].copy()


def load_curves(paths: str | Path | Iterable[str | Path], runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Training curves from every run's metrics.jsonl, long format.

    Columns: sweep, run, arm, budget, seed, is_uniform, status, kind (train |
    eval), step, tokens, metric, value. Runs without a log contribute nothing.
    """
    runs = load_sweep(paths) if runs is None else runs
    frames = []
    for r in runs.itertuples(index=False):
        rows = rd.read_metrics(Path(r.sweep_dir) / str(r.run_dir)) if r.run_dir else []
        if not rows:
            continue
        wide = pd.DataFrame(rows)
        value_cols = [c for c in wide.columns if c not in _CURVE_KEYS]
        for key in ("kind", "step", "tokens"):
            if key not in wide.columns:
                wide[key] = np.nan
        long = wide.melt(id_vars=["kind", "step", "tokens"], value_vars=value_cols, var_name="metric")
        long["value"] = pd.to_numeric(long["value"], errors="coerce")
        long = long[np.isfinite(long["value"])]
        for col in ("sweep", "run", "arm", "budget", "seed", "is_uniform", "status"):
            long.insert(0, col, getattr(r, col))
        frames.append(long)
    columns = ["sweep", "run", "arm", "budget", "seed", "is_uniform", "status", "kind", "step", "tokens",
               "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]
