"""The grid's ``tune:`` block: which setting is tuned per cell, over which values, on which seeds.

::

    tune:
      axis: optimizer.lr                     # a numeric Config field that no axis sweeps
      values: [1e-3, 2e-3, 4e-3, 8e-3]       # increasing; or {log_range: [1e-4, 1e-2], points: 7}
      seeds: [100]                           # tuning seeds, disjoint from the grid's seeds
      select_on: val_loss                    # val_loss | val_bpb (validation only, never test)
      extend: 2                              # best value at an edge: add a step that way, at most this often

Tuning seeds must differ from the grid's seeds: the main runs then measure
the chosen value on data and initialisations selection never saw. Every
problem names the file and ``tune.<key>``. Pure Python.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from elmjax import config_io
from elmjax.config import Config
from elmjax.config_io import ConfigError, suggest
from sweeps.problems import Problems

TUNE_KEYS = ("axis", "values", "seeds", "select_on", "extend")
SELECT_ON = ("val_loss", "val_bpb")
SEED_PATHS = ("data.seed", "train.seed")


@dataclass(frozen=True)
class TuneSpec:
    axis: str  # dotted Config path
    values: tuple[float, ...]  # increasing candidates
    seeds: tuple[int, ...]
    select_on: str = "val_loss"
    extend: int = 2  # extensions of the range allowed per cell when the best value sits at an edge
    integer: bool = False  # the field is an int: extended values are rounded

    def step_beyond(self, values: tuple[float, ...], upward: bool) -> float:
        """One geometric step past the edge: the ratio of the two outermost values on that side."""
        if upward:
            v = values[-1] * values[-1] / values[-2]
        else:
            v = values[0] * values[0] / values[1]
        if self.integer:
            v = float(max(1, round(v)))
        return v


def parse_tune(raw, axes, base: dict, errors: Problems, probe_error) -> TuneSpec | None:
    """Validate ``tune:`` (None when absent); ``probe_error(path, value)`` returns a config error or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.add("tune", f"expected a mapping with keys {', '.join(TUNE_KEYS)}, got {raw!r}")
        return None
    n = len(errors.messages)
    for key in raw:
        if key not in TUNE_KEYS:
            errors.add(f"tune.{key}", f"unknown key{suggest(str(key), TUNE_KEYS)}; valid keys: {', '.join(TUNE_KEYS)}")
    for key in ("axis", "values", "seeds"):
        if key not in raw:
            errors.add("tune", f"missing key '{key}'")
    axis = raw.get("axis")
    axis = {"lr": "optimizer.lr"}.get(axis, axis) if isinstance(axis, str) else axis
    integer = _check_axis(axis, axes, errors)
    values = _values(raw.get("values"), errors)
    seeds = _seeds(raw.get("seeds"), axes, base, errors)
    select_on = raw.get("select_on", "val_loss")
    if select_on not in SELECT_ON:
        errors.add("tune.select_on", f"must be one of {', '.join(SELECT_ON)} (selection uses validation only), "
                   f"got {select_on!r}")
    extend = raw.get("extend", 2)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        errors.add("tune.extend", f"must be an integer >= 0 (extensions of the range per cell), got {extend!r}")
    if len(errors.messages) > n:
        return None
    if integer and any(v != int(v) for v in values):
        errors.add("tune.values", f"{axis} is an integer field; got {list(values)}")
        return None
    for i, v in enumerate(values):
        err = probe_error(axis, int(v) if integer else v)
        if err is not None:
            errors.add(f"tune.values[{i}]", f"{v!r} is not valid for {axis}: {err}")
    if len(errors.messages) > n:
        return None
    return TuneSpec(axis, values, seeds, select_on, extend, integer)


def _check_axis(axis, axes, errors: Problems) -> bool:
    """Whether the tuned field is an int (else a float); errors for anything else."""
    if not isinstance(axis, str) or not axis:
        errors.add("tune.axis", f"expected a dotted config path such as optimizer.lr, got {axis!r}")
        return False
    try:
        config_io.set_dotted({}, Config, axis, 0.0, source="tune.axis")
    except ConfigError as e:
        errors.add("tune.axis", str(e).removeprefix("tune.axis: "))
        return False
    if axis in SEED_PATHS or axis in ("run_dir", "name"):
        errors.add("tune.axis", f"{axis} cannot be tuned (seeds are set by tune.seeds and the seed axis)")
        return False
    for a in axes:
        if axis in a.paths:
            errors.add("tune.axis", f"{axis} is also swept by axes.{a.name}: tune it or sweep it, not both")
            return False
    section, field = axis.rsplit(".", 1)
    cls = Config
    for part in section.split("."):
        cls = typing.get_type_hints(cls)[part]
    kind = typing.get_type_hints(cls)[field]
    if kind not in (float, int):
        errors.add("tune.axis", f"{axis} is not a number field ({getattr(kind, '__name__', kind)}); "
                   "only numeric settings can be tuned over a range")
        return False
    return kind is int


def _values(raw, errors: Problems) -> tuple[float, ...]:
    if isinstance(raw, dict):
        return _log_range(raw, errors)
    if not isinstance(raw, list) or len(raw) < 2 or not all(_number(v) for v in raw):
        errors.add("tune.values", f"expected a list of at least 2 numbers or {{log_range: [lo, hi], points: n}}, "
                   f"got {raw!r}")
        return ()
    values = tuple(float(v) for v in raw)
    if any(b <= a for a, b in zip(values, values[1:])):
        errors.add("tune.values", f"must be strictly increasing, got {list(raw)}")
    elif values[0] <= 0:
        errors.add("tune.values", f"must be positive (the range is extended by geometric steps), got {list(raw)}")
    return values


def _log_range(raw: dict, errors: Problems) -> tuple[float, ...]:
    unknown = [k for k in raw if k not in ("log_range", "points")]
    if unknown:
        errors.add(f"tune.values.{unknown[0]}", "unknown key; valid keys: log_range, points")
        return ()
    rng, points = raw.get("log_range"), raw.get("points")
    if not (isinstance(rng, list) and len(rng) == 2 and all(_number(v) for v in rng) and 0 < rng[0] < rng[1]):
        errors.add("tune.values.log_range", f"expected [low, high] with 0 < low < high, got {rng!r}")
        return ()
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        errors.add("tune.values.points", f"expected an integer >= 2, got {points!r}")
        return ()
    lo, hi = math.log(rng[0]), math.log(rng[1])
    return tuple(float(math.exp(lo + (hi - lo) * i / (points - 1))) for i in range(points))


def _seeds(raw, axes, base: dict, errors: Problems) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                       for s in raw):
        errors.add("tune.seeds", f"expected a non-empty list of seeds (integers >= 0), got {raw!r}")
        return ()
    if len(set(raw)) < len(raw):
        errors.add("tune.seeds", f"duplicate seed in {raw}")
    seed_axis = next((a for a in axes if a.name == "seed"), None)
    grid_seeds = set(seed_axis.values) if seed_axis else {(base.get("train") or {}).get("seed", 0)}
    shared = sorted(set(raw) & {int(s) for s in grid_seeds})
    if shared:
        errors.add("tune.seeds", f"seed(s) {shared} are also the grid's seeds: tuning seeds must differ, so the "
                   "main runs measure the chosen value on data and initialisations selection never saw")
    return tuple(raw)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
