"""Grid axes: parse each axis under ``axes:`` and check that they fit together.

First-class axes: ``allocation`` (named arms, see ``sweeps.arms``), ``alpha`` /
``beta`` / ``schedule`` (arms built from bounds), ``budget`` (``{kind, values}``),
``tokens`` (see ``sweeps.tokens``), and the setters ``num_layers``,
``head_dim``, ``lr`` and ``seed`` (data and init seed). Any other name is a
dotted ``Config`` path. Pure Python.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from elmjax.config import Config
from elmjax.config_io import suggest
from sweeps.arms import TWIN, parse_arm, parse_multipliers, parse_schedule
from sweeps.budget import KINDS
from sweeps.naming import compact_number
from sweeps.problems import Problems
from sweeps.tokens import parse_tokens

ARM_PARTS = ("alpha", "beta", "schedule")
SETTERS = {"num_layers": ("model.num_layers",), "head_dim": ("model.head_dim",), "lr": ("optimizer.lr",),
           "seed": ("data.seed", "train.seed")}
FIRST_CLASS = ("allocation", "budget", "tokens") + ARM_PARTS + tuple(SETTERS)
_SHORT = {"num_layers": "L", "head_dim": "hd", "lr": "lr", "seed": "s"}
_BUDGET_PREFIX = {"params": "N", "non_embedding_params": "NE", "flops": "C"}
SWEEP_OWNED = ("run_dir", "name")
_ARM_FIELDS = ("model.qkv_multipliers", "model.ffn_multipliers", "model.qkv_schedule", "model.ffn_schedule")



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



def parse_axis(name: str, value, errors: Problems) -> Axis | None:
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
        m = parse_multipliers(v, "qkv" if name == "alpha" else "ffn")
        return m, ""
    if name == "schedule":
        if parse_schedule(v) is None:
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
    return freeze(v), f"{leaf}{_label_value(v)}"


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


def freeze(v):
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def _allocation_axis(value, errors: Problems) -> Axis | None:
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


def _budget_axis(value, errors: Problems) -> Axis | None:
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


def _check_path(dotted: str, errors: Problems) -> bool:
    """A dotted axis must name a value (not a section) of Config, and not one the sweep owns."""
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
    if dotted in SWEEP_OWNED:
        errors.add(where, f"'{dotted}' is set by the sweep for every run")
        return False
    return True


def check_conflicts(axes: tuple[Axis, ...], errors: Problems) -> None:
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
