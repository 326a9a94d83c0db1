"""Value checks declared next to the config fields, and `validate`, which runs them over a whole config tree.

`lr: float = positive(5e-4)` declares a field whose value must be finite and > 0; `validate(cfg)` checks every field
of the tree, sections in lists included, then each dataclass's own `validate(self, path)` for what involves several of
its fields. A failed check is a ConfigError `key: problem` with the key as a full path (`data.train[0].name`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NON_NEGATIVE",
    "POSITIVE",
    "ConfigError",
    "Constraint",
    "at_most",
    "check",
    "choice",
    "declare",
    "each",
    "finite",
    "is_finite",
    "non_negative",
    "one_of",
    "positive",
    "range_pair",
    "unit_interval",
    "validate",
]

_CHECKS = "dino_recog.config.checks"  # the key of the declared constraints in a field's metadata


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


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


def at_most(limit: float) -> Constraint:
    """An upper bound on a size: a typo (`out_dim: 6553600`) would otherwise allocate for minutes and then hang."""
    return Constraint(lambda v: v <= limit, f"{{value}}; expected at most {limit}")


def positive(default: Any, limit: float | None = None) -> Any:
    """A finite value > 0 (and <= `limit` when given); for a tuple (a size), each of its items."""
    bound = [] if limit is None else [at_most(limit)]
    return declare(default, *_per_item(default, finite("> 0"), POSITIVE, *bound))


def non_negative(default: Any, limit: float | None = None) -> Any:
    """A finite value >= 0 (and <= `limit` when given); for a tuple, each of its items."""
    bound = [] if limit is None else [at_most(limit)]
    return declare(default, *_per_item(default, finite(">= 0"), NON_NEGATIVE, *bound))


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
