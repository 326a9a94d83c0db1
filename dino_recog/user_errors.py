"""What a command-line tool does with a mistake its user can fix (a missing file or folder, an unreadable checkpoint,
a data-set layout error, a full disk): one `error: ...` line and exit status 2, not a traceback. A ValueError that is
not one of ours (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .launch import record_worker_error

__all__ = ["check_output_paths", "finite_float", "positive_float", "positive_int", "user_errors"]

_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Around a tool's work: a missing file or folder, an unreadable checkpoint, a data-set layout error or a full
    disk ends the program with one `error: ...` line (exit status 2) instead of a traceback."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
        if not _is_user_error(e):
            raise
        message = f"error: {_one_line(e)}"
        print(message, file=sys.stderr)
        record_worker_error(message)  # under train.sh, also the run's last line (dino_recog.launch)
        sys.exit(2)


def _is_user_error(e: Exception) -> bool:
    if isinstance(e, OSError):
        return isinstance(e, _OS_ERRORS) or e.errno == errno.ENOSPC
    # Imported here, when one was raised: `report` never loads torch.
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.datasets import CorruptImageError
    from .data.parsers import DatasetLayoutError
    from .run_lock import RunLockedError

    return isinstance(e, (CheckpointError, ConfigError, CorruptImageError, DatasetLayoutError, RunLockedError))


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # without the "[Errno N]" prefix, with the file named
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def check_output_paths(
    files: Mapping[str, str | None] | None = None, folders: Mapping[str, str | None] | None = None
) -> None:
    """Before any work: each output file's folder is created (a file cannot be a folder), each output folder is a
    folder, so that a result is never computed and then lost for want of a place to write it."""
    for flag, name in (files or {}).items():
        if name is None:
            continue
        path = Path(name)
        if path.is_dir():
            raise IsADirectoryError(f"{flag} {path}: is a folder; expected a file name")
        _make_folder(flag, path.parent)
    for flag, name in (folders or {}).items():
        if name is not None:
            _make_folder(flag, Path(name))


def _make_folder(flag: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{flag}: {folder} is a file, not a folder") from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{flag}: cannot write into {folder}")


# argparse types: a flag's value checked where it is read (`--temperature 0` would give inf votes, `--mean nan`
# NaN features, `--k 0` an empty neighbourhood).
def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number > 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer > 0")
    return value
