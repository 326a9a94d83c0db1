"""The generic loader: a config dataclass filled from YAML, then from `key.sub=value` overrides, then validated.

Nothing here knows a schema. Every key is checked against the dataclass: an unknown key is an error that names its
full path and the closest valid key, a wrong type names the key, the value and the expected type. Value checks are
declared next to the fields (`lr: float = positive(5e-4)`) and `validate` checks them for every field of the tree,
sections in lists included; what involves several fields stays in a small `validate(self, path)` method of the
dataclass that holds them, called after its fields passed. A file must be UTF-8 YAML text, and a key given twice in one
of its mappings is an error (on the command line the last `key=value` of a key wins).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..atomic import atomic_write

__all__ = [
    "NON_NEGATIVE",
    "POSITIVE",
    "ConfigError",
    "Constraint",
    "check",
    "choice",
    "declare",
    "dump",
    "each",
    "finite",
    "is_finite",
    "from_dict",
    "load",
    "non_negative",
    "one_of",
    "positive",
    "range_pair",
    "save",
    "to_dict",
    "unit_interval",
    "validate",
]

T = TypeVar("T")

_CHECKS = "dino_recog.config.checks"  # the key of the declared constraints in a field's metadata


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------------------------
# Declared constraints


@dataclass(frozen=True)
class Constraint:
    """A condition on one value and what the error says when it fails.

    `text` follows `key: `; `{value}` in it stands for the value as YAML would show it (strings quoted, tuples as
    lists), e.g. "{value}; expected a value > 0". With `items`, each item of a tuple or list is checked and the
    first that fails is shown.
    """

    ok: Callable[[Any], bool]
    text: str
    items: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        for v in value if self.items else [value]:
            if not self.ok(v):
                return self.text.replace("{value}", repr(list(v) if isinstance(v, tuple) else v))
        return None


POSITIVE = Constraint(lambda v: v > 0, "{value}; expected a value > 0")
NON_NEGATIVE = Constraint(lambda v: v >= 0, "{value}; expected a value >= 0")


def is_finite(v: Any) -> bool:
    """False for a float NaN or +-inf; ints (never infinite, and maybe too large for a float) pass."""
    return not isinstance(v, float) or math.isfinite(v)


def finite(expected: str = "") -> Constraint:
    """Refuses NaN and +-inf, which `v > 0` and `v >= 0` let through (inf) or refuse saying the wrong thing (nan):
    an infinite learning rate, temperature or weight trains on garbage. `expected` completes "a finite value"."""
    return Constraint(is_finite, "{value}; expected a finite value" + (f" {expected}" if expected else ""))


def each(inner: Constraint) -> Constraint:
    """`inner` for every item of a tuple or list."""
    return dataclasses.replace(inner, items=True)


def one_of(*allowed: Any) -> Constraint:
    return Constraint(lambda v: v in allowed, "{value} is not one of " + ", ".join(map(repr, allowed)))


def check(key: str, value: Any, *constraints: Constraint) -> None:
    """Raise a ConfigError `key: problem` for the first of `constraints` that `value` fails (for `validate` methods)."""
    for c in constraints:
        problem = c.problem(value)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def declare(default: Any, *constraints: Constraint) -> Any:
    """A dataclass field with `default` (copied per instance when mutable) whose value must pass `constraints`."""
    metadata = {_CHECKS: constraints}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _per_item(default: Any, *constraints: Constraint) -> list[Constraint]:
    return [each(c) for c in constraints] if isinstance(default, tuple) else list(constraints)


def positive(default: Any) -> Any:
    """A finite value > 0; for a tuple (a size), each of its items."""
    return declare(default, *_per_item(default, finite("> 0"), POSITIVE))


def non_negative(default: Any) -> Any:
    """A finite value >= 0; for a tuple, each of its items."""
    return declare(default, *_per_item(default, finite(">= 0"), NON_NEGATIVE))


def unit_interval(default: float, open_right: bool = False) -> Any:
    """A value in [0, 1], or [0, 1) with `open_right`."""
    if open_right:
        return declare(default, Constraint(lambda v: 0 <= v < 1, "{value}; expected a value in [0, 1)"))
    return declare(default, Constraint(lambda v: 0 <= v <= 1, "{value}; expected a value in [0, 1]"))


def choice(*allowed: Any, default: Any = None) -> Any:
    """One of `allowed`; the default is the first unless given."""
    return declare(allowed[0] if default is None else default, one_of(*allowed))


def range_pair(default: tuple[float, float], zero_low: bool = False) -> Any:
    """(low, high) with 0 < low <= high <= 1, or 0 <= low with `zero_low`."""
    if zero_low:
        pair = Constraint(lambda v: 0 <= v[0] <= v[1] <= 1, "{value} is not a range 0 <= low <= high <= 1")
    else:
        pair = Constraint(lambda v: 0 < v[0] <= v[1] <= 1, "{value} is not a range 0 < low <= high <= 1")
    return declare(default, pair)


def validate(cfg: Any, path: str = "") -> None:
    """Check every field's declared constraints, depth first, then the dataclass's own `validate(path)` if it has one.

    Raises:
        ConfigError: `key: problem`, the key as a full path (`data.train[0].name`).
    """
    for f in dataclasses.fields(cfg):
        key = f"{path}.{f.name}" if path else f.name
        value = getattr(cfg, f.name)
        if value is None:  # an optional section or value switched off
            continue
        check(key, value, *f.metadata.get(_CHECKS, ()))
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{key}[{i}]")
    own = getattr(cfg, "validate", None)
    if own is not None:
        own(path)


# --------------------------------------------------------------------------------------------------------------------
# Reading a file


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently).

    A repeated `lr:` under `train:` is an edit that did not take, or an old value left behind; either way the file
    does not say what the run will use. `construct_document` first notes every mapping's dotted path so that the
    error can name the key in full.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.paths: dict[int, str] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._note_paths(node, "")
        return super().construct_document(node)

    def _note_paths(self, node: yaml.Node, path: str) -> None:
        if id(node) in self.paths:  # an alias met again (or a recursive one)
            return
        if isinstance(node, yaml.MappingNode):
            self.paths[id(node)] = path
            for k, v in node.value:
                key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                self._note_paths(v, f"{path}.{key}" if path else key)
        elif isinstance(node, yaml.SequenceNode):
            self.paths[id(node)] = path
            for i, v in enumerate(node.value):
                self._note_paths(v, f"{path}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for k, _ in node.value:  # the keys as written, before `<<` merges (which a written key may override)
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(k)
            try:
                line = first.setdefault(key, k.start_mark.line + 1)
            except TypeError:  # an unhashable key; the safe constructor refuses it below
                continue
            if line != k.start_mark.line + 1:
                path = self.paths.get(id(node), "")
                raise ConfigError(
                    f"key {f'{path}.{key}' if path else key} given twice, at lines {line} and "
                    f"{k.start_mark.line + 1}; expected each key once (the second would replace the first)"
                )
        return super().construct_mapping(node, deep)


def _read_yaml(p: Path) -> Any:
    """The YAML document in `p`, or a one-line ConfigError naming the file and, for a syntax error, the line."""
    try:
        text = p.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not content
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: not a UTF-8 YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8); "
            "expected a YAML config"
        ) from None
    loader = None
    try:
        loader = _StrictLoader(text)  # checks that every character is printable
        return loader.get_single_data()
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.reader.ReaderError as e:  # a control character: binary data that happens to be valid UTF-8
        raise ConfigError(
            f"{p}: not a YAML text file (control character #x{e.character:04x} at offset {e.position}); "
            "expected a YAML config"
        ) from None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else "?"
        context = ""
        if e.context:
            cm = e.context_mark
            context = f" ({e.context}" + (f" from line {cm.line + 1}, column {cm.column + 1})" if cm else ")")
        raise ConfigError(f"{p}: not valid YAML at {where}: {e.problem}{context}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of more than 4300 digits (Python's limit)
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()


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
    values = _read_yaml(p)
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
