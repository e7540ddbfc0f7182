"""Tuning inside the grid: per cell, train the candidates on the tuning seeds, pick on validation, then the main runs.

A *tuning cell* is one model of the plan with its seeds left out: each
layer-wise arm at each budget and each other axis value, and each uniform
twin on its own (so every arm, twin included, gets its own tuned value).
For each cell (``grid.tune``, see ``sweeps.tune_grid``):

1. tuning runs: the cell's config at every candidate value of ``tune.axis``
   on every tuning seed (``role=tune`` in the results table);
2. once all of them are finished, the candidate with the lowest mean
   ``select_on`` (validation) wins; a diverged or failed candidate counts as
   worse than any finite one;
3. a winner at an edge of the candidates adds one geometric step beyond
   that edge (the ratio of the two outermost values) and goes back to 1, at
   most ``tune.extend`` times per cell; the report says when it did;
4. the cell's main runs (the grid's seeds, ``role=main``) are planned at the
   chosen value, an arm's as soon as its own and its twin's cells are chosen.

:func:`plan_stage` computes all of this from the run directories alone
(no JAX), so every driver and shard derives the same plan, and tuning runs
are ordinary runs shared through the run locks. The chosen values are
written to ``tune.json`` in the sweep directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from elmjax import config_io, run_dir as rd
from elmjax.config import Config, identity
from sweeps.grid import Grid
from sweeps.naming import compact_number, make_label, run_name
from sweeps.plan import PlannedRun
from sweeps.results import read_run_status
from sweeps.rows import model_columns
from sweeps.tune_grid import SEED_PATHS, TuneSpec

TUNE_FILE = "tune.json"
FINISHED = ("done", "diverged", "failed")


@dataclass
class Cell:
    """One tuning cell: its key, a representative planned run, the candidates so far and the outcome."""

    key: str
    base: PlannedRun  # the cell's first main run as build_plan made it (lowest position in the plan)
    values: list[float]
    status: str = "tuning"  # tuning | chosen | failed
    chosen: float | None = None
    extended: list[str] = field(default_factory=list)
    losses: dict = field(default_factory=dict)  # value -> list of per-seed metric (nan: not finished or not finite)
    note: str = ""


@dataclass
class Stage:
    """What can be planned now: every tuning run so far and the main runs of decided cells."""

    cells: dict[str, Cell]
    tune_runs: list[PlannedRun]
    main_runs: list[PlannedRun]
    waiting: int  # main runs whose cell (or whose twin's cell) is not decided yet
    dropped: list[str]  # main runs left out because their cell (or twin's) found no finite candidate

    @property
    def runs(self) -> list[PlannedRun]:
        return self.tune_runs + self.main_runs


def identity_without(cfg: Config, paths) -> dict:
    """A run's identity (:func:`elmjax.config.identity`) without the dotted ``paths`` (e.g. its seeds)."""
    d = identity(cfg)
    for path in paths:
        section, _, name = path.partition(".")
        d.get(section, {}).pop(name, None)
    return d


def cell_key(cfg: Config, spec: TuneSpec) -> str:
    """A run's config without its seeds and without the tuned setting: runs sharing it share one tuned value."""
    d = identity_without(cfg, (*SEED_PATHS, spec.axis))
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


def with_value(cfg: Config, path: str, value, seed: int | None = None) -> Config:
    """``cfg`` with ``path`` set (and both seeds, when given)."""
    data = config_io.to_dict(cfg)
    data = config_io.set_dotted(data, Config, path, value)
    if seed is not None:
        for p in SEED_PATHS:
            data = config_io.set_dotted(data, Config, p, seed)
    return config_io.from_dict(Config, data, source=None, path="")


def plan_stage(grid: Grid, base_runs: list[PlannedRun], sweep_dir: Path | None) -> Stage:
    """Tuning runs, decisions and the main runs that can be planned, from the run directories in ``sweep_dir``.

    ``sweep_dir`` None (a dry run) reads nothing: every cell is still tuning.
    """
    spec = grid.tune
    cells: dict[str, Cell] = {}
    key_of: dict[str, str] = {}
    for run in base_runs:
        key = cell_key(run.config, spec)
        key_of[run.name] = key
        cells.setdefault(key, Cell(key, run, list(spec.values)))
    tune_runs: list[PlannedRun] = []
    by_value: dict[tuple[str, int, float], str] = {}
    for cell in cells.values():
        runs = _settle(cell, spec, sweep_dir)
        tune_runs += runs
        by_value.update({(cell.key, int(r.row["seed"]), float(r.row["tune_value"])): r.name for r in runs})
    # A tuning run's twin is its twin cell's tuning run at the same value and seed: the shared-value comparison.
    twin_key = {key_of[r.name]: key_of.get(r.row.get("twin")) for r in base_runs if r.row.get("twin")}
    tune_runs = [_with_twin(r, by_value, twin_key.get(r.row["tune_cell"])) for r in tune_runs]
    main, waiting, dropped = [], 0, []
    renamed: dict[str, str] = {}
    for run in base_runs:  # twins come after their arms in the plan, so name twins first
        cell = cells[key_of[run.name]]
        if cell.status == "chosen":
            renamed[run.name] = _main_name(run, spec, cell.chosen)
    for run in base_runs:
        cell = cells[key_of[run.name]]
        twin = run.row.get("twin")
        states = [cell.status] + ([cells[key_of[twin]].status] if twin in key_of else [])
        if "failed" in states:
            dropped.append(run.name)
        elif any(s != "chosen" for s in states):
            waiting += 1
        else:
            main.append(_main_run(run, spec, cell, renamed.get(twin) if twin else None))
    return Stage(cells, tune_runs, main, waiting, dropped)


def _settle(cell: Cell, spec: TuneSpec, sweep_dir: Path | None) -> list[PlannedRun]:
    """The cell's tuning runs so far; decides it (and extends its range) when they are all finished."""
    while True:
        runs = [_tune_run(cell, spec, v, s) for v in cell.values for s in spec.seeds]
        if sweep_dir is None:
            return runs
        results = {r.name: _result(Path(sweep_dir) / "runs" / r.name, spec.select_on) for r in runs}
        cell.losses = {v: [results[r.name][1] for r in runs if r.row["tune_value"] == v] for v in cell.values}
        if any(results[r.name][0] not in FINISHED for r in runs):
            cell.status = "tuning"
            return runs
        means = {v: _mean(x) for v, x in cell.losses.items()}
        finite = {v: m for v, m in means.items() if math.isfinite(m)}
        if not finite:
            cell.status, cell.note = "failed", "no candidate finished with a finite loss"
            return runs
        best = min(finite, key=finite.get)
        edge = best in (cell.values[0], cell.values[-1]) and len(cell.values) > 1
        if edge and len(cell.extended) < spec.extend:
            upward = best == cell.values[-1]
            new = spec.step_beyond(tuple(cell.values), upward)
            if new not in cell.values:
                cell.extended.append(f"{'up' if upward else 'down'} to {new:.4g}")
                cell.values = cell.values + [new] if upward else [new] + cell.values
                continue
        cell.status, cell.chosen = "chosen", best
        if edge:
            cell.note = f"best value still at the edge of the range after {len(cell.extended)} extension(s)"
        return runs


def _result(run_dir: Path, metric: str) -> tuple[str, float]:
    state = read_run_status(run_dir).get("state", "pending") if run_dir.exists() else "pending"
    if state != "done":
        return state, math.nan
    value = (rd.read_final(run_dir) or {}).get(metric)
    return state, float(value) if isinstance(value, (int, float)) else math.nan


def _mean(xs: list[float]) -> float:
    # A diverged or failed seed makes the candidate unusable: it must not win on the other seeds alone.
    return sum(xs) / len(xs) if xs and all(math.isfinite(x) for x in xs) else math.nan


def _label_without_seed(run: PlannedRun) -> str:
    label = run.name.rsplit("-", 1)[0]
    seed = run.row.get("axis.seed")
    return "-".join(p for p in label.split("-") if seed is None or p != f"s{seed}")


def _short(spec: TuneSpec) -> str:
    return {"optimizer.lr": "lr"}.get(spec.axis, spec.axis.rsplit(".", 1)[-1])


def _tune_run(cell: Cell, spec: TuneSpec, value: float, seed: int) -> PlannedRun:
    v = int(value) if spec.integer else value
    cfg = with_value(cell.base.config, spec.axis, v, seed)
    label = make_label(["tune", _label_without_seed(cell.base), f"ts{seed}", f"{_short(spec)}{compact_number(value)}"])
    name = run_name(label, cfg)
    row = _row(cell.base, cfg, name, "tune", spec, cell.key, value)
    row["seed"] = seed
    if "axis.seed" in row:
        row["axis.seed"] = seed
    row["twin"] = None
    return PlannedRun(name, cfg.replace(name=name), row, cell.base.is_twin)


def _with_twin(run: PlannedRun, by_value: dict, twin_key: str | None) -> PlannedRun:
    if twin_key is None:
        return run
    twin = by_value.get((twin_key, int(run.row["seed"]), float(run.row["tune_value"])))
    return dataclasses.replace(run, row={**run.row, "twin": twin})


def _main_name(run: PlannedRun, spec: TuneSpec, value: float) -> str:
    cfg = with_value(run.config, spec.axis, int(value) if spec.integer else value)
    return run_name(run.name.rsplit("-", 1)[0], cfg)


def _main_run(run: PlannedRun, spec: TuneSpec, cell: Cell, twin: str | None) -> PlannedRun:
    cfg = with_value(run.config, spec.axis, int(cell.chosen) if spec.integer else cell.chosen)
    name = _main_name(run, spec, cell.chosen)
    row = _row(run, cfg, name, "main", spec, cell.key, cell.chosen)
    row["twin"] = twin
    return PlannedRun(name, cfg.replace(name=name), row, run.is_twin)


def _row(run: PlannedRun, cfg: Config, name: str, role: str, spec: TuneSpec, key: str, value: float) -> dict:
    return {**run.row, **model_columns(cfg), "run": name, "run_dir": f"runs/{name}", "role": role,
            "tune_axis": spec.axis, "tune_value": float(value), "tune_cell": key}


# ---------------------------------------------------------------- tune.json and the dry-run view


def tune_record(grid: Grid, stage: Stage) -> dict:
    """What tune.json holds: per cell, the candidates' losses, the chosen value and any range extension."""
    spec = grid.tune
    cells = []
    for c in stage.cells.values():
        row = c.base.row
        cells.append({
            "cell": c.key, "arm": row["arm"], "is_uniform": bool(row["is_uniform"]), "budget": row["budget"],
            "context": {k: v for k, v in row.items() if k.startswith("axis.") and k not in ("axis.seed",)},
            "status": c.status, "chosen": c.chosen, "extended": c.extended, "note": c.note,
            "candidates": [{"value": v, "losses": [None if not math.isfinite(x) else x for x in c.losses.get(v, [])],
                            "mean": None if not math.isfinite(_mean(c.losses.get(v, []))) else _mean(c.losses[v])}
                           for v in c.values],
        })
    return {"axis": spec.axis, "select_on": spec.select_on, "seeds": list(spec.seeds),
            "initial_values": list(spec.values), "extend": spec.extend, "waiting_main_runs": stage.waiting,
            "dropped_main_runs": stage.dropped, "cells": cells}


def write_tune_record(grid: Grid, stage: Stage, sweep_dir: Path) -> None:
    config_io.atomic_write_text(Path(sweep_dir) / TUNE_FILE, json.dumps(tune_record(grid, stage), indent=1) + "\n")


def describe(grid: Grid, stage: Stage, base_runs: list[PlannedRun]) -> str:
    """The dry-run's tuning lines: what is tuned, how many runs per stage."""
    spec = grid.tune
    values = ", ".join(f"{v:.4g}" for v in spec.values)
    return (f"tuning: {spec.axis} over [{values}] on seed(s) {list(spec.seeds)}, selected on {spec.select_on}; "
            f"{len(stage.cells)} cells x {len(spec.values)} values x {len(spec.seeds)} seed(s) = "
            f"{len(stage.tune_runs)} tuning runs (up to {spec.extend} one-step extension(s) per cell when the best "
            f"value is at an edge), then {len(base_runs)} main runs at each cell's chosen value")


def run_tuned(grid: Grid, base_runs: list[PlannedRun], sweep_dir: Path, opts, select=lambda runs: runs):
    """Drive a tuned sweep: tuning runs first, then each cell's main runs as its choice is made.

    Each pass plans what can be planned (``plan_stage``), trains this
    driver's share (``select``) and looks again; it stops when a pass leaves
    the plan as it was. Runs another driver holds are skipped (it trains
    them, and plans the main runs they unlock). Returns the merged Summary.
    """
    from sweeps.driver import POLL_S, Summary, prepare, run_sweep

    total = Summary()
    stage = plan_stage(grid, base_runs, sweep_dir)
    _say_extensions(grid.tune, {}, stage)
    while True:
        located = prepare(grid, stage.runs, sweep_dir)
        write_tune_record(grid, stage, sweep_dir)
        summary = run_sweep(select(located), sweep_dir, opts)
        for outcome, n in summary.counts.items():
            if not outcome.startswith("skipped"):  # every pass skips what earlier passes did: count the last only
                total.counts[outcome] = total.counts.get(outcome, 0) + n
        new = plan_stage(grid, base_runs, sweep_dir)
        _say_extensions(grid.tune, stage.cells, new)
        unchanged = [r.name for r in new.runs] == [r.name for r in stage.runs]
        if unchanged and new.waiting and opts.wait_for_held:
            # A local worker: the cells still waiting wait on tuning runs another worker took after this
            # pass looked at them; plan again (after a pause, not a spin) and wait for those in the next pass.
            time.sleep(POLL_S)
            stage = new
            continue
        if unchanged:
            for outcome, n in summary.counts.items():
                if outcome.startswith("skipped"):
                    total.counts[outcome] = n
            write_tune_record(grid, new, sweep_dir)
            if new.waiting:
                print(f"note: {new.waiting} main run(s) wait for tuning runs another driver holds; rerun to continue")
            if new.dropped:
                print(f"note: {len(new.dropped)} main run(s) not planned: their cell found no finite candidate "
                      f"(see {Path(sweep_dir) / TUNE_FILE})")
            return total
        stage = new



def _say_extensions(spec: TuneSpec, old: dict[str, Cell], new: Stage) -> None:
    """Print each range extension once, as a driver first sees it."""
    for key, cell in new.cells.items():
        before = old[key].extended if key in old else []
        for step in cell.extended[len(before):]:
            row = cell.base.row
            print(f"tuning: the best {spec.axis} of {row['arm']} at budget {row['budget']:.4g} was at an edge of the "
                  f"range; extended it {step} (extension {cell.extended.index(step) + 1} of at most {spec.extend})")
