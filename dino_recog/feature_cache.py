"""A disk cache of evaluation features, keyed by everything that decides them.

Evaluating several metrics, re-ranking settings or k values on the same checkpoint extracts the same query and gallery
features every time; `cached_features` stores what `evaluation.extract_features` returns in one `.npz` per
(model, images, preprocessing) and loads it on the next run.

The key is a SHA-256 over a JSON description (stored inside the file, so a hit is verified, not only named):

- the model's weights: a hash of its state dict in memory (names, shapes, dtypes, bytes). Not the checkpoint's path,
  size and mtime: the same file gives different models (teacher or student key, a stage-2 model or its backbone,
  position embeddings resized), mtimes are coarse on some file systems and kept by `cp -p`, and hashing the weights
  costs no more than hashing the file (about 0.1 s for a ViT-S). A renamed or copied checkpoint still hits.
- the model's class, its `spec` (stage-2 models) and `arch` (how a backbone was built: attention heads, ResNet last
  stride and pooling leave the weights unchanged), and its output dimension;
- the data set's ordered items (absolute path, pid, camid; for an LMDB its path, data file size and mtime and keys)
  and each image file's size and mtime_ns, so a regenerated data set in the same folder misses;
- the preprocessing: `repr` of the data set's transform (size, interpolation, mean, std; a lambda never hits);
- flip averaging and the precision (bf16 autocast on CUDA gives slightly different numbers than fp32).

Files are written atomically (temporary file, fsync, rename) by rank 0 only, and read with `allow_pickle=False`; an
unreadable or mismatching file is a miss, never an error. Under torchrun a hit needs every rank to find the file
(one all-reduce), so all ranks take the same branch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import distributed as dist
from .atomic import atomic_write
from .data.datasets import ImageDataset, LMDBImages
from .embedding import uses_bf16
from .evaluation import extract_features

__all__ = ["CACHE_VERSION", "cache_key", "cached_features", "weights_digest", "write_atomic"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when extract_features changes what it computes


# The old name of atomic.atomic_write, for code written against it.
write_atomic = atomic_write


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict: every name, shape, dtype and byte, in the module's order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        # as raw bytes: numpy has no bfloat16, and bytes also tell -0.0 from 0.0 and NaN payloads apart
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def _file_stamp(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:  # extraction will name the missing file; the key only has to differ from a present one
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def _images_digest(dataset: ImageDataset) -> str:
    """SHA-256 of the data set's items in order, with the size and mtime_ns of each image file."""
    h = hashlib.sha256()
    items = dataset.items
    if isinstance(items, LMDBImages):
        data = os.path.join(items.path, "data.mdb") if os.path.isdir(items.path) else items.path
        h.update(json.dumps(["lmdb", items.path, _file_stamp(data)]).encode())
        h.update("\n".join(items.keys).encode())
        return h.hexdigest()
    for item in items:
        path, pid, camid = item if isinstance(item, tuple) else (item, -1, -1)
        path = os.path.abspath(path)  # a relative root seen from another working directory is another data set
        h.update(json.dumps([path, int(pid), int(camid), _file_stamp(path)]).encode())
        h.update(b"\n")
    return h.hexdigest()


@torch.no_grad()
def _output_dim(model: nn.Module, dataset: ImageDataset, device: torch.device) -> int | None:
    """Feature dimension, from one image of `dataset` (None for an empty data set)."""
    if len(dataset) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        img = dataset[0][0].unsqueeze(0).to(device)  # (1, 3, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device)):
            return int(model(img).shape[1])
    finally:
        model.train(was_training)


def cache_key(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    flip: bool = False,
    arch: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The description the cache is keyed by (see the module docstring); plain JSON values."""
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"cached_features needs an ImageDataset (its items name the images), got {type(dataset)}")
    spec = getattr(model, "spec", None)
    return {
        "version": CACHE_VERSION,
        "weights": weights_digest(model),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "spec": dict(spec) if spec else None,
        "arch": dict(arch) if arch is not None else None,
        "out_dim": _output_dim(model, dataset, device),
        "num_images": len(dataset),
        "images": _images_digest(dataset),
        "transform": repr(dataset.transform),
        "flip": bool(flip),
        "precision": "bf16" if uses_bf16(device) else "fp32",
    }


def _key_text(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)  # default=str: tuples and paths inside spec / arch


def _load(path: Path, key_text: str, key: Mapping[str, Any]) -> tuple[torch.Tensor, np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the file is absent, unreadable or made for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_key, feats, pids, camids = str(z["key"]), z["features"], z["pids"], z["camids"]
    except Exception as e:  # truncated zip, foreign file, object arrays (refused without pickle)...
        log.warning("ignoring unreadable feature cache %s (%s: %s); extracting again", path, type(e).__name__, e)
        return None
    n, d = key["num_images"], key["out_dim"]
    if stored_key != key_text:  # a hash collision or a hand-copied file: trust only the full description
        log.warning("feature cache %s was made for another model or data set; extracting again", path)
        return None
    if feats.dtype != np.float32 or feats.shape != (n, d or 0) or pids.shape != (n,) or camids.shape != (n,):
        log.warning("feature cache %s holds %s features for %d images; extracting again", path, feats.shape, n)
        return None
    return torch.from_numpy(feats), pids, camids


def cached_features(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    cache_dir: str | os.PathLike | None,
    *,
    arch: Mapping[str, Any] | None = None,
    flip: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`extract_features(model, dataset, device, batch_size, num_workers, flip)`, stored in / loaded from `cache_dir`.

    Args:
        model: maps (B, 3, H, W) to (B, D).
        dataset: an `ImageDataset` with the evaluation transform.
        cache_dir: folder of `features-<hash>.npz` files (created if needed); None extracts without a cache.
        arch: how the model was built where its weights and `spec` do not say it (the `BackboneSpec.to_dict()` of a
            backbone checkpoint), so that e.g. another `num_heads` misses.
        flip, batch_size, num_workers: as for `extract_features` (only `flip` is part of the key).

    Returns:
        What `extract_features` returns: (N, D) float32 CPU features, (N,) pids, (N,) camids.
    """
    if cache_dir is None:
        return extract_features(model, dataset, device, batch_size, num_workers, flip)
    key = cache_key(model, dataset, device, flip, arch)
    text = _key_text(key)
    path = Path(cache_dir) / f"features-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"
    loaded = _load(path, text, key)
    found = dist.all_reduce_sum(torch.tensor([int(loaded is not None)], device=device))
    if int(found.item()) == dist.get_world_size():
        log.info("features of %d images loaded from %s", len(dataset), path)
        return loaded
    feats, pids, camids = extract_features(model, dataset, device, batch_size, num_workers, flip)
    if dist.is_main_process():
        arrays = {"features": feats.numpy(), "pids": np.asarray(pids), "camids": np.asarray(camids)}
        try:
            atomic_write(path, lambda fh: np.savez(fh, key=np.array(text), **arrays), "feature cache")
            log.info("features of %d images cached in %s", len(dataset), path)
        except OSError as e:  # a cache that cannot be written costs time next run, not this result
            log.warning("could not write the feature cache %s: %s", path, e)
    return feats, pids, camids
