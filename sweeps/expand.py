"""Grid expansion: zip groups, exclude rules, and the product of the axes into cells.

A cell is a tuple with one value index per axis, in the order of ``axes:``.
The product runs over the axes in that order (the first axis varies
slowest); a zip group counts as one factor at the position of its first
axis. Exclude rules drop every cell matching all of a rule's keys; a rule
that matches nothing is an error (a typo would otherwise go unnoticed).
Pure Python.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from elmjax.config_io import suggest
from sweeps.arms import Arm
from sweeps.axes import Axis, freeze
from sweeps.problems import Problems

if TYPE_CHECKING:
    from sweeps.grid import Grid

def parse_zip(value, axes: tuple[Axis, ...], errors: Problems) -> tuple[tuple[str, ...], ...]:
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


def check_duplicates(axes: tuple[Axis, ...], zips, errors: Problems) -> None:
    """A repeated value (or, for a zip group, a repeated row of values) would plan the same runs twice."""
    by_name = {a.name: a for a in axes}
    zipped = {n for g in zips for n in g}
    factors = list(zips) + [(a.name,) for a in axes if a.name not in zipped]
    for group in factors:
        seen: dict = {}
        for i, row in enumerate(zip(*(by_name[n].values for n in group))):
            key = tuple(freeze(v) if not isinstance(v, Arm) else v.name for v in row)
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
    return freeze(a) == freeze(b)


def parse_exclude(value, axes: tuple[Axis, ...], errors: Problems) -> tuple[dict, ...]:
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
                    errors.add(f"{where}.{name}", "the uniform twins cannot be excluded: every layer-wise arm keeps its twin")
                hits.update(idx)
            parsed[name] = frozenset(hits)
        rules.append(parsed)
    return tuple(rules)


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
    errors = Problems(grid.path)
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
