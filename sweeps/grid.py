"""Grid files: parse, validate and expand into cells.

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

First-class axes: ``allocation`` (or ``alpha`` / ``beta`` / ``schedule``,
which build arms from bounds), ``budget``, ``tokens``, ``num_layers``,
``head_dim``, ``seed`` (data and init seed), ``lr``. Every error names the
file, the YAML path of the offending key and the reason; ``load_grid``
collects all of them and raises one ``GridError``. Pure Python.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from elmjax import config_io
from elmjax.config import Config
from elmjax.config_io import ConfigError, suggest
from sweeps.arms import TWIN, Arm, _multipliers, _schedule, parse_arm
from sweeps.budget import KINDS
from sweeps.naming import compact_number
from sweeps.tokens import TokenSpec, parse_tokens

TOP_KEYS = ("name", "description", "base", "axes", "zip", "exclude", "match")
ARM_PARTS = ("alpha", "beta", "schedule")
SETTERS = {"num_layers": ("model.num_layers",), "head_dim": ("model.head_dim",), "lr": ("optimizer.lr",),
           "seed": ("data.seed", "train.seed")}
FIRST_CLASS = ("allocation", "budget", "tokens") + ARM_PARTS + tuple(SETTERS)
_SHORT = {"num_layers": "L", "head_dim": "hd", "lr": "lr", "seed": "s"}
_BUDGET_PREFIX = {"params": "N", "non_embedding_params": "NE", "flops": "C"}
_SWEEP_OWNED = ("run_dir", "name")
_ARM_FIELDS = ("model.qkv_multipliers", "model.ffn_multipliers", "model.qkv_schedule", "model.ffn_schedule")


class GridError(ConfigError):
    """One or more problems with a grid file; ``messages`` lists them all."""

    def __init__(self, messages: list[str]):
        self.messages = list(dict.fromkeys(messages))  # de-duplicated, in order
        shown = self.messages[:25]
        more = len(self.messages) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


@dataclass(frozen=True)
class Match:
    tolerance: float = 0.01  # relative budget error allowed for every run
    twin: Literal["width", "multipliers"] = "width"  # how uniform twins are matched
    width_multiple: int | Literal["auto"] = "auto"  # model_dim step; auto: coarsest of 128..1 that fits
    kind: Literal["params", "non_embedding_params", "flops"] = "params"  # twin matching without a budget axis

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.width_multiple != "auto" and self.width_multiple < 1:
            raise ValueError(f"width_multiple must be >= 1 or 'auto', got {self.width_multiple}")


@dataclass(frozen=True)
class Axis:
    name: str  # as written under axes:
    kind: str  # allocation | alpha | beta | schedule | budget | tokens | setter
    values: tuple  # parsed: Arm, multipliers, schedule name, float, TokenSpec or raw config value
    raw: tuple  # the YAML values, for exclude rules and the results table
    labels: tuple[str, ...]  # per-value run-name parts
    paths: tuple[str, ...] = ()  # config paths a setter axis writes
    unit: str = ""  # the budget kind of the budget axis

    @property
    def column(self) -> str:
        """The results-table column: 'axis.<dotted.path>' (axes that are not one config path use their name)."""
        return "axis." + (self.paths[0] if self.kind == "setter" and len(self.paths) == 1 else self.name)


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

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def value(self, cell: tuple[int, ...], name: str) -> Any:
        for a, i in zip(self.axes, cell):
            if a.name == name:
                return a.values[i]
        return None


class _Errors:
    def __init__(self, source: str):
        self.source, self.messages = source, []

    def add(self, where: str, reason: str) -> None:
        self.messages.append(f"{self.source}: {where}: {reason}")

    def add_located(self, message: str) -> None:
        """A message that already starts with its YAML path (from config_io)."""
        self.messages.append(f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise GridError(self.messages)


def load_grid(path: str | Path) -> Grid:
    """Parse and validate a grid file; GridError lists every problem found."""
    path = Path(path)
    raw = _load_strict_yaml(path)
    errors = _Errors(str(path))
    for key in raw:
        if key not in TOP_KEYS:
            errors.add(str(key), f"unknown key{suggest(str(key), TOP_KEYS)}; valid keys: {', '.join(TOP_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        errors.add("name", f"must be a non-empty name of letters, digits, '.', '_' or '-', got {name!r}")
    match = _parse_match(raw.get("match", {}), errors)
    axes_raw = raw.get("axes", {}) or {}
    if not isinstance(axes_raw, dict):
        errors.add("axes", f"expected a mapping of axis name -> values, got {axes_raw!r}")
        axes_raw = {}
    axes = tuple(a for a in (_parse_axis(str(k), v, errors) for k, v in axes_raw.items()) if a is not None)
    _check_conflicts(axes, errors)
    base = raw.get("base", {}) or {}
    if not isinstance(base, dict):
        errors.add("base", f"expected a training config mapping, got {base!r}")
        base = {}
    _check_base(base, axes, errors)
    zips = _parse_zip(raw.get("zip", []), axes, errors)
    _check_duplicates(axes, zips, errors)
    excludes = _parse_exclude(raw.get("exclude", []), axes, errors)
    errors.raise_if_any()
    budget = next((a for a in axes if a.kind == "budget"), None)
    return Grid(str(path), name, path.read_text(), base, axes, zips, excludes, match,
                budget.unit if budget else None)


def _duplicate_keys(node, path: str = "") -> list[str]:
    """'<yaml path>: duplicate key ...' for every repeated mapping key (PyYAML silently keeps the last one)."""
    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = getattr(key_node, "value", None)
            where = f"{path}.{key}" if path else str(key)
            if key in seen:
                out.append(f"{where}: duplicate key (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                           "YAML would silently keep only the last one")
            seen.setdefault(key, key_node.start_mark.line + 1)
            out += _duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, f"{path}[{i}]")
    return out


def _load_strict_yaml(path: Path) -> dict:
    raw = config_io.load_yaml(path)  # its errors: missing file, invalid YAML, not a mapping
    duplicates = _duplicate_keys(yaml.compose(path.read_text(), Loader=yaml.SafeLoader))
    if duplicates:
        raise GridError([f"{path}: {d}" for d in duplicates])
    return raw


def _parse_match(value, errors: _Errors) -> Match:
    try:
        return config_io.from_dict(Match, value or {}, source=None, path="match")
    except ConfigError as e:
        errors.add_located(str(e))
        return Match()


# ---------------------------------------------------------------- axes


def _parse_axis(name: str, value, errors: _Errors) -> Axis | None:
    where = f"axes.{name}"
    if name == "allocation":
        return _allocation_axis(value, errors)
    if name == "budget":
        return _budget_axis(value, errors)
    if not isinstance(value, list) or not value:
        errors.add(where, f"expected a non-empty list of values, got {value!r}")
        return None
    parsed, labels = [], []
    for i, v in enumerate(value):
        try:
            p, label = _parse_value(name, v)
        except ValueError as e:
            errors.add(f"{where}[{i}]", str(e))
            continue
        parsed.append(p)
        labels.append(label)
    if len(parsed) != len(value):
        return None
    if name in ARM_PARTS:
        return Axis(name, name, tuple(parsed), tuple(value), tuple(labels))
    if name == "tokens":
        return Axis(name, "tokens", tuple(parsed), tuple(value), tuple(labels))
    paths = SETTERS.get(name) or (_check_path(name, errors) and (name,))
    if not paths:
        return None
    return Axis(name, "setter", tuple(parsed), tuple(value), tuple(labels), paths)


def _parse_value(name: str, v) -> tuple[Any, str]:
    """(parsed value, label part) of one axis value; ValueError if malformed."""
    if name == "alpha" or name == "beta":
        m = _multipliers(v, "qkv" if name == "alpha" else "ffn")
        return m, ""
    if name == "schedule":
        if _schedule(v) is None:
            raise ValueError("expected a schedule name")
        return v, ""
    if name == "tokens":
        spec = parse_tokens(v)
        return spec, spec.label
    if name in SETTERS:
        number = _number(v)
        if number is None or (name != "lr" and number != int(number)):
            raise ValueError(f"expected {'a number' if name == 'lr' else 'an integer'}, got {v!r}")
        number = number if name == "lr" else int(number)
        return number, f"{_SHORT[name]}{compact_number(number) if name == 'lr' else number}"
    leaf = name.rsplit(".", 1)[-1]
    return _freeze(v), f"{leaf}{_label_value(v)}"


def _number(v) -> float | None:
    """A YAML number (PyYAML reads '1e-3' as a string), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return v if isinstance(v, (int, float)) else None


def _label_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return compact_number(v)
    if isinstance(v, (list, tuple)):
        return "_".join(_label_value(x) for x in v)
    return str(v)


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _allocation_axis(value, errors: _Errors) -> Axis | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = {v: v for v in value}  # [openelm, uniform] shorthand
    if not isinstance(value, dict) or not value:
        errors.add("axes.allocation", f"expected a non-empty mapping of arm name -> arm, got {value!r}")
        return None
    arms = []
    for name, spec in value.items():
        try:
            arms.append(parse_arm(str(name), spec))
        except ValueError as e:
            errors.add(f"axes.allocation.{name}", str(e))
    if len(arms) != len(value):
        return None
    if all(a.twin_marker for a in arms):
        errors.add("axes.allocation", f"'{TWIN}' stands for the uniform twins of the layer-wise arms; "
                   "list at least one other arm")
        return None
    names = tuple(a.name for a in arms)
    return Axis("allocation", "allocation", tuple(arms), names, names)


def _budget_axis(value, errors: _Errors) -> Axis | None:
    where = "axes.budget"
    if not isinstance(value, dict):
        errors.add(where, f"expected {{kind: params|non_embedding_params|flops, values: [...]}}, got {value!r}")
        return None
    for key in value:
        if key not in ("kind", "values"):
            errors.add(f"{where}.{key}", f"unknown key{suggest(str(key), ('kind', 'values'))}; valid keys: kind, values")
    kind = value.get("kind")
    if kind not in KINDS:
        errors.add(f"{where}.kind", f"{kind!r} is not one of {list(KINDS)}{suggest(str(kind), KINDS)}")
        return None
    values = value.get("values")
    if not isinstance(values, list) or not values:
        errors.add(f"{where}.values", f"expected a non-empty list of positive numbers, got {values!r}")
        return None
    parsed = []
    for i, v in enumerate(values):
        number = _number(v)
        if number is None or number <= 0:
            errors.add(f"{where}.values[{i}]", f"expected a positive number, got {v!r}")
            continue
        parsed.append(float(number))
    if len(parsed) != len(values):
        return None
    labels = tuple(f"{_BUDGET_PREFIX[kind]}{compact_number(v)}" for v in parsed)
    return Axis("budget", "budget", tuple(parsed), tuple(values), labels, unit=kind)


def _check_path(dotted: str, errors: _Errors) -> bool:
    """A dotted axis must name a value (not a section) of Config, and not one the sweep owns."""
    import dataclasses
    import typing

    where = f"axes.{dotted}"
    cls, walked = Config, ""
    for part in dotted.split("."):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in fields:
            options = sorted(fields) if fields else []
            hint = suggest(part, options + list(FIRST_CLASS) if not walked else options)
            errors.add(where, f"unknown {'axis or config key' if not walked else 'config key'} '{part}'"
                       f"{' in ' + walked if walked else ''}{hint}"
                       + (f"; first-class axes: {', '.join(FIRST_CLASS)}" if not walked else ""))
            return False
        walked = f"{walked}.{part}" if walked else part
        cls = typing.get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        errors.add(where, f"'{dotted}' is a config section, not a value; sweep one of its keys")
        return False
    if dotted in _SWEEP_OWNED:
        errors.add(where, f"'{dotted}' is set by the sweep for every run")
        return False
    return True


def _check_conflicts(axes: tuple[Axis, ...], errors: _Errors) -> None:
    names = {a.name for a in axes}
    owner: dict[str, str] = {}
    for a in axes:
        for p in a.paths if a.kind == "setter" else ():
            if p in owner:
                errors.add(f"axes.{a.name}", f"sets {p}, which axes.{owner[p]} already sets")
            owner[p] = a.name
    if "allocation" in names:
        for part in ARM_PARTS:
            if part in names:
                errors.add(f"axes.{part}", "give arms either under axes.allocation or through alpha/beta/schedule, not both")
    arm_axes = names & ({"allocation"} | set(ARM_PARTS))
    for p, name in owner.items():
        if p in _ARM_FIELDS and arm_axes:
            errors.add(f"axes.{name}", f"{p} is set by the allocation arms (axes.{sorted(arm_axes)[0]})")
        if p == "model.model_dim" and "budget" in names:
            errors.add(f"axes.{name}", "model.model_dim is solved from axes.budget; sweep the budget instead")
        if p in ("train.steps", "train.tokens") and "tokens" in names:
            errors.add(f"axes.{name}", f"{p} conflicts with axes.tokens (the token budget sets train.tokens)")
    budget = next((a for a in axes if a.kind == "budget"), None)
    tokens = next((a for a in axes if a.kind == "tokens"), None)
    if budget and budget.unit == "flops" and tokens and any(t.kind == "flops" for t in tokens.values):
        errors.add("axes.tokens", "tokens derived from a FLOP budget cannot be combined with a flops budget axis: "
                   "the model size would be undetermined; use a token count or per_param")


def _check_base(base: dict, axes: tuple[Axis, ...], errors: _Errors) -> None:
    """Report what is wrong with ``base`` itself, and which setter-axis values are invalid.

    The base may rely on the axes (e.g. ``data.paths`` swept by an axis), so it is
    judged together with each axis's first value; an error that the base alone
    does not have belongs to an axis value, reported as ``axes.<name>[i]``."""
    for key in _SWEEP_OWNED:
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
    probe = {k: v for k, v in base.items() if k not in _SWEEP_OWNED}
    train = probe.get("train") or {}
    if any(a.kind == "tokens" for a in axes) and isinstance(train, dict):
        probe["train"] = {**{k: v for k, v in train.items() if k != "steps"}, "tokens": 1}
    return probe


# ---------------------------------------------------------------- zip and exclude


def _parse_zip(value, axes: tuple[Axis, ...], errors: _Errors) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
        errors.add("zip", f"expected a list of groups (lists of axis names), got {value!r}")
        return ()
    by_name = {a.name: a for a in axes}
    seen: dict[str, int] = {}
    groups = []
    for gi, group in enumerate(value):
        ok = len(group) >= 2
        if not ok:
            errors.add(f"zip[{gi}]", "a zip group needs at least two axes")
        for name in group:
            if name not in by_name:
                errors.add(f"zip[{gi}]", f"'{name}' is not an axis{suggest(str(name), by_name)}")
                ok = False
            elif name in seen:
                errors.add(f"zip[{gi}]", f"axis '{name}' is already in zip[{seen[name]}]")
                ok = False
            seen.setdefault(str(name), gi)
        if ok:
            lengths = {n: len(by_name[n].values) for n in group}
            if len(set(lengths.values())) > 1:
                errors.add(f"zip[{gi}]", f"zipped axes need the same number of values, got {lengths}")
            else:
                groups.append(tuple(group))
    return tuple(groups)


def _check_duplicates(axes: tuple[Axis, ...], zips, errors: _Errors) -> None:
    """A repeated value (or, for a zip group, a repeated row of values) would plan the same runs twice."""
    by_name = {a.name: a for a in axes}
    zipped = {n for g in zips for n in g}
    factors = list(zips) + [(a.name,) for a in axes if a.name not in zipped]
    for group in factors:
        seen: dict = {}
        for i, row in enumerate(zip(*(by_name[n].values for n in group))):
            key = tuple(_freeze(v) if not isinstance(v, Arm) else v.name for v in row)
            if key in seen:
                what = f"axes.{group[0]}" if len(group) == 1 else f"zip group {list(group)}"
                errors.add(f"axes.{group[0]}[{i}]" if len(group) == 1 else f"axes.{group[0]}",
                           f"duplicate value {row[0] if len(group) == 1 else list(row)!r} in {what} "
                           f"(also at position {seen[key]})")
            seen.setdefault(key, i)


def _same(a, b) -> bool:
    if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and not isinstance(a, bool):
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b
    return _freeze(a) == _freeze(b)


def _parse_exclude(value, axes: tuple[Axis, ...], errors: _Errors) -> tuple[dict, ...]:
    if not isinstance(value, list):
        errors.add("exclude", f"expected a list of rules ({{axis: value or [values]}}), got {value!r}")
        return ()
    by_name = {a.name: a for a in axes}
    rules = []
    for ri, rule in enumerate(value):
        where = f"exclude[{ri}]"
        if not isinstance(rule, dict) or not rule:
            errors.add(where, f"expected a mapping {{axis: value or [values]}}, got {rule!r}")
            continue
        parsed = {}
        for name, wanted in rule.items():
            axis = by_name.get(name)
            if axis is None:
                errors.add(f"{where}.{name}", f"not an axis{suggest(str(name), by_name)}")
                continue
            options = wanted if isinstance(wanted, list) and axis.kind not in ("alpha", "beta") else [wanted]
            hits = set()
            for w in options:
                idx = [i for i, r in enumerate(axis.raw) if _same(r, w)]
                if not idx:
                    errors.add(f"{where}.{name}", f"{w!r} is not a value of axes.{name} {list(axis.raw)}")
                elif axis.kind == "allocation" and axis.values[idx[0]].twin_marker:
                    errors.add(f"{where}.{name}", f"the uniform twins cannot be excluded: every layer-wise arm keeps its twin")
                hits.update(idx)
            parsed[name] = frozenset(hits)
        rules.append(parsed)
    return tuple(rules)


# ---------------------------------------------------------------- expansion


def expand(grid: Grid) -> list[tuple[int, ...]]:
    """All cells (one value index per axis, in axes order): product over axes and zip groups, minus excludes."""
    in_group = {name: g for g in grid.zips for name in g}
    factors, done = [], set()
    for a in grid.axes:
        group = in_group.get(a.name, (a.name,))
        if group in done:
            continue
        done.add(group)
        size = len(grid.axis(group[0]).values)
        factors.append([{n: i for n in group} for i in range(size)])
    order = [a.name for a in grid.axes]
    cells = []
    for combo in itertools.product(*factors):
        merged = {k: v for part in combo for k, v in part.items()}
        cells.append(tuple(merged[n] for n in order))
    errors = _Errors(grid.path)
    kept = []
    hit = [False] * len(grid.excludes)
    for cell in cells:
        index = dict(zip(order, cell))
        matched = [all(index[n] in idx for n, idx in rule.items()) for rule in grid.excludes]
        for ri, m in enumerate(matched):
            hit[ri] |= m
        if not any(matched):
            kept.append(cell)
    for ri, h in enumerate(hit):
        if not h:
            errors.add(f"exclude[{ri}]", "matches no cell of the grid (check the values and the zip groups)")
    if not kept:
        errors.add("exclude", "every cell of the grid is excluded: nothing to run")
    errors.raise_if_any()
    return kept


def cell_description(grid: Grid, cell: tuple[int, ...], skip: tuple[str, ...] = ()) -> str:
    """'allocation=openelm, budget=1e5, seed=0' for error messages."""
    return ", ".join(f"{a.name}={a.raw[i]}" for a, i in zip(grid.axes, cell) if a.name not in skip) or "the base config"


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
