"""Allocation arms: how a grid names a layer-wise (or uniform) allocation and applies it.

An arm fixes the *shape* of a model across depth; its width comes from the
budget solver. In a grid, ``axes.allocation`` maps arm names to one of:

* ``openelm``: OpenELM's bounds alpha in [0.5, 1.0], beta in [0.5, 4.0], linear;
* a depth schedule name (``linear``, ``reverse``, ``middle``, ``ends``,
  ``constant``): OpenELM's bounds spread by that schedule;
* ``uniform`` (only under the name ``uniform``): the uniform twins, which are
  always generated for every layer-wise arm; listing them is optional;
* a mapping with ``qkv`` / ``ffn`` (a number, ``[min, max]`` bounds or a
  per-layer list, as in ``ModelConfig``), ``schedule`` (both) or
  ``qkv_schedule`` / ``ffn_schedule``, or explicit per-layer ``q_heads`` /
  ``ffn_dims`` (integers, converted to exact per-layer multipliers at the
  solved width). Keys left out come from ``base.model``.

Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elmjax.budget_match import mean_multipliers  # noqa: F401 - the twin's multipliers, shared with elmjax.bench
from elmjax.config_io import suggest
from elmjax.layout import layer_multipliers
from elmjax.model_config import SCHEDULES, ModelConfig, Multipliers

OPENELM_QKV = (0.5, 1.0)
OPENELM_FFN = (0.5, 4.0)
TWIN = "uniform"  # the reserved arm name of the uniform twins
_KEYS = ("qkv", "ffn", "schedule", "qkv_schedule", "ffn_schedule", "q_heads", "ffn_dims")


@dataclass(frozen=True)
class Arm:
    name: str
    qkv: Multipliers | None = None  # None: take base.model's
    ffn: Multipliers | None = None
    qkv_schedule: str | None = None
    ffn_schedule: str | None = None
    q_heads: tuple[int, ...] | None = None  # explicit per-layer query heads
    ffn_dims: tuple[int, ...] | None = None  # explicit per-layer FFN widths
    twin_marker: bool = False  # the 'uniform' entry: stands for the twins, trains nothing itself


def parse_arm(name: str, value) -> Arm:
    """An arm from its grid entry; ValueError with the reason if it is malformed."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"arm names must be non-empty strings, got {name!r}")
    if isinstance(value, str):
        return _shorthand(name, value)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a shorthand ({', '.join(('openelm', TWIN) + SCHEDULES)}) or a mapping, got {value!r}")
    if name == TWIN:
        raise ValueError(f"the name '{TWIN}' is reserved for the uniform twins (value '{TWIN}'); "
                         "give an explicit uniform arm another name")
    for key in value:
        if key not in _KEYS:
            raise ValueError(f"unknown key '{key}'{suggest(str(key), _KEYS)}; valid keys: {', '.join(_KEYS)}")
    if "schedule" in value and ({"qkv_schedule", "ffn_schedule"} & set(value)):
        raise ValueError("give either 'schedule' or 'qkv_schedule'/'ffn_schedule', not both")
    for a, b in (("qkv", "q_heads"), ("ffn", "ffn_dims")):
        if a in value and b in value:
            raise ValueError(f"give either '{a}' (multipliers) or '{b}' (explicit widths), not both")
    schedule = value.get("schedule")
    return Arm(
        name=name,
        qkv=parse_multipliers(value["qkv"], "qkv") if "qkv" in value else None,
        ffn=parse_multipliers(value["ffn"], "ffn") if "ffn" in value else None,
        qkv_schedule=parse_schedule(value.get("qkv_schedule", schedule)),
        ffn_schedule=parse_schedule(value.get("ffn_schedule", schedule)),
        q_heads=_widths(value["q_heads"], "q_heads") if "q_heads" in value else None,
        ffn_dims=_widths(value["ffn_dims"], "ffn_dims") if "ffn_dims" in value else None,
    )


def _shorthand(name: str, value: str) -> Arm:
    if value == TWIN:
        if name != TWIN:
            raise ValueError(f"the value '{TWIN}' (the uniform twins) is only valid under the arm name '{TWIN}'")
        return Arm(name=name, twin_marker=True)
    if name == TWIN:
        raise ValueError(f"the name '{TWIN}' is reserved for the uniform twins; its value must be '{TWIN}'")
    if value == "openelm":
        return Arm(name, OPENELM_QKV, OPENELM_FFN, "linear", "linear")
    if value in SCHEDULES:
        return Arm(name, OPENELM_QKV, OPENELM_FFN, value, value)
    options = ("openelm", TWIN) + SCHEDULES
    raise ValueError(f"unknown arm shorthand '{value}'{suggest(value, options)}; known: {', '.join(options)}")


def parse_multipliers(value, key: str) -> Multipliers:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{key}: must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key}: multipliers must be numbers, got {v!r}")
        if v <= 0:
            raise ValueError(f"{key}: multiplier {v} would give zero {'heads' if key == 'qkv' else 'FFN width'}; "
                             "multipliers must be > 0")
    if not isinstance(value, (list, tuple)):
        return float(value)
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"{key}: bounds [min, max] need min <= max, got {list(values)}; "
                         "for wide-early allocation use the 'reverse' schedule")
    return tuple(float(v) for v in values)


def parse_schedule(value) -> str | None:
    if value is None or value in SCHEDULES:
        return value
    raise ValueError(f"unknown schedule {value!r}{suggest(str(value), SCHEDULES)}; known: {', '.join(SCHEDULES)}")


def _widths(value, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key}: expected a per-layer list of integers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}: per-layer values must be integers >= 1, got {v!r}")
    return tuple(value)


def bounds_name(qkv: Multipliers, ffn: Multipliers, schedule: str | None = None) -> str:
    """'a0.5-1.0_b0.5-4.0' (+ '_middle'): the arm name of alpha/beta/schedule axes."""
    def part(v):
        return str(float(v)) if isinstance(v, (int, float)) else "-".join(str(float(x)) for x in v)

    return f"a{part(qkv)}_b{part(ffn)}" + (f"_{schedule}" if schedule else "")


def check_arm(arm: Arm, model: ModelConfig) -> str | None:
    """Why ``arm`` cannot be applied to ``model``'s depth/heads, or None."""
    n = model.num_layers
    for key, value in (("qkv", arm.qkv), ("ffn", arm.ffn)):
        if isinstance(value, tuple) and len(value) not in (2, n):
            return f"{key}: expected a number, [min, max] bounds or {n} per-layer values (num_layers={n}), got {len(value)}"
    for key, value in (("q_heads", arm.q_heads), ("ffn_dims", arm.ffn_dims)):
        if value is not None and len(value) != n:
            return f"{key}: {len(value)} per-layer values but num_layers is {n}"
    for key, value in (("q_heads", arm.q_heads), ("ffn_dims", arm.ffn_dims)):
        if value is not None and n == 2 and value[0] != value[1]:
            return f"{key}: explicit per-layer widths need num_layers != 2 (a 2-list of multipliers reads as bounds)"
    if arm.q_heads is not None:
        bad = [h for h in arm.q_heads if h % model.num_gqa_groups]
        if bad:
            return (f"q_heads: head counts {bad} are not divisible by the GQA groups "
                    f"(num_gqa_groups={model.num_gqa_groups})")
    if arm.ffn_dims is not None:
        bad = [f for f in arm.ffn_dims if f % model.ffn_dim_divisor]
        if bad:
            return f"ffn_dims: widths {bad} are not multiples of ffn_dim_divisor={model.ffn_dim_divisor}"
    return None


def apply_arm(arm: Arm, model: ModelConfig, width: int) -> ModelConfig:
    """``model`` at ``model_dim=width`` with the arm's allocation."""
    changes: dict = {"model_dim": int(width)}
    for field, value in (("qkv_multipliers", arm.qkv), ("ffn_multipliers", arm.ffn),
                         ("qkv_schedule", arm.qkv_schedule), ("ffn_schedule", arm.ffn_schedule)):
        if value is not None:
            changes[field] = value
    if arm.q_heads is not None:
        # Exact: make_divisible(width * h*hd/width, hd*groups) == h*hd for h divisible by groups.
        changes["qkv_multipliers"] = _per_layer(tuple(h * model.head_dim / width for h in arm.q_heads))
    if arm.ffn_dims is not None:
        changes["ffn_multipliers"] = _per_layer(tuple(f / width for f in arm.ffn_dims))
    out = dataclasses.replace(model, **changes)
    # A schedule does nothing to a scalar multiplier: call it 'constant' so an
    # explicit uniform arm and an identical uniform twin are one config (one run).
    for mult, sched in (("qkv_multipliers", "qkv_schedule"), ("ffn_multipliers", "ffn_schedule")):
        if isinstance(getattr(out, mult), (int, float)):
            out = dataclasses.replace(out, **{sched: "constant"})
    return out


def _per_layer(values: tuple[float, ...]) -> Multipliers:
    # ModelConfig reads a 2-tuple as [min, max] bounds; a 2-layer list of equal
    # values is the same as a scalar, unequal ones would be misread as bounds.
    if len(values) == 2:
        if values[0] == values[1]:
            return values[0]
        raise ValueError("explicit per-layer widths need num_layers != 2 (a 2-list reads as bounds)")
    return values


def is_uniform(model: ModelConfig) -> bool:
    """Every layer gets the same multipliers (the layout is the same at every depth)."""
    alphas = layer_multipliers(model.qkv_multipliers, model.qkv_schedule, model.num_layers)
    betas = layer_multipliers(model.ffn_multipliers, model.ffn_schedule, model.num_layers)
    return len(set(alphas)) == 1 and len(set(betas)) == 1


def multiplier_range(value: Multipliers, schedule: str, num_layers: int) -> tuple[float, float]:
    """(min, max) of the per-layer multipliers, for the results table."""
    per_layer = layer_multipliers(value, schedule, num_layers)
    return min(per_layer), max(per_layer)
