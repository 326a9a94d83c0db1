"""A run's process group (set-up, collectives, cross-rank checks), seeding and logging; DDP / FSDP2: `parallel`.

Every function works in a plain single process (not launched by torchrun, no process group), so tests, notebooks and
`python train_dino.py` need no special case. Under torchrun the backend is nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "init", "shutdown", "launched", "is_initialized", "get_rank", "get_world_size", "get_local_rank",
    "loader_workers", "is_main_process", "barrier", "all_reduce_mean", "all_reduce_sum", "all_reduce_max",
    "all_gather_variable", "all_gather_object", "broadcast_object", "run_on_main", "fingerprints", "is_dtensor",
    "check_replicated", "seed_everything", "setup_logging", "session",
]  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """True when the process was started by torchrun (the environment carries a world size)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def init(device: str = "auto", timeout_minutes: int = 30) -> torch.device:
    """Join the torchrun process group (if launched by torchrun) and pick this process's device.

    Args:
        device: "auto" (cuda when available), "cuda" or "cpu".
        timeout_minutes: how long a collective may wait before the job fails instead of hanging.

    Returns:
        The device this process computes on.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is cuda but CUDA is not available; use run.device=cpu (or auto)")
    if device == "cuda":
        torch.cuda.set_device(get_local_rank())
        dev = torch.device("cuda", get_local_rank())
    else:
        dev = torch.device("cpu")
    if launched() and not is_initialized():
        _die_with_launcher()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across elastic restarts (--max-restarts), and what a process group writes there
        # (a gloo peer's address, NCCL's unique id) outlives the attempt: a restarted rank may read a dead peer's
        # entry and fail or hang while connecting. A prefix per attempt keeps the restarted group apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"dino_recog/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        log.debug("rank %d/%d joined (%s on %s)", get_rank(), get_world_size(), backend, dev)
    return dev


def _die_with_launcher() -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this worker when the launcher process dies.

    torchrun starts every worker in a session of its own, so a SIGKILL to the launcher's process group (kill -9 by a
    scheduler, the OOM killer) would otherwise leave the workers running and writing the output directory while a
    restarted job starts a second set of them.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as e:
        log.debug("workers will not die with the launcher: %s", e)
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def shutdown() -> None:
    """Leave the process group; safe to call when there is none."""
    if is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: str = "auto") -> Iterator[torch.device]:
    """`with session(cfg.run.device) as dev:` joins the group and always leaves it, also on an exception.

    An exception on one rank is logged with its rank before the group is torn down, so the others fail at their
    next collective (after the timeout at worst) instead of waiting forever, and torchrun reports which rank failed.
    """
    dev = init(device)
    try:
        yield dev
    except BaseException:
        if get_world_size() > 1:
            log.error("rank %d failed; shutting down the process group", get_rank(), exc_info=True)
        raise
    finally:
        shutdown()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (a new tensor; the input is not changed)."""
    out = tensor.clone()
    if is_initialized():
        dist.all_reduce(out)
        out /= get_world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor; the input is not changed)."""
    out = tensor.clone()
    if is_initialized():
        dist.all_reduce(out)
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all processes (a new tensor; the input is not changed)."""
    out = tensor.clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_variable(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors whose first dimension differs per rank.

    Each rank contributes a (n_r, ...) tensor; every rank receives the list [t_0, ..., t_{W-1}] in rank order.
    Used to gather evaluation features, where the last shard is shorter. Other dimensions and dtype must agree.

    Args:
        tensor: (n_r, ...) on this rank's device.

    Returns:
        The per-rank tensors, trimmed to their true lengths.
    """
    if not is_initialized():
        return [tensor]
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad every shard to the longest, then cut each back.
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return [t[:n] for t, n in zip(out, lengths)]


def all_gather_object(obj: object) -> list:
    """Every rank's `obj` (picklable, e.g. RNG states), in rank order; `[obj]` when not distributed."""
    if not is_initialized():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (file writes); if it raises there, every rank raises.

    Without this, the other ranks would wait for rank 0 at their next collective, which under NCCL means until the
    timeout. Rank 0 re-raises the original exception; the others raise a RuntimeError carrying its message.

    Returns:
        `fn()` on rank 0, None on the other ranks.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank `src` to all ranks (e.g. a path decided on rank 0)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def fingerprints(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A (world, 3) summary of `tensors` from every rank, to check that replicated state is identical everywhere.

    Each row holds the sum, the sum of squares and a position-weighted sum of all values (float64), so a drift of a
    single value on one rank changes that rank's row. Rows are in rank order.
    """
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) / flat.numel()
    row = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]).unsqueeze(0)
    return torch.cat(all_gather_variable(row))


def _replicated(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and the buffers that must agree across ranks: all but BatchNorm statistics, which each rank keeps
    for its own batches (without SyncBatchNorm), and FSDP's sharded parameters (each rank holds another slice)."""
    stats = {id(b) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for b in m.buffers()}  # fmt: skip
    params = [p for p in module.parameters() if not is_dtensor(p)]
    return [*params, *(b for b in module.buffers() if id(b) not in stats)]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a parameter sharded by FSDP2: each rank holds a slice)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_replicated(parts: dict[str, torch.nn.Module], when: str) -> torch.Tensor | None:
    """Check that the replicated state of every part (see `fingerprints`) is identical on all ranks.

    Args:
        parts: name -> module, e.g. a task's `parts()`.
        when: where in the run, for the message (e.g. "epoch 3").

    Returns:
        The (world, 3) fingerprints of all parts together (saved in checkpoints), or None when nothing is
        replicated (every parameter sharded by FSDP, no other state).

    Raises:
        RuntimeError: naming the parts that differ, with their fingerprints per rank.
    """
    names, tensors = list(parts), [_replicated(m) for m in parts.values()]
    rows = [fingerprints(t) if t else None for t in tensors]
    differ = {name: r for name, r in zip(names, rows) if r is not None and not torch.equal(r, r[:1].expand_as(r))}
    if differ:
        raise RuntimeError(f"{when}: {', '.join(differ)} differ across ranks (fingerprint rows per rank):\n"
                           + "\n".join(f"{name}:\n{r}" for name, r in differ.items()))  # fmt: skip
    replicated = [x for t in tensors for x in t]
    return fingerprints(replicated) if replicated else None  # None: every tensor is sharded (FSDP)


def seed_everything(seed: int, per_rank: bool = True) -> int:
    """Seed python, numpy and torch; with `per_rank`, rank r uses seed + r so augmentations differ across ranks.

    Returns:
        The seed used on this process.
    """
    s = seed + (get_rank() if per_rank else 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        # Other ranks stay quiet except for warnings and errors, which carry their rank.
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


class _PrintableFormatter(logging.Formatter):
    """A file name that is not UTF-8 reaches Python surrogate-escaped (os.fsdecode); a line holding one cannot be
    encoded as UTF-8, and logging would print a traceback instead of it. Such characters are written escaped
    (`\\udcff`), so the line names the file and the log stays UTF-8."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        return text


class _LogFile(logging.FileHandler):
    """OUTPUT/log.txt. A line that cannot be written (the disk is full) is one warning on stderr, once, instead of
    logging's traceback for every record; the run itself stops at its next checkpoint, in one line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:  # FileHandler reopens a closed file outside its own error handling: a folder gone would end the run
            super().emit(record)
        except OSError:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if not self.failed:
            self.failed = True
            print(f"warning: {self.baseFilename}: {error.strerror or error}; lines are missing from it from here on",
                  file=sys.stderr)  # fmt: skip


def setup_logging(output_dir: str | None = None, level: int = logging.INFO) -> None:
    """Log to stderr (rank 0, plus warnings from every rank) and to OUTPUT/log.txt on rank 0.

    Called once by the entry scripts after `init`. Nothing overrides `print`.
    """
    root = logging.getLogger("dino_recog")
    root.setLevel(level)
    # Records also propagate to the root logger (no handlers in a script), so pytest and notebooks can capture them.
    for h in list(root.handlers):
        root.removeHandler(h)
    rank = get_rank()
    prefix = f"[rank {rank}] " if get_world_size() > 1 else ""
    fmt = _PrintableFormatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.addFilter(_RankFilter(rank))
    root.addHandler(stream)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        fh = _LogFile(os.path.join(output_dir, "log.txt"), encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)


_capped: set[int] = set()


def loader_workers(requested: int) -> int:
    """DataLoader workers for this process: `requested`, at most this process's share of the CPUs it may run on
    (the official default of 10 on a 2-core laptop only adds processes that wait for each other and a warning from
    torch). The images and their augmentation do not depend on the number of workers, so neither does the result."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if requested > share and requested not in _capped:
        _capped.add(requested)
        log.info("data.num_workers %d capped at %d: this process's share of the %d CPUs", requested, share, cpus)
    return min(requested, share)
