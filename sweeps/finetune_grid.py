"""python -m sweeps.finetune_grid GRID.yaml [--out DIR]: a fine-tuning sweep over one base model.

A fine-tuning grid is a YAML mapping::

    name: peft_cpu
    pretrain: {...}      # an elmjax training Config: trained first into OUT/base
                         # (or 'init_from: PATH' instead, for an existing base)
    base: {...}          # an elmjax FinetuneConfig without init_from / run_dir
    axes:                # dotted FinetuneConfig paths, combined as a product
      peft.method: [lora, dora]
      peft.rank: [2, 8]
      peft.layers: [all, [0, 1], [2, 3]]

Every cell fine-tunes the same base into ``OUT/runs/<cell name>``; runs that
are done are skipped, unfinished ones resume (each is an ordinary
``elmjax.finetune`` run directory). ``OUT/results.csv`` gets one row per cell:
its axis values, state, adapter parameter count, final val_loss, wall time
and every task's ``before.*`` / ``after.*`` accuracy. Kept apart from
``sweeps.run`` (whose grids are pretraining Configs with budget matching).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

from elmjax import config_io, run_dir as rd
from elmjax.config import Config
from elmjax.config_io import ConfigError
from elmjax.cpu_heap import keep_scratch_in_heap
from elmjax.errors import UserError, one_line
from elmjax.finetune_config import FinetuneConfig

TOP_KEYS = ("name", "description", "pretrain", "init_from", "base", "axes")


def load_grid(path: str | Path) -> dict:
    """The grid's mapping, with every cell's FinetuneConfig checked up front."""
    grid = config_io.load_yaml(path)
    unknown = sorted(set(grid) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; valid: {list(TOP_KEYS)}")
    if ("pretrain" in grid) == ("init_from" in grid):
        raise ConfigError(f"{path}: give exactly one of 'pretrain' (a training config) or 'init_from' (a base model)")
    if not isinstance(grid.get("axes"), dict) or not grid["axes"]:
        raise ConfigError(f"{path}: axes: a mapping of dotted FinetuneConfig paths to value lists")
    for key, values in grid["axes"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key}: expected a non-empty list of values")
    if "pretrain" in grid:
        config_io.load(Config, None, (), data=grid["pretrain"])
    cells(grid, path, Path("<out>"), grid.get("init_from") or "<pretrained>")  # every cell's config is valid
    return grid


def cells(grid: dict, path, out: Path, init_from: str) -> list[tuple[str, dict, FinetuneConfig]]:
    """(name, axis values, config) per cell of the product."""
    keys = list(grid["axes"])
    out_cells = []
    for values in itertools.product(*(grid["axes"][k] for k in keys)):
        point = dict(zip(keys, values))
        name = "_".join(f"{k.split('.')[-1]}={_label(v)}" for k, v in point.items())
        data = copy.deepcopy(grid.get("base") or {})
        data.update(init_from=init_from, run_dir=str(out / "runs" / name))
        for k, v in point.items():
            data = config_io.set_dotted(data, FinetuneConfig, k, v, source=f"{path}: axes")
        out_cells.append((name, point, config_io.load(FinetuneConfig, None, (), data=data)))
    return out_cells


def _label(v) -> str:
    return "-".join(map(str, v)) if isinstance(v, list) else str(v)


def result_row(name: str, point: dict, run_dir: Path) -> dict:
    final = rd.read_final(run_dir) or {}
    row = {"run": name, **{k: _label(v) for k, v in point.items()}, "state": rd.read_status(run_dir)["state"],
           "adapter_params": final.get("adapter_params"), "val_loss": final.get("val_loss"),
           "wall_time_s": final.get("wall_time_s")}
    for when in ("before", "after"):
        for col, v in (final.get(f"eval_{when}") or {}).items():
            row[f"{when}.{col.removeprefix('eval.')}"] = v
    return row


def write_results(out: Path, rows: list[dict]) -> Path:
    import pandas as pd

    path = out / "results.csv"
    config_io.atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))
    return path


def run_grid(path: str | Path, out: str | Path) -> Path:
    from elmjax.finetune import run as finetune
    from elmjax.train import run as train

    grid = load_grid(path)
    out = Path(out)
    init_from = grid.get("init_from")
    if init_from is None:
        base = config_io.load(Config, None, (), data={**grid["pretrain"], "run_dir": str(out / "base")})
        print(f"pretraining the base model into {base.run_dir}", flush=True)
        train(base)
        init_from = base.run_dir
    todo = cells(grid, path, out, init_from)
    rows = []
    for name, point, cfg in todo:
        t0 = time.time()
        result = finetune(cfg)
        print(f"{name}: {result.state} ({time.time() - t0:.0f} s)", flush=True)
        rows.append(result_row(name, point, Path(cfg.run_dir)))
        write_results(out, rows)
    return out / "results.csv"


def main(argv=None) -> int:
    keep_scratch_in_heap()  # it trains in this process: before JAX starts its CPU client; see elmjax.cpu_heap
    p = argparse.ArgumentParser(prog="python -m sweeps.finetune_grid", description=__doc__.splitlines()[0])
    p.add_argument("grid")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/<grid name>)")
    args = p.parse_args(argv)
    try:
        name = config_io.load_yaml(args.grid).get("name") or Path(args.grid).stem
        t0 = time.time()
        results = run_grid(args.grid, args.out or f"runs/{name}")
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"results: {results} ({time.time() - t0:.0f} s)")
    print(Path(results).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
