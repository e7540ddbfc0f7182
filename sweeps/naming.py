"""Run names: '<readable label>-<8 hex hash of the resolved config>'.

The hash covers everything that changes what a run computes. It leaves out
where the run lives (run_dir, name) and the settings the trainer lets a run
change when it resumes (``elmjax.config.NOT_IDENTITY``: mesh,
compilation cache, checkpointing, progress and logging cadence), so moving a
sweep from one GPU to a pod slice, or checkpointing more often, keeps every
run's name and its checkpoints. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import re

from elmjax.config import Config, identity

MAX_LABEL = 80


def compact_number(x: float) -> str:
    """1.5e6 -> '1.5M', 20 -> '20', 3e-3 -> '0.003': short and unambiguous enough for a label."""
    for suffix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def hashed_view(cfg: Config) -> dict:
    """The part of a config that identifies a run."""
    return identity(cfg)


def config_hash(cfg: Config) -> str:
    text = json.dumps(hashed_view(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def make_label(parts) -> str:
    """Join label parts with '-', keep filesystem-safe characters, cap the length."""
    text = "-".join(str(p) for p in parts if str(p))
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text)
    return text[:MAX_LABEL].strip("-_") or "run"


def run_name(label: str, cfg: Config) -> str:
    return f"{label}-{config_hash(cfg)}"
