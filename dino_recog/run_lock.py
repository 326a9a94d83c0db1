"""One run per output directory: an exclusive lock on OUTPUT/.lock, taken by rank 0 when the run starts.

Two jobs writing one directory (a job launched twice, a requeue while the first still runs) would resume from each
other's checkpoints and interleave their logs. The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it
when its process dies however it dies, so a lock is never left behind, and unlike `flock` it is not shared with the
DataLoader workers a process forks, so a worker outliving a killed rank 0 for a moment cannot block the restart. The
file keeps the holder's host, pid and start time, which a refused run names and a later run reports when it takes
over the directory. (Over NFS the lock is as good as the server's lock manager.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLockedError", "lock_output_dir"]

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # directory -> file descriptor, for as long as this process runs there


class RunLockedError(RuntimeError):
    """Another live process holds the output directory."""


def lock_output_dir(output_dir: str | os.PathLike) -> str:
    """Hold OUTPUT/.lock for the rest of this process (a later run in the same process, as in the tests, takes it
    again).

    Returns:
        Who held it last ("" if nobody), for the run's log.

    Raises:
        RunLockedError: another process holds it; the message names that process and the directory.
    """
    output_dir = Path(output_dir).resolve()
    fd = _held.get(output_dir)
    if fd is None:  # a process's own POSIX locks never conflict: a second run in this process takes it again
        fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLockedError(
            f"run.output_dir {output_dir}: another run is writing there ({holder}); wait for it to end, stop it, or "
            "set another run.output_dir"
        ) from None
    previous = "" if output_dir in _held else os.pread(fd, 512, 0).decode(errors="replace").strip()
    me = f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (me + "\n").encode(), 0)
    _held[output_dir] = fd
    return previous
