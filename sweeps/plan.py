"""From a validated grid to the list of runs: arms, their uniform twins, names, the dry-run table.

Each cell gives one arm run; every layer-wise arm also gets a uniform twin
solved for the same budget (``sweeps.budget``) with every other axis the
same, so it trains on the same data and seed. Twins that resolve to the same
config are one run (several arms can share a twin). Two cells that resolve
to the same config are an error: one of the axes changes nothing a run
computes. All errors of all cells are collected before anything is written.
Pure Python.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from elmjax import config_io
from elmjax.config import Config
from elmjax.config_io import ConfigError
from sweeps.arms import TWIN, apply_arm, check_arm, is_uniform, mean_multipliers
from sweeps.budget import AUTO_STEPS, BudgetError, Fit, make_measure, solve_twin, solve_width
from sweeps.axes import ARM_PARTS
from sweeps.expand import cell_description, expand
from sweeps.grid import Grid, arm_of
from sweeps.problems import Problems
from sweeps.naming import config_hash, make_label, run_name
from sweeps.rows import PLAN_COLUMNS, model_columns
from sweeps.tokens import resolve_tokens

PLAN_FILE = "plan.json"
_ARM_AXES = ("allocation",) + ARM_PARTS


@dataclass(frozen=True)
class PlannedRun:
    name: str
    config: Config  # resolved; run_dir is set by the driver (sweep_dir/runs/<name>)
    row: dict  # the planned columns of results.parquet
    is_twin: bool = False


class _CellError(Exception):
    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason


@dataclass(frozen=True)
class _Solved:
    """One solved model of a cell, before naming."""

    config: Config
    arm: str
    fit: Fit
    target: float
    kind: str
    is_twin: bool


def build_plan(grid: Grid) -> list[PlannedRun]:
    """Every run of the grid, arms followed by their twins; GridError lists all problems."""
    errors = Problems(grid.path)
    registry = _Registry(grid, errors)
    for position, cell in enumerate(expand(grid)):
        registry.position = position
        try:
            solved = _solve_cell(grid, cell)
        except _CellError as e:
            errors.add(e.where, e.reason)
            continue
        if solved is None:
            continue  # the 'uniform' marker: twins come with their arms
        arm, twin = solved
        twin_name = registry.add(twin, cell) if twin is not None else None
        registry.add(arm, cell, twin=twin_name)
    errors.raise_if_any()
    return registry.runs()


class _Registry:
    """Names runs, merges identical twins and reports duplicate cells."""

    def __init__(self, grid: Grid, errors: Problems):
        self.grid, self.errors = grid, errors
        self.by_hash: dict[str, PlannedRun] = {}
        self.cells: dict[str, str] = {}
        self.alias: dict[str, str] = {}  # a twin's name -> the explicit run it turned out to be
        self.order: dict[str, tuple[int, bool]] = {}  # hash -> (cell position, is twin): arms before their twins
        self.position = 0

    def add(self, s: _Solved, cell: tuple[int, ...], twin: str | None = None) -> str:
        h = config_hash(s.config)
        desc = cell_description(self.grid, cell)
        existing = self.by_hash.get(h)
        if existing is not None:
            if s.is_twin:
                return existing.name
            if not existing.is_twin:
                self.errors.add("axes", f"cells ({self.cells[h]}) and ({desc}) resolve to the same config "
                                f"(run {existing.name}): an axis changes nothing a run computes")
                return existing.name
        name = run_name(_label(self.grid, cell, s.arm, s.is_twin), s.config)
        run = PlannedRun(name, s.config.replace(name=name), _row(self.grid, cell, s, name, twin), s.is_twin)
        if existing is not None:  # an explicit uniform arm equal to an earlier twin: it takes the twin's place
            self.alias[existing.name] = name
        self.by_hash[h] = run
        self.cells[h] = desc
        self.order.setdefault(h, (self.position, s.is_twin))
        return name

    def runs(self) -> list[PlannedRun]:
        out = []
        for h in sorted(self.by_hash, key=self.order.__getitem__):
            run = self.by_hash[h]
            twin = run.row.get("twin")
            if twin in self.alias:
                run = dataclasses.replace(run, row={**run.row, "twin": self.alias[twin]})
            out.append(run)
        return out


def _cell_config(grid: Grid, cell: tuple[int, ...]) -> Config:
    data = {k: v for k, v in grid.base.items()}
    for axis, i in zip(grid.axes, cell):
        if axis.kind == "setter":
            value = axis.values[i] if axis.name in ("num_layers", "head_dim", "lr", "seed") else axis.raw[i]
            for p in axis.paths:
                data = config_io.set_dotted(data, Config, p, value)
        elif axis.kind == "tokens":
            train = data.get("train") or {}
            data["train"] = {**{k: v for k, v in train.items() if k != "steps"}, "tokens": 1}  # placeholder
    try:
        return config_io.from_dict(Config, data, source=None, path="")
    except ConfigError as e:
        raise _CellError("axes", f"the cell ({cell_description(grid, cell)}) gives an invalid config: {e}") from None


def _solve_cell(grid: Grid, cell: tuple[int, ...]) -> tuple[_Solved, _Solved | None] | None:
    cfg0 = _cell_config(grid, cell)
    arm = arm_of(grid, cell, cfg0.model)
    if arm.twin_marker:
        return None
    where = f"axes.allocation.{arm.name}" if grid.axis("allocation") else "axes"
    reason = check_arm(arm, cfg0.model)
    if reason:
        raise _CellError(where, f"{reason} (in cell {cell_description(grid, cell)})")
    tokens = grid.value(cell, "tokens")
    kind = grid.budget_kind or grid.match.kind
    measure = make_measure(kind, cfg0.data.seq_len, cfg0.tokens_per_step,
                           tokens if tokens is not None else cfg0.total_steps * cfg0.tokens_per_step)
    m = grid.match
    steps = AUTO_STEPS if m.width_multiple == "auto" else (m.width_multiple,)
    target = grid.value(cell, "budget")
    budget_where = f"axes.budget.values[{cell[[a.name for a in grid.axes].index('budget')]}]" if target else "match"
    shape_desc = cell_description(grid, cell, skip=_not_shaping(grid, kind))
    try:
        if target is not None:
            fit = solve_width(lambda d: apply_arm(arm, cfg0.model, d), measure, target, m.tolerance, steps,
                              cfg0.model.head_dim)
        else:
            model = apply_arm(arm, cfg0.model, cfg0.model.model_dim)
            fit = Fit(model, measure(model), 0.0)
            target = fit.achieved
    except BudgetError as e:
        raise _CellError(budget_where, _budget_message(kind, target, f"arm '{arm.name}'", shape_desc, e, m.tolerance))
    arm_run = _Solved(_finalize(cfg0, fit.model, tokens), arm.name, fit, target, kind, False)
    if is_uniform(fit.model):
        return arm_run, None
    alpha0, beta0 = mean_multipliers(fit.model)
    try:
        twin = solve_twin(cfg0.model, alpha0, beta0, measure, target, m.tolerance, mode=m.twin,
                          width=fit.model.model_dim, steps=steps, min_width=cfg0.model.head_dim)
    except BudgetError as e:
        raise _CellError(budget_where, _budget_message(kind, target, f"the uniform twin of arm '{arm.name}'",
                                                       shape_desc, e, m.tolerance))
    return arm_run, _Solved(_finalize(cfg0, twin.model, tokens), TWIN, twin, target, kind, True)


def _not_shaping(grid: Grid, kind: str) -> tuple[str, ...]:
    """Axes that cannot change whether a budget is reachable (left out of its error, so it is said once)."""
    def shapes(axis) -> bool:
        if axis.kind in ("allocation", "budget") + ARM_PARTS or axis.name in ("num_layers", "head_dim"):
            return True
        if kind == "flops" and (axis.kind == "tokens" or any(p.startswith(("data.", "train.")) for p in axis.paths)):
            return True
        return any(p.startswith("model.") for p in axis.paths)

    return tuple(a.name for a in grid.axes if not shapes(a))


def _budget_message(kind: str, target: float, who: str, desc: str, e: BudgetError, tol: float) -> str:
    text = f"{kind} budget {target:,.6g} cannot be met by {who} ({desc}): {e.reason}"
    if e.best is not None:
        text += (f"; closest: model_dim={e.best.model.model_dim} gives {e.best.achieved:,.6g} "
                 f"({e.best.rel_error:+.2%})")
    return text + f". Tolerance is {tol:.2%}: change the budget, raise match.tolerance or set match.width_multiple"


def _finalize(cfg0: Config, model, tokens) -> Config:
    train = cfg0.train
    if tokens is not None:
        train = dataclasses.replace(train, steps=None, tokens=resolve_tokens(tokens, model, cfg0.data.seq_len))
    return cfg0.replace(model=model, train=train)


def _label(grid: Grid, cell: tuple[int, ...], arm: str, is_twin: bool) -> str:
    parts = [TWIN if is_twin else arm]
    parts += [a.labels[i] for a, i in zip(grid.axes, cell) if a.name not in _ARM_AXES]
    return make_label(parts)


def _row(grid: Grid, cell: tuple[int, ...], s: _Solved, name: str, twin: str | None) -> dict:
    cfg = s.config
    seed_axis = grid.value(cell, "seed")
    row = {
        "run": name, "run_dir": f"runs/{name}", "arm": s.arm, "is_uniform": is_uniform(cfg.model), "twin": twin,
        "budget_kind": s.kind, "budget": float(s.target), "budget_rel_error": float(s.fit.rel_error),
        "seed": int(seed_axis if seed_axis is not None else cfg.train.seed),
        **model_columns(cfg),
    }
    for axis, i in zip(grid.axes, cell):
        row[axis.column] = None if (s.is_twin and axis.name in ARM_PARTS) else axis_value(axis, i, s.is_twin)
    return {k: row[k] for k in PLAN_COLUMNS} | {k: v for k, v in row.items() if k not in PLAN_COLUMNS}


def axis_value(axis, i: int, is_twin: bool = False):
    """A cell's value of ``axis`` for the results table: numbers stay numbers, anything else is text."""
    if axis.kind == "allocation":
        return TWIN if is_twin else axis.raw[i]
    if axis.kind in ("budget",) or axis.name in ("num_layers", "head_dim", "lr", "seed"):
        return axis.values[i]
    raws = axis.raw
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in raws):
        return float(raws[i]) if any(isinstance(r, float) for r in raws) else raws[i]
    if all(isinstance(r, bool) for r in raws) or all(isinstance(r, str) for r in raws):
        return raws[i]
    return json.dumps(raws[i]) if not isinstance(raws[i], str) else raws[i]


# ---------------------------------------------------------------- plan.json and the dry-run table


def write_plan(runs: list[PlannedRun], sweep_dir: Path, grid_name: str) -> None:
    record = {"grid": grid_name, "runs": [r.row for r in runs]}
    config_io.atomic_write_text(Path(sweep_dir) / PLAN_FILE, json.dumps(record, indent=1) + "\n")


def read_plan(sweep_dir: Path) -> list[dict]:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a sweep directory (no {PLAN_FILE}; run `python -m sweeps.run GRID.yaml`)")
    return json.loads(path.read_text())["runs"]


def format_table(runs: list[PlannedRun]) -> str:
    """The dry-run table: one line per run, then totals."""
    name_w = max([len(r.name) for r in runs] + [3])
    arm_w = max([len(r.row["arm"]) for r in runs] + [3])
    head = (f"{'run':<{name_w}} {'arm':<{arm_w}} {'budget':>10} {'L':>3} {'width':>6} {'params':>14} {'err':>7} "
            f"{'FLOPs/tok':>10} {'tokens':>15} {'train FLOPs':>11}")
    lines = [head, "-" * len(head)]
    for r in runs:
        w = r.row
        lines.append(f"{r.name:<{name_w}} {w['arm']:<{arm_w}} {w['budget']:>10.4g} {w['num_layers']:>3} "
                     f"{w['model_dim']:>6} {w['params']:>14,} {w['budget_rel_error']:>+7.2%} "
                     f"{w['flops_per_token']:>10.4g} {w['tokens']:>15,} {w['train_flops']:>11.3e}")
    total = sum(r.row["train_flops"] for r in runs)
    twins = sum(r.is_twin for r in runs)
    lines.append(f"\n{len(runs)} runs ({len(runs) - twins} arms, {twins} uniform twins); "
                 f"estimated training compute {total:.3e} FLOPs")
    return "\n".join(lines)
