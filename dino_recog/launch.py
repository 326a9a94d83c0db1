"""torchrun, ending a failed run with the worker's own one-line error instead of torchrun's report.

    python -m dino_recog.launch [torchrun options] SCRIPT [ARGS...]      # what train.sh runs

It is `torch.distributed.run` itself (same options, same elastic agent, signal handling and restarts), run in this
process so that its `ChildFailedError` can be read: a worker that stops on a mistake its user can fix prints one
`error: ...` line (`user_errors`) and also leaves it in a folder this launcher gives every worker
(`DINO_RECOG_ERROR_DIR`), under the worker's pid. When every failed worker left such a line, the run ends with those
lines (once each, with the ranks that printed it) and the worker's exit status, rather than torchrun's ~35-line
report of the failed processes. When no failed worker left one (a bug, a kill), torchrun's full report stays.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

__all__ = ["ERROR_DIR_ENV", "main", "record_worker_error"]

ERROR_DIR_ENV = "DINO_RECOG_ERROR_DIR"


def record_worker_error(message: str) -> None:
    """In a worker started by this launcher: leave its one-line error where the launcher reads it (else: nothing)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and os.path.isdir(folder):
        # Named by pid: after an elastic restart, a rank's new process does not inherit its predecessor's message.
        (Path(folder) / f"{os.getpid()}.txt").write_text(message, errors="backslashreplace")


def worker_messages(folder: str | os.PathLike, failures: dict) -> list[str]:
    """The last lines of a failed run, from `ChildFailedError.failures` (global rank -> ProcessFailure): first the
    failed workers that left no one-line error (named by rank and exit status: their own output is above; not those
    torchrun itself stopped with SIGTERM once another had failed), then each one-line error once, with the ranks that
    gave it; empty when no failed worker left a line."""
    silent, errors = [], {}
    for rank in sorted(failures):
        path = Path(folder) / f"{failures[rank].pid}.txt"
        if path.is_file():
            errors.setdefault(path.read_text().strip(), []).append(rank)
        elif failures[rank].exitcode != -signal.SIGTERM:  # SIGTERM: stopped by torchrun after another one failed
            silent.append(f"rank {rank} failed with exit status {failures[rank].exitcode} (its output is above)")
    if not errors:
        return []
    return silent + [f"{m}  [{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))}]" for m, r in errors.items()]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dino_recog_errors_") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # inherited by the workers torchrun starts
        try:
            run(args)
        except ChildFailedError as e:
            lines = worker_messages(folder, e.failures)
            if not lines:
                raise
            print("\n".join(lines), file=sys.stderr)
            # the status of a worker that left a line: the first failure may be one torchrun stopped (SIGTERM)
            status = [f.exitcode for f in e.failures.values() if (Path(folder) / f"{f.pid}.txt").is_file()]
            sys.exit(status[0] if status and status[0] > 0 else 1)


if __name__ == "__main__":
    main()
