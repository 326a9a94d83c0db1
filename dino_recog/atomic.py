"""Replacing a file so that a crash, a full disk or a failing writer never leaves half a file under its name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "file") -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, rename it to `path` and fsync the directory.

    The temporary file is `.{name}.tmp-{pid}` in the same directory (a rename is atomic only within one file
    system; the pid keeps concurrent processes apart and lets a cleaner tell a dead writer's leftovers). It is
    removed on any failure, an exception raised by `write` included, and the previous file at `path`, if any, is
    left as it was.

    Args:
        path: the file to write; its directory is created when missing.
        write: writes the whole content to the binary file object it is given.
        what: what the file is, for the error message (e.g. "checkpoint").

    Returns:
        `path` as a Path.

    Raises:
        OSError: `could not write {what} {path}: {reason}; the previous one is intact`, with the original errno.
            Any other exception from `write` is re-raised unchanged (after the clean-up).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the original error matters, not a failed clean-up
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            message = f"could not write {what} {path}: {e.strerror or e}; the previous one is intact"
            raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
        raise
    try:  # make the rename itself durable; some file systems cannot fsync a directory, which is no reason to fail
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
