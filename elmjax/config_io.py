"""Strict YAML <-> frozen-dataclass configs with dotted overrides.

Every config in elmjax is a frozen dataclass. This module is the only place
that turns untrusted mappings (YAML files, ``key=value`` overrides, grid
cells) into those dataclasses, so every error a user can make here names the
file, the dotted key and the reason, and suggests the nearest valid key.

Pure Python + PyYAML: importing it must never pull in JAX.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config value or key is invalid. The message names source, key and reason."""


def _where(source: str | None, path: str) -> str:
    loc = path or "<root>"
    return f"{source}: {loc}" if source else loc


def suggest(key: str, options: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' if none is close."""
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, tp: Any, source: str | None, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try scalar types before containers so "1.0" stays a float.
        for arg in sorted(args, key=lambda a: typing.get_origin(a) is not None):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, path)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{_where(source, path)}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, source=source, path=path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, path)}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{_where(source, path)}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, source, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(source, path)}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return types.MappingProxyType(
            {_coerce(k, kt, source, path): _coerce(v, vt, source, _join(path, str(k))) for k, v in value.items()}
        )
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{_where(source, path)}: {value!r} is not one of {list(allowed)}{suggest(str(value), map(str, allowed))}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(source, path)}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # PyYAML reads '1e-3' (no dot) as a string; accept numeric strings.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{_where(source, path)}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, path)}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, path)}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # programming error


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is typing.Literal:
        return "one of " + "/".join(map(str, typing.get_args(tp)))
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def from_dict(cls: type, data: Any, *, source: str | None = None, path: str = ""):
    """Build frozen dataclass ``cls`` from a mapping; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, path)}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            moved = getattr(cls, "MOVED_KEYS", {}).get(key)
            if moved:
                raise ConfigError(f"{_where(source, _join(path, str(key)))}: moved to '{moved}'")
            raise ConfigError(
                f"{_where(source, _join(path, str(key)))}: unknown key{suggest(str(key), fields)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], source, _join(path, key))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_where(source, path)}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_where(source, path)}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{_where(source, path)}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe structure (dicts, lists, scalars) of a config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with an error naming the file if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: invalid value: {e}") from None
    return key, value


def set_dotted(data: dict, cls: type, dotted: str, value: Any, *, source: str = "override") -> dict:
    """Return a copy of ``data`` with ``dotted`` set, checking the path against ``cls``."""
    parts = dotted.split(".")
    out = _deepcopy(data)
    node, node_cls, walked = out, cls, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else None
        if fields is None or part not in fields:
            options = fields or {}
            raise ConfigError(
                f"{source}: {_join(walked, part)}: unknown key{suggest(part, options)}"
                + (f"; valid keys: {', '.join(sorted(options))}" if options else "")
            )
        walked = _join(walked, part)
        if i == len(parts) - 1:
            node[part] = value
        else:
            child_cls = typing.get_type_hints(node_cls)[part]
            if not dataclasses.is_dataclass(child_cls):
                raise ConfigError(f"{source}: {walked}: is a value, not a section")
            existing = node.get(part)
            if existing is None:
                existing = {}
            elif not isinstance(existing, dict):
                existing = to_dict(existing)
            node[part] = existing
            node, node_cls = existing, child_cls
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load(cls: type, path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *, data: dict | None = None):
    """Load ``cls`` from a YAML file (or ``data``) plus dotted overrides."""
    source = str(path) if path is not None else "<config>"
    raw = load_yaml(path) if path is not None else _deepcopy(data or {})
    for text in overrides:
        key, value = parse_override(text)
        raw = set_dotted(raw, cls, key, value, source=f"override {text!r}")
    return from_dict(cls, raw, source=source)


# Read once at import: setting the umask is process-wide, and briefly changing
# it while other threads (async checkpoint writers) create files is a race.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: typing.Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move the file onto ``path`` atomically:
    readers see the old or the new file, never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would,
        # so collaborators on a shared disk can read run files.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
