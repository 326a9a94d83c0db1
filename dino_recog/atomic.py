"""Replacing a file so that a crash, a full disk or a failing writer never leaves half a file under its name; and a
set of files that belong together (features and their file list) so that they are never seen from two writes."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_together"]

Writer = Callable[[BinaryIO], None]


def _temp_name(path: Path) -> Path:
    # In the same directory (a rename is atomic only within one file system); the pid keeps concurrent processes
    # apart and lets a cleaner tell a dead writer's leftovers.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error(e: BaseException) -> OSError | None:
    """`e` if it is an OSError, else a no-space OSError it was raised from or while handling: on a really full disk
    torch.save's zip writer turns the file's `OSError: No space left on device` into a RuntimeError ("unexpected pos
    64 vs 0") raised while handling it. Other chained errors stay what they are (a writer's bug keeps its traceback)."""
    if isinstance(e, OSError):
        return e
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _failed(e: OSError, what: str, path: Path, previous: str) -> OSError:
    """The OSError to raise for a failed write: what, where, why and what was kept, with the original errno."""
    message = f"could not write {what} {path}: {e.strerror or e}; {previous}"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def _write_temp(path: Path, write: Writer) -> Path:
    """`write` into the temporary file of `path`, flushed and fsynced; the temporary file is removed if it fails."""
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):  # the original error matters, not a failed clean-up
            tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    try:  # make the renames durable; some file systems cannot fsync a directory, which is no reason to fail
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Writer, what: str = "file") -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, rename it to `path` and fsync the directory.

    The temporary file is `.{name}.tmp-{pid}` in the same directory. It is removed on any failure, an exception
    raised by `write` included, and the previous file at `path`, if any, is left as it was.

    Args:
        path: the file to write; its directory is created when missing.
        write: writes the whole content to the binary file object it is given.
        what: what the file is, for the error message (e.g. "checkpoint").

    Returns:
        `path` as a Path.

    Raises:
        OSError: `could not write {what} {path}: {reason}; the previous one is intact`, with the original errno, for
            an OSError from `write` or another exception raised from or while handling one (torch.save on a full
            disk). Any other exception from `write` is re-raised unchanged (after the clean-up).
    """
    path = Path(path)
    tmp = None
    try:
        tmp = _write_temp(path, write)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        os_error = _os_error(e)
        if os_error is not None and isinstance(e, Exception):
            raise _failed(os_error, what, path, "the previous one is intact") from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_together(files: Sequence[tuple[str | os.PathLike, Writer, str]]) -> list[Path]:
    """Write several files that belong together (`(path, write, what)` each, in one directory or several) so that
    the last one is never seen beside an older version of the others.

    Readers look for the last file (e.g. `feats.npy` of `feats.npy` + `feats.txt`): it exists only when the files
    before it are of the same write. Every temporary file is written and fsynced first, so a failing writer or a full
    disk leaves all previous files as they were. Then the previous last file is removed, the others are renamed into
    place, and the last is renamed last. A crash among the renames therefore leaves no last file (no result, never a
    mismatched pair), and a rerun writes them all again.

    Returns:
        the paths, in the order given.

    Raises:
        OSError: `could not write {what} {path}: {reason}; ...` naming the file that failed and what was kept, with
            the original errno. Any other exception from a writer is re-raised unchanged. Temporary files are removed.
    """
    paths = [Path(p) for p, _, _ in files]
    temps: list[Path] = []
    try:
        for path, (_, write, what) in zip(paths, files):
            try:
                temps.append(_write_temp(path, write))
            except Exception as e:
                if (os_error := _os_error(e)) is None:
                    raise
                raise _failed(os_error, what, path, "the previous files are intact") from e
        last, last_what = paths[-1], files[-1][2]
        try:
            last.unlink(missing_ok=True)  # from here until the last rename there is no result rather than a mixed one
            _fsync_dir(last.parent)  # the removal on disk before any rename: a power cut cannot keep the old last file
            for tmp, path in zip(temps, paths):
                os.replace(tmp, path)
        except OSError as e:
            raise _failed(e, last_what, last, f"{last} is absent until a rerun writes it") from e
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # already renamed: nothing there
    for folder in dict.fromkeys(p.parent for p in paths):
        _fsync_dir(folder)
    return paths
