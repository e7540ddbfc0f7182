"""Small grids shared by the sweep tests (pure Python: no JAX here)."""

from pathlib import Path

import yaml

TINY_BASE = {
    "model": {"num_layers": 2, "head_dim": 16, "num_gqa_groups": 2, "ffn_dim_divisor": 16},
    "data": {"source": "stdlib", "seq_len": 32, "batch_size": 4, "val_sequences": 8, "max_documents": 200},
    "optimizer": {"warmup_steps": 2},
    "train": {"steps": 20, "log_every": 2, "eval_every": 10},
    "checkpoint": {"every": 4, "keep": 2},
    "mesh": {"data": 1},
}


def write_grid(path: Path, axes: dict, base: dict | None = None, **top) -> Path:
    """Write a grid file (base defaults to TINY_BASE) and return its path."""
    grid = {"name": top.pop("name", path.stem), "base": base if base is not None else TINY_BASE, "axes": axes, **top}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
