"""Sharded training checkpoints (`run.checkpoint_format: sharded`): a directory written by every rank at once with
`torch.distributed.checkpoint` (DCP), no gather to rank 0, that loads on any number of processes (DCP reshards).

`checkpoint_EEEE[_SSSSSS].dcp/` holds DCP's files (`__R_0.distcp` per rank, `.metadata`) with every tensor of the
task's parts and of the optimisers' states, and `state.pth`: the rest (position, RNG streams, config, optimiser
hyper-parameters), a plain `torch.save` that `checkpoint.load_checkpoint` reads with `weights_only=True`.

Atomic at the directory level: every rank writes into `.checkpoint_....dcp.tmp-PID` (PID: rank 0's), DCP fsyncs
each file and rank 0 writes `.metadata` once all ranks are done; then rank 0 adds `state.pth`, renames the directory
into place and fsyncs its parent. Auto-resume lists only the final names, and pruning removes the temporary
directories of dead writers, so a half-written checkpoint is never resumed.

DCP's own reader unpickles `.metadata` with `pickle.load`, and would load non-tensor entries with
`torch.load(weights_only=False)`: a crafted checkpoint could run code. Here `.metadata` is read by an unpickler that
builds only DCP's metadata classes, torch sizes, dtypes and layouts and paths, and a checkpoint is refused unless
every entry is a tensor stored in a file of its own directory (this module never writes anything else).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed as dist
from .atomic import _fsync_dir
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["SUFFIX", "STATE_FILE", "is_sharded", "save_sharded", "read_sharded", "read_metadata", "load_sharded"]

SUFFIX = ".dcp"
STATE_FILE = "state.pth"
_META_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name (torch.strided)
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),  # the checkpoint_id DCP records
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether `path` names a sharded checkpoint (a `.dcp` directory)."""
    return Path(path).suffix == SUFFIX


# --- what goes into DCP and what into state.pth ----------------------------------------------------------------------
def _model_state(module: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)  # DTensors (this rank's shards) under FSDP, plain tensors otherwise


def _parts_state(parts: Mapping[str, nn.Module]) -> dict:
    return {name: ({k: _model_state(m) for k, m in module.items()} if isinstance(module, nn.ModuleDict)
                   else _model_state(module)) for name, module in parts.items()}  # fmt: skip


def _optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, the rest) of the optimiser's sharded state dict, its parameters named by their names in `module`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer)
    tensors = {p: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in osd["state"].items()}
    rest = {p: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for p, s in osd["state"].items()}
    return tensors, {"state": rest, "param_groups": osd["param_groups"]}


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns on every call without a process group; a run on one process has none, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def save_sharded(path: str | os.PathLike, parts: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], state: dict) -> Path:  # fmt: skip
    """Write a sharded checkpoint `path` (a `.dcp` directory); every rank calls it (a collective).

    Args:
        parts: checkpoint key -> module (a ModuleDict: one state per entry), as `task.parts()`.
        optimizers: checkpoint key -> (the module whose parameters it steps, optimiser).
        state: the rest, written by rank 0 to `state.pth` (position, RNG streams, config, ...).

    Raises:
        OSError: on every rank, naming the rank(s) that failed; nothing is left under `path`'s name or beside it.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{dist.broadcast_object(os.getpid())}")  # one directory for all ranks
    tensors: dict = {"model": _parts_state(parts), "optim": {}}
    meta: dict = {}
    for name, (module, opt) in optimizers.items():
        tensors["optim"][name], meta[name] = _optimizer_state(module, opt)
    error = None
    if dist.is_main_process():
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            error = f"rank 0: {e}"
    if dist.broadcast_object(error) is None:  # every rank takes the same collectives
        try:
            with _single_process_is_meant():
                dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
            if dist.is_main_process():
                listing = {"parts": list(parts), "optimizers": list(optimizers)}
                save_checkpoint({**state, "sharded": listing, "optimizer_meta": meta}, tmp / STATE_FILE)
                _fsync_dir(tmp)
        except Exception as e:  # raised below on every rank
            error = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
    errors = [e for e in dist.all_gather_object(error) if e]
    if dist.is_main_process():
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _replace_dir(tmp, path)
    dist.barrier()
    if errors:
        raise OSError(f"could not write checkpoint {path}: {'; '.join(errors)}")
    return path


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` and make it durable; a previous `path` (a rerun from an older checkpoint) is moved
    aside first under a temporary name, so a crash in between leaves no checkpoint of that name, never a mixed one."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.tmp-{os.getpid()}-old")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module == _META_MODULE or (module, name) in _ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):  # fmt: skip
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: str | os.PathLike):
    """DCP's `Metadata` of the sharded checkpoint `path`, unpickled without running anything it names, and checked:
    every entry a tensor, stored in a plain file of the directory.

    Raises:
        CheckpointError: missing, unreadable, asking for any other Python object, or holding anything else.
    """
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    file = Path(path) / ".metadata"
    if not file.is_file():
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (no .metadata)")
    try:
        with open(file, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: it asks to load the Python object {e}, which the metadata of a "
                              "checkpoint never needs; nothing in it was run") from None  # fmt: skip
    except Exception as e:
        raise CheckpointError(f"{file}: not readable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{file}: expected DCP metadata, got {type(meta).__name__}")
    others = [k for k, v in meta.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if others:
        raise CheckpointError(f"{file}: refused: entries that are not tensors ({', '.join(others[:5])}), which "
                              "dino_recog never writes and DCP would unpickle")  # fmt: skip
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel.startswith(".") or info.transform_descriptors:
            raise CheckpointError(f"{file}: refused: it points at {rel!r}, not a plain file of its directory")
    if getattr(meta, "storage_meta", None) is None:
        meta.storage_meta = StorageMeta()
    return meta


def read_sharded(path: str | os.PathLike) -> dict:
    """The `state.pth` of the sharded checkpoint `path` (read with `weights_only=True`), with a None under each part
    and optimiser key held by DCP; the metadata is checked here, the tensors are read by `load_sharded`."""
    path = Path(path)
    read_metadata(path)
    state = load_checkpoint(path / STATE_FILE)
    listing = state.get("sharded")
    if not isinstance(listing, dict):
        raise CheckpointError(f"{path / STATE_FILE}: not the state of a sharded checkpoint (no 'sharded' listing)")
    for name in [*listing.get("parts", []), *listing.get("optimizers", [])]:
        state.setdefault(name, None)
    return state


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_metadata(path)
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(path)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _check_model(meta, model: dict, path: Path) -> None:
    """The parts' keys and full shapes against the checkpoint's, in check_state_dict's words."""
    saved = {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if k.startswith("model.")}
    own = {k: tuple(v.shape) for k, v in _flat(model, "model.").items()}
    problems = [f"{k[6:]}: checkpoint {saved[k]} vs model {s}" for k, s in own.items() if k in saved and saved[k] != s]
    problems += [f"{k[6:]}: missing from the checkpoint" for k in own if k not in saved]
    problems += [f"{k[6:]}: in the checkpoint, not in the model" for k in saved if k not in own]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{path}: the weights do not fit the configured model (another architecture or "
                              f"config?); {len(problems)} mismatched keys:\n  " + "\n  ".join(shown))  # fmt: skip


def load_sharded(path: str | os.PathLike, state: dict, parts: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]]) -> None:  # fmt: skip
    """Load the tensors of the sharded checkpoint `path` (whose `state` `read_sharded` gave) into `parts` and
    `optimizers`, each rank its own shards of them, whatever number of processes wrote it; every rank calls it.

    Raises:
        CheckpointError: the parts do not fit the checkpoint's tensors (each mismatch listed).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_metadata(path)
    model = _parts_state(parts)
    _check_model(meta, model, path)
    optim = {name: _optimizer_state(module, opt)[0] for name, (module, opt) in optimizers.items()}
    # partial: a parameter without a gradient yet had no optimiser state when it was saved (DINO's frozen last layer)
    with _single_process_is_meant():
        dcp.load({"model": model, "optim": optim}, storage_reader=_reader(path),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))  # fmt: skip
    for name, module in parts.items():
        for key, m in module.items() if isinstance(module, nn.ModuleDict) else [(None, module)]:
            set_model_state_dict(m, model[name][key] if key is not None else model[name])
    for name, (module, opt) in optimizers.items():
        saved, extra, stored = optim[name], state["optimizer_meta"][name], _prefixes(meta, name)
        present = {p for p in saved if f"optim.{name}.{p}." in stored}
        osd = {"state": {p: {**saved[p], **extra["state"].get(p, {})} for p in present},
               "param_groups": extra["param_groups"]}  # fmt: skip
        set_optimizer_state_dict(module, opt, osd, options=StateDictOptions(strict=False))
        names = {id(p): n for n, p in module.named_parameters()}
        for p in [p for g in opt.param_groups for p in g["params"]]:
            if names.get(id(p)) not in present:  # torch's template gave it a state a DDP resume would not have
                with contextlib.suppress(KeyError):
                    del opt.state[p]


def _prefixes(meta, name: str) -> set[str]:
    """`optim.NAME.PARAM.` of every parameter that has optimiser state in the checkpoint."""
    return {k[: k.rindex(".") + 1] for k in meta.state_dict_metadata if k.startswith(f"optim.{name}.")}
