"""Checkpoints: atomic saves, safe loads, auto-resume. Backbone weights from any source and the recognition model
are in `dino_recog.weights`, re-exported here.

A checkpoint is one dict of tensors and plain values with a `format_version`. It is written to a temporary file in
the same directory, flushed and fsynced, then renamed, so a crash never leaves a half-written file under the real
name; it is read with `torch.load(..., weights_only=True)`, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import pickletools
import random
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import parallel

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "find_resume",
    "load_training_state",
    "checkpoint_name",
    "check_state_dict",
    "prune_checkpoints",
    "shard_path",
    "rng_state",
    "set_rng_state",
    "resume_point",
]  # and, resolved from dino_recog.weights on first use, the names in _MOVED below

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# checkpoint_EEEE.pth after EEEE epochs; checkpoint_EEEE_SSSSSS.pth after EEEE epochs and SSSSSS steps of the next one;
# .dcp instead of .pth: a sharded checkpoint, a directory (sharded.py).
CKPT_RE = re.compile(r"^checkpoint_(\d{4,})(?:_(\d{6,}))?\.(?:pth|dcp)$")
# the temporary files of the run's atomic writes (atomic.py): checkpoints with their shards, and the exports; and the
# temporary directories of sharded checkpoints (with `-old`: one being replaced)
_TMP_RE = re.compile(
    r"^\.(?:(?:checkpoint_.*|teacher_backbone|model|best)\.pth|checkpoint_.*\.dcp)\.tmp-(\d+)(?:-old)?$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(state: Mapping, path: str | os.PathLike) -> Path:
    """Write `state` (plus `format_version`) atomically to `path`.

    If writing fails (disk full, no permission), the temporary file is removed and any previous file at `path` is
    left untouched; the error names the path.
    """
    from .atomic import atomic_write  # to the top of the module once the split of checkpoint.py has landed

    return atomic_write(path, lambda fh: torch.save({"format_version": FORMAT_VERSION, **state}, fh), "checkpoint")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with `weights_only=True` on the CPU; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Official DINO full checkpoints hold their argparse.Namespace under "args": allowed as plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(_unreadable(path, e)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    version = obj.get("format_version")
    if version is not None and (not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: format_version {version!r}, but this dino_recog reads format 1 to {FORMAT_VERSION}; "
            "it was written by another (newer?) version of dino_recog"
        )
    return obj


def _unreadable(path: Path, e: Exception) -> str:
    # The weights-only unpickler stops at the first global it does not allow (torch's long text names it).
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    names = [refused.group(1)] if refused else _pickled_globals(path) if "Weights only load failed" in str(e) else []
    if names:
        return (f"{path}: refused: it asks to load the Python object {', '.join(names)}, which a file of weights "
                "never needs; nothing in it was run")  # fmt: skip
    return f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})"


def _pickled_globals(path: Path) -> list[str]:
    """The objects a bare pickle (not torch's zip format) would import, read from its opcodes without running it."""
    try:
        if zipfile.is_zipfile(path):
            return []
        names, strings = [], []
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle either: say nothing more
        return []
    return list(dict.fromkeys(n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))))


def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """The file name of a training checkpoint after `epoch` epochs and `step_in_epoch` steps of the next one."""
    return f"checkpoint_{epoch:04d}.pth" if step_in_epoch == 0 else f"checkpoint_{epoch:04d}_{step_in_epoch:06d}.pth"


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` keeps its shard of checkpoint `path` (checkpoint_0003.rank1-of-4.pth): the
    state that differs by rank, such as a Partial FC classifier and its optimiser."""
    path = Path(path)  # .pth also beside a sharded checkpoint (checkpoint_0003.dcp): they are files
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}.pth")


def _shard_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}.rank*-of-*.pth"))


def _position(name: str) -> tuple[int, int] | None:
    m = CKPT_RE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint_EEEE.pth` and mid-epoch `checkpoint_EEEE_SSSSSS.pth` files in `output_dir`, newest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(pos, p) for p in d.iterdir() if (pos := _position(p.name)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def load_training_state(path: str | os.PathLike) -> dict:
    """A training checkpoint's state: the whole file, or for a sharded one (a `.dcp` directory) its `state.pth`
    with a None under each key DCP holds (`sharded.load_sharded` reads those)."""
    from . import sharded  # imports this module

    return sharded.read_sharded(path) if sharded.is_sharded(path) else load_checkpoint(path)


def _check_training_state(path: Path, state: dict, required: tuple[str, ...]) -> None:
    if "format_version" not in state:
        raise CheckpointError(
            f"{path}: not a dino_recog training checkpoint (no format_version); to start from these weights use "
            "model.pretrained (stage 2) or load_backbone_weights, not run.resume"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; not a training checkpoint of this stage")


def latest_checkpoint(output_dir: str | os.PathLike, required: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
    """The newest checkpoint in `output_dir` that loads and has the `required` keys.

    Unusable ones (truncated, corrupt, foreign, another format version) are reported and skipped, so a crash during
    the last save costs the steps since the one before, not the run.

    Returns:
        (path, state), or None when `output_dir` holds no checkpoint file at all.

    Raises:
        CheckpointError: there are checkpoint files but none is usable (starting over would silently mix a new run
            with the files of the old one); the message lists each file and what is wrong with it.
    """
    problems = []
    for path in list_checkpoints(output_dir):
        try:
            state = load_training_state(path)
            _check_training_state(path, state, required)
            if problems:
                log.warning("resuming from %s, the newest usable checkpoint", path)
            return path, state
        except CheckpointError as e:
            log.warning("skipping unusable checkpoint: %s", e)
            problems.append(str(e))
    if problems:
        raise CheckpointError(
            f"{output_dir}: no usable checkpoint among {len(problems)}:\n  " + "\n  ".join(problems)
            + "\nmove them away, or write the run into another run.output_dir"
        )  # fmt: skip
    return None


def find_resume(resume: str, output_dir: str | os.PathLike, required: tuple[str, ...]) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from: `resume` "" (none), "auto" (newest usable in output_dir) or a path."""
    if resume == "":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir, required)
    state = load_training_state(resume)
    _check_training_state(Path(resume), state, required)
    return Path(resume), state


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep_last` checkpoints (end-of-epoch and mid-epoch alike), keeping every end-of-epoch
    checkpoint whose epoch is a multiple of `keep_every`, with their per-rank shards; also delete temporary files that
    a killed process left."""
    for path in list_checkpoints(output_dir)[keep_last:]:
        epoch, step = _position(path.name)
        if not (keep_every and step == 0 and epoch % keep_every == 0):
            _remove(path)  # first: a checkpoint without its shards is never picked
            for shard in _shard_files(path):
                shard.unlink(missing_ok=True)
    for path in Path(output_dir).iterdir():
        m = _TMP_RE.match(path.name)
        if m and int(m.group(1)) != os.getpid():  # left by a process that died while saving
            _remove(path)


def _remove(path: Path) -> None:
    """A checkpoint file, or a sharded checkpoint's directory (its name first, so it is never seen half-deleted)."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    doomed = path.with_name(f".{path.name}.tmp-{os.getpid()}-old")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """Load `state` into `module` strictly, or raise a CheckpointError that names the file and lists every key whose
    shape differs (with both shapes) and every missing or unexpected key.

    Args:
        what: which part of the checkpoint this is (e.g. "student"), for the message.
    """
    own = module.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    problems += [f"{k}: missing from the checkpoint" for k in own if k not in state]
    problems += [f"{k}: in the checkpoint, not in the model" for k in state if k not in own]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(
            f"{path}: the {what} weights do not fit the configured model (another architecture or config?); "
            f"{len(problems)} mismatched keys:\n  " + "\n  ".join(shown)
        )
    parallel.load_full_state_dict(module, state)  # a module sharded by FSDP keeps this rank's slice


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_point(state: Mapping, path: str | os.PathLike, rank: int, world_size: int) -> tuple[int, int, dict | None]:
    """Where a training checkpoint continues: (epoch, step within that epoch, this rank's RNG state or None).

    An end-of-epoch checkpoint gives step 0 and no RNG state: the training scripts reseed every epoch from
    (seed, epoch, rank). A mid-epoch one (`step_in_epoch` > 0) gives the RNG state each rank had when it was written
    (key `rng`, one per rank), if the number of processes is the same; with another number the data of the rest of
    that epoch is split differently anyway, so the run goes on, not bit-identical to an uninterrupted one, with a
    warning.
    """
    epoch, step = int(state["epoch"]), int(state.get("step_in_epoch", 0))
    if step == 0:
        return epoch, 0, None
    rngs = state.get("rng")
    if not isinstance(rngs, list) or len(rngs) != world_size:
        n = len(rngs) if isinstance(rngs, list) else "an unknown number of"
        log.warning("%s was written by %s processes, this run has %d: the rest of epoch %d sees its data in another "
                    "order than an uninterrupted run would", path, n, world_size, epoch)  # fmt: skip
        return epoch, step, None
    return epoch, step, rngs[rank]


# ---------------------------------------------------------------------------------------------------------------------
# Backbone weights from any source and the recognition model live in `weights` (dino_recog/weights.py); their names
# stay reachable here (`checkpoint.load_backbone_weights`, ...). Resolved on first use: `weights` imports this module.

_MOVED = (
    "extract_backbone_state",
    "_resize_pos_embed",
    "_match_layerscale",
    "peek_checkpoint",
    "load_backbone_weights",
    "save_backbone",
    "read_backbone_spec",
    "pretrained_backbone_spec",
    "open_feature_model",
    "load_feature_model",
    "save_reid_model",
    "load_reid_model",
)


def __getattr__(name: str):
    if name in _MOVED:
        from . import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
