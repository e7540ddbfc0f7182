"""Grid files: load and validate (``sweeps.expand`` turns a grid into cells).

A grid is a YAML mapping::

    name: my_sweep                 # optional; default: the file name
    description: free text         # optional
    base: {...}                    # an elmjax Config (strict: unknown keys are errors)
    axes:                          # combined as a product, in this order
      allocation: {openelm: openelm, uniform: uniform, mine: {qkv: [0.25, 1.0], ffn: [1, 3]}}
      budget: {kind: params, values: [1e5, 2e5]}   # params | non_embedding_params | flops
      seed: [0, 1]
      optimizer.warmup_steps: [10, 20]              # any dotted Config path
    zip: [[lr, optimizer.warmup_steps]]             # axes that vary together
    exclude: [{allocation: mine, seed: 1}]          # drop matching cells
    match: {tolerance: 0.01, twin: width, width_multiple: auto, kind: params}
    eval: {tasks: [sweeps/tasks/close_bracket.jsonl]}  # score every finished run (sweeps.evals)
    tune: {axis: optimizer.lr, values: [1e-3, 2e-3, 4e-3], seeds: [100]}  # tuned per cell (sweeps.tune_grid)

First-class axes: ``allocation`` (or ``alpha`` / ``beta`` / ``schedule``,
which build arms from bounds), ``budget``, ``tokens``, ``num_layers``,
``head_dim``, ``seed`` (data and init seed), ``lr``. Every error names the
file, the YAML path of the offending key and the reason; ``load_grid``
collects all of them and raises one ``GridError``. Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from elmjax import config_io
from elmjax.budget_match import DEFAULT_TOLERANCE
from elmjax.config import Config
from elmjax.config_io import ConfigError, suggest
from sweeps.arms import Arm
from sweeps.axes import ARM_PARTS, SWEEP_OWNED, Axis, check_conflicts, parse_axis
from sweeps.evals import EvalSpec, check_tasks
from sweeps.expand import check_duplicates, parse_exclude, parse_zip
from sweeps.problems import GridError, Problems
from sweeps.tune_grid import TuneSpec, parse_tune

TOP_KEYS = ("name", "description", "base", "axes", "zip", "exclude", "match", "eval", "tune")


@dataclass(frozen=True)
class Match:
    tolerance: float = DEFAULT_TOLERANCE  # relative budget error allowed for every run (0.01)
    twin: Literal["width", "multipliers"] = "width"  # how uniform twins are matched
    width_multiple: int | Literal["auto"] = "auto"  # model_dim step; auto: the closest width, coarsest of 128..1 if as close
    kind: Literal["params", "non_embedding_params", "flops"] = "params"  # twin matching without a budget axis

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.width_multiple != "auto" and self.width_multiple < 1:
            raise ValueError(f"width_multiple must be >= 1 or 'auto', got {self.width_multiple}")


@dataclass(frozen=True)
class Grid:
    path: str
    name: str
    text: str  # the file as written, copied into the sweep directory
    base: dict
    axes: tuple[Axis, ...]
    zips: tuple[tuple[str, ...], ...]
    excludes: tuple[dict, ...]  # axis name -> frozenset of value indices
    match: Match
    budget_kind: str | None
    eval: EvalSpec = EvalSpec()  # downstream tasks scored on every finished run
    tune: TuneSpec | None = None  # a setting tuned per cell before the main runs (sweeps.tune)

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def value(self, cell: tuple[int, ...], name: str) -> Any:
        for a, i in zip(self.axes, cell):
            if a.name == name:
                return a.values[i]
        return None


def load_grid(path: str | Path) -> Grid:
    """Parse and validate a grid file; GridError lists every problem found."""
    path = Path(path)
    raw = config_io.load_yaml(path)  # its errors: missing file, invalid YAML, not a mapping, duplicate keys
    errors = Problems(str(path))
    for key in raw:
        if key not in TOP_KEYS:
            errors.add(str(key), f"unknown key{suggest(str(key), TOP_KEYS)}; valid keys: {', '.join(TOP_KEYS)}")
    name = raw.get("name", path.stem)
    # The name is a directory (runs/<name>): '.', '..' or a hidden name would write elsewhere.
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name):
        errors.add("name", "must be a single safe path component (letters, digits, '.', '_' or '-', starting with "
                   f"a letter, digit or '_'), got {name!r}")
    match = _parse_match(raw.get("match", {}), errors)
    axes_raw = raw.get("axes", {}) or {}
    if not isinstance(axes_raw, dict):
        errors.add("axes", f"expected a mapping of axis name -> values, got {axes_raw!r}")
        axes_raw = {}
    axes = tuple(a for a in (parse_axis(str(k), v, errors) for k, v in axes_raw.items()) if a is not None)
    check_conflicts(axes, errors)
    base = raw.get("base", {}) or {}
    if not isinstance(base, dict):
        errors.add("base", f"expected a training config mapping, got {base!r}")
        base = {}
    _check_base(base, axes, errors)
    zips = parse_zip(raw.get("zip", []), axes, errors)
    check_duplicates(axes, zips, errors)
    excludes = parse_exclude(raw.get("exclude", []), axes, errors)
    evals = _parse_eval(raw.get("eval", {}), errors)
    tune = parse_tune(raw.get("tune"), axes, base, errors,
                      lambda p, v: _config_error(config_io.set_dotted(_probe(base, axes), Config, p, v)))
    errors.raise_if_any()
    budget = next((a for a in axes if a.kind == "budget"), None)
    return Grid(str(path), name, path.read_text(), base, axes, zips, excludes, match,
                budget.unit if budget else None, evals, tune)


def _parse_eval(value, errors: Problems) -> EvalSpec:
    try:
        spec = config_io.from_dict(EvalSpec, value or {}, source=None, path="eval")
    except ConfigError as e:
        errors.add_located(str(e))
        return EvalSpec()
    for problem in check_tasks(spec):
        errors.add_located(problem)
    return spec


def _parse_match(value, errors: Problems) -> Match:
    try:
        return config_io.from_dict(Match, value or {}, source=None, path="match")
    except ConfigError as e:
        errors.add_located(str(e))
        return Match()


def _check_base(base: dict, axes: tuple[Axis, ...], errors: Problems) -> None:
    """Report what is wrong with ``base`` itself, and which setter-axis values are invalid.

    The base may rely on the axes (e.g. ``data.paths`` swept by an axis), so it is
    judged together with each axis's first value; an error that the base alone
    does not have belongs to an axis value, reported as ``axes.<name>[i]``."""
    for key in SWEEP_OWNED:
        if key in base:
            errors.add(f"base.{key}", "is set by the sweep for every run (use --out to choose where runs go)")
    probe = _probe(base, axes)
    alone = _config_error(probe)
    with_axes = probe
    for a in axes:
        if a.kind == "setter":
            with_axes = _set_all(with_axes, a, 0)
    if alone is not None and _config_error(with_axes) == alone:
        errors.add_located("base" + (alone.removeprefix("<root>") if alone.startswith("<root>") else "." + alone))
        return  # axis values are checked on a valid base only
    for a in axes:
        if a.kind != "setter":
            continue
        for i, v in enumerate(a.raw):
            err = _config_error(_set_all(probe, a, i))
            if err is not None and err != alone:
                errors.add(f"axes.{a.name}[{i}]", f"{v!r} is not valid for {', '.join(a.paths)}: {err}")


def _set_all(data: dict, axis: Axis, i: int) -> dict:
    for p in axis.paths:
        data = config_io.set_dotted(data, Config, p, axis.raw[i])
    return data


def _config_error(data: dict) -> str | None:
    try:
        config_io.from_dict(Config, data, source=None, path="")
    except ConfigError as e:
        return str(e)
    return None


def _probe(base: dict, axes: tuple[Axis, ...]) -> dict:
    """``base`` with a placeholder token count when a tokens axis will set train.tokens."""
    probe = {k: v for k, v in base.items() if k not in SWEEP_OWNED}
    train = probe.get("train") or {}
    if any(a.kind == "tokens" for a in axes) and isinstance(train, dict):
        probe["train"] = {**{k: v for k, v in train.items() if k != "steps"}, "tokens": 1}
    return probe


def arm_of(grid: Grid, cell: tuple[int, ...], base_model) -> Arm:
    """The allocation arm of a cell: from axes.allocation, from alpha/beta/schedule, or base.model's."""
    arm = grid.value(cell, "allocation")
    if arm is not None:
        return arm
    from sweeps.arms import bounds_name

    alpha, beta, schedule = (grid.value(cell, p) for p in ARM_PARTS)
    qkv = alpha if alpha is not None else base_model.qkv_multipliers
    ffn = beta if beta is not None else base_model.ffn_multipliers
    name = bounds_name(qkv, ffn, schedule if grid.axis("schedule") else None)
    return Arm(name, qkv, ffn, schedule, schedule)
