"""The generic loader: a config dataclass filled from YAML, then from `key.sub=value` overrides, then validated.

Nothing here knows a schema. Every key is checked against the dataclass: an unknown key is an error that names its
full path and the closest valid key, a wrong type names the key, the value and the expected type. The value checks
declared next to the fields run last (`constraints.validate`). The file is read by `yaml_file.read_yaml` (UTF-8, no key
twice in one mapping); on the command line the last `key=value` of a key wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..atomic import atomic_write
from .constraints import ConfigError, validate
from .yaml_file import read_yaml

__all__ = ["ConfigError", "dump", "from_dict", "load", "save", "to_dict", "validate"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _short(value: object) -> str:
    """The value as written in an error, cut to a line (a YAML alias can make a small file hold a huge value)."""
    short = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 8, 60, 60
    return short.repr(value)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {_short(value)}")
        return _fill(tp(), value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {_short(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_short(value)} ({type(value).__name__})")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # PyYAML reads 1e-4 (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and _fits(value)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")


def _fits(value: int) -> bool:
    """Whether float(value) works (an int past 1.8e308 raises OverflowError there)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _valid_keys(cls: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        keys.append(path)
        tp = _strip_optional(typing.get_type_hints(cls)[f.name])
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, path + ".")
    return keys


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _unknown_key(key: str, cls: Any, prefix: str) -> ConfigError:
    keys = _valid_keys(cls, prefix)
    # Compare dotted paths without list indices so `data.train[0].rot` suggests `data.train.root`.
    bare = key.replace("[", ".[").split(".")
    bare = ".".join(p for p in bare if not p.startswith("["))
    close = difflib.get_close_matches(bare, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {key}{hint}")


def _fill(obj: T, values: dict, prefix: str) -> T:
    """Set fields of the dataclass instance `obj` from the mapping `values`, recursively."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    bare_prefix = ".".join(p.split("[")[0] for p in prefix.split(".")) if prefix else ""
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key(key, type(obj), bare_prefix + "." if bare_prefix else "")
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _fill(current, value, key)  # partial update keeps the other defaults of the section
        else:
            setattr(obj, name, _convert(value, tp, key))
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of more than 4300 digits (Python's limit)
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def _apply_override(cfg: Any, parts: list[str], value: Any, cls: Any) -> None:
    """Set one dotted key (list items as `name[i]`) on the config tree."""
    obj: Any = cfg
    walked: list[str] = []
    for depth, part in enumerate(parts):
        name, _, index = part.partition("[")
        key = ".".join(walked + [part])
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(".".join(parts), cls, "")  # the whole key, so the suggestion is a whole key
        last = depth == len(parts) - 1
        if index:
            seq = getattr(obj, name)
            i = int(index.rstrip("]")) if index.rstrip("]").isdigit() else -1
            if not isinstance(seq, list) or not 0 <= i < len(seq):
                n = len(seq) if isinstance(seq, list) else 0
                raise ConfigError(f"{key}: index out of range; {'.'.join(walked + [name])} has {n} entries")
            if last:
                elem_tp = typing.get_args(_strip_optional(typing.get_type_hints(type(obj))[name]))[0]
                seq[i] = _convert(value, elem_tp, key)
                return
            obj = seq[i]
        elif last:
            _fill(obj, {name: value}, ".".join(walked) if walked else "")
            return
        else:
            child = getattr(obj, name)
            if child is None:  # an optional section being switched on from the command line
                child = _strip_optional(typing.get_type_hints(type(obj))[name])()
                setattr(obj, name, child)
            obj = child
        walked.append(part)


def from_dict(cls: type[T], values: dict | None, source: str = "config", overrides: list[str] | None = None) -> T:
    """Build and validate a config of type `cls` from a mapping, then command-line overrides.

    Args:
        cls: the config dataclass (DinoConfig or RecogConfig).
        values: nested mapping as read from YAML; None means all defaults.
        source: name of where the values came from, used in error messages.
        overrides: items like `train.lr=0.001` or `data.train[0].root=/data/market`; values are parsed as YAML.

    Raises:
        ConfigError: naming the source, the key, the value and what was expected.
    """
    cfg = cls()
    try:
        if values is not None:
            if not isinstance(values, dict):
                raise ConfigError(f"expected a mapping at the top level, got {type(values).__name__}")
            _fill(cfg, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for item in overrides or []:
        try:
            parts, value = _parse_override(item)
            _apply_override(cfg, parts, value, cls)
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}{' + command line' if overrides else ''}: {e}") from None
    return cfg


def load(path: str | os.PathLike | None, overrides: list[str] | None, cls: type[T]) -> T:
    """Load a YAML config, apply `key.sub=value` overrides, and validate once.

    Args:
        path: YAML file; None uses the dataclass defaults only.
        overrides: items like `train.lr=0.001` or `data.train[0].root=/data/market`; values are parsed as YAML.
        cls: the config dataclass.

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the file or override, the key, the value and what was expected.
    """
    if path is None:
        return from_dict(cls, None, "defaults", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    values = read_yaml(p)
    return from_dict(cls, values if values is not None else {}, str(p), overrides)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-friendly values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically, so a crash never leaves half a file."""
    atomic_write(path, lambda fh: fh.write(dump(cfg).encode("utf-8")), "config")
