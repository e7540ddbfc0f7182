"""results.parquet / results.csv: one row per run, rebuilt from the run directories.

The table is never appended to: every rewrite reads ``plan.json`` (the
planned columns) and every run directory's ``status.json`` / ``final.json``,
so drivers on different machines (shards) can all rewrite it and the last
writer always holds everyone's rows. A short sweep-level lock serialises the
read-and-replace so an older view never lands on top of a newer one; files
are replaced atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from elmjax import run_dir as rd
from elmjax.config_io import ConfigError, atomic_write
from elmjax.run_times import TIME_KEYS
from sweeps.evals import eval_columns
from sweeps.locks import FileLock, holder
from sweeps.plan import read_plan
from sweeps.rows import HELD_OUT_COLUMNS, PLAN_COLUMNS, RUN_COLUMNS

PARQUET, CSV = "results.parquet", "results.csv"
_LOCK = ".results.lock"
_INT_COLUMNS = ("final_step", "tokens_seen", "seed", "num_layers", "model_dim", "head_dim", "num_gqa_groups",
                "params", "non_embedding_params", "flops_per_token", "tokens", "seq_len", "batch_size")
# From final.json; the time parts are missing (null) for runs finished by versions before they were recorded.
_FLOAT_COLUMNS = ("val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss", "wall_time_s") + TIME_KEYS


def read_run_status(run_dir: str | Path) -> dict:
    """The run's status.json; a ConfigError naming the file if it is not valid JSON.

    Status files are replaced atomically, so a torn one was damaged outside the
    sweep (a copy taken mid-write, a full disk); the driver stops with this
    one-line error instead of guessing the run's state."""
    try:
        return rd.read_status(run_dir)
    except ValueError as e:
        raise ConfigError(f"{e}; delete it and rerun: the run then resumes from its latest checkpoint") from None


def run_columns(run_dir: Path) -> dict:
    """State and final metrics of one run directory (pending if it has not started)."""
    status = read_run_status(run_dir)
    state, error = status.get("state", "pending"), status.get("error")
    if state == "running" and holder(run_dir) is None:
        # Killed without a chance to say so: it resumes from its checkpoint when the sweep is rerun.
        state, error = "pending", "interrupted (no live driver holds its lock); rerun the sweep to resume"
    final = rd.read_final(run_dir) if state == "done" else None
    final = final or {}
    out = {"status": state, "error": error,
           **{k: final.get(k) for k in _FLOAT_COLUMNS},
           **{k: final.get(k) for k in HELD_OUT_COLUMNS},
           "final_step": final.get("step"), "tokens_seen": final.get("tokens")}
    if state == "done":
        out.update(eval_columns(run_dir))  # eval.<task>.acc / acc_norm of the grid's eval tasks
    return out


def build_rows(sweep_dir: str | Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    rows = []
    for planned in read_plan(sweep_dir):
        row = dict(planned)
        row.update(run_columns(sweep_dir / planned["run_dir"]))
        rows.append(row)
    return rows


def build_table(sweep_dir: str | Path):
    """The results DataFrame (contract column order: planned, run state, axis.*, eval.*)."""
    import pandas as pd

    rows = build_rows(sweep_dir)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(PLAN_COLUMNS) + list(RUN_COLUMNS))
    head = [c for c in PLAN_COLUMNS[:2] + RUN_COLUMNS[:2] + PLAN_COLUMNS[2:] + RUN_COLUMNS[2:] if c in df]
    rest = sorted((c for c in df.columns if c not in head), key=lambda c: (not c.startswith("axis."), c))
    df = df[head + rest]
    for col in _INT_COLUMNS:
        if col in df:
            df[col] = df[col].astype("Int64")
    for col in (*_FLOAT_COLUMNS, "test_loss", "test_bpb"):
        df[col] = df[col].astype("float64")
    return df


def write_results(sweep_dir: str | Path, wait_s: float = 60.0) -> Path:
    """Rebuild and atomically replace results.parquet and results.csv; returns the parquet path."""
    sweep_dir = Path(sweep_dir)
    deadline = time.time() + wait_s
    lock = None
    while lock is None:
        lock = FileLock.acquire(sweep_dir / _LOCK, stale_after_s=wait_s, heartbeat_s=0)
        if lock is None:
            if time.time() > deadline:
                print(f"warning: {sweep_dir / _LOCK} is held; writing results without it", file=sys.stderr)
                break
            time.sleep(0.05)
    try:
        df = build_table(sweep_dir)
        atomic_write(sweep_dir / PARQUET, lambda p: df.to_parquet(p, index=False))
        atomic_write(sweep_dir / CSV, lambda p: df.to_csv(p, index=False))
    finally:
        if lock is not None:
            lock.release()
    return sweep_dir / PARQUET


def read_results(sweep_dir: str | Path):
    """results.parquet as a DataFrame, safe while drivers rewrite it.

    The file is replaced atomically, but pyarrow opens a path more than once
    (footer, then pages), so a rewrite in between would mix two files; one
    open file handle always sees one complete version."""
    import pandas as pd

    with open(Path(sweep_dir) / PARQUET, "rb") as f:
        return pd.read_parquet(f)


