"""The run directory: the contract between training, sweeps and analysis.

A run directory holds::

    config.yaml      the resolved Config (every default filled in)
    status.json      {"state", "step", "total_steps", "error", "updated"}
                     state in pending | running | done | failed | diverged
    metrics.jsonl    one JSON object per line:
                     {"kind": "train", "step", "tokens", "loss", "lr", "grad_norm",
                      "tokens_per_s", "mfu", "batch_fingerprint", "time"}
                     {"kind": "eval", "step", "tokens", "val_loss", "val_ppl",
                      "val_bpb", "val_acc", "time"}
    final.json       written once at the end of a finished run:
                     {"step", "tokens", "val_loss", "val_ppl", "val_bpb", "val_acc",
                      "train_loss", "wall_time_s", "compile_s", "train_s", "eval_s",
                      "checkpoint_s", "other_s", "params", "non_embedding_params",
                      "flops_per_token"}
                     wall_time_s is the time of all attempts together (a resumed
                     run adds the time its checkpoint recorded); the five *_s
                     parts sum to it: compiling (and initialising the state),
                     training steps, evaluation, checkpoint saves/restores, and
                     the rest (start-up, data, logs); see ``elmjax.run_times``
    checkpoints/     orbax checkpoints (train state + data iterator state)
    tb/              TensorBoard event files

``status.json`` and ``final.json`` are replaced atomically. ``metrics.jsonl``
is append-only; on resume, rows past the restored step are dropped so a
resumed run's log equals an uninterrupted one. Pure Python: no JAX.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Iterable

from elmjax.config_io import atomic_write_text

STATES = ("pending", "running", "done", "failed", "diverged")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_status(run_dir: str | Path, state: str, *, step: int | None = None, total_steps: int | None = None,
                 error: str | None = None) -> None:
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    record = {"state": state, "step": step, "total_steps": total_steps, "error": error, "updated": _now()}
    atomic_write_text(Path(run_dir) / "status.json", json.dumps(record, indent=1) + "\n")


def read_status(run_dir: str | Path) -> dict:
    """The run's status; a directory without status.json is 'pending'."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return {"state": "pending", "step": None, "total_steps": None, "error": None, "updated": None}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_final(run_dir: str | Path, record: dict) -> None:
    atomic_write_text(Path(run_dir) / "final.json", json.dumps(_clean(record), indent=1) + "\n")


def read_final(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "final.json"
    return json.loads(path.read_text()) if path.exists() else None


class MetricsLog:
    """Append-only JSONL metrics, flushed per row so a killed run keeps its log."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Drop rows a killed run logged after its last checkpoint, so the
        # resumed log is identical to an uninterrupted run's.
        rows = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(_clean(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All complete rows of metrics.jsonl (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def iter_run_dirs(root: str | Path) -> Iterable[Path]:
    """Every directory under ``root`` holding a config.yaml (a run directory)."""
    return sorted(p.parent for p in Path(root).rglob("config.yaml"))
