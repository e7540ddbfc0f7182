"""Tiny training configs shared by the training tests."""

from pathlib import Path

from elmjax import config_io
from elmjax.config import Config

TINY = {
    "model": {"num_layers": 2, "model_dim": 64, "head_dim": 16, "num_gqa_groups": 2, "ffn_dim_divisor": 16},
    "data": {"seq_len": 32, "batch_size": 8, "val_sequences": 16},
    "optimizer": {"warmup_steps": 5},
    "train": {"steps": 20, "log_every": 2, "eval_every": 10, "progress": False},
    "checkpoint": {"every": 5, "keep": 3},
    "mesh": {"data": 1},
}


def tiny_config(run_dir: Path, *overrides: str, cache: Path | None = None) -> Config:
    data = dict(TINY, run_dir=str(run_dir), compilation_cache=str(cache) if cache else "")
    return config_io.load(Config, None, overrides, data=data)


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(config_io.dump_yaml(cfg))
    return path
