"""Command-line handling shared by the entry scripts: `--config PATH` then `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeVar

from . import config as C

__all__ = ["load_config"]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def load_config(cls: type[T], default_config: str, description: str, argv: list[str] | None = None) -> T:
    """Parse `[--config PATH] [key.sub=value ...]` and load the config; a config error exits with its message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(ROOT / default_config), help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    args = parser.parse_args(argv)
    try:
        return C.load(args.config, args.overrides, cls=cls)
    except C.ConfigError as e:
        sys.exit(f"config error: {e}")
