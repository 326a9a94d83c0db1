"""Image decoding, LUPerson LMDBs and the torch data set over records, paths or an LMDB.

:func:`read_image` turns any file or byte string into a complete RGB picture or raises :class:`CorruptImageError`;
:class:`ImageDataset` turns records, unlabeled paths or an :class:`LMDBImages` into a torch data set that skips
undecodable images while training and refuses them while evaluating. The data-set parsers (Market-1501, MSMT17,
folders) live in :mod:`dino_recog.data.parsers` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..atomic import atomic_write
from .parsers import _MSMT_DIRS as _MSMT_DIRS
from .parsers import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    Record,
    ReIDData,
    combine_train_sets,
    format_table,
    list_image_folder,
    load_dukemtmc,
    load_labeled_folder,
    load_labeled_folder_splits,
    load_market1501,
    load_msmt17,
    split_counts,
)

__all__ = [  # with the parsers' names, so every name keeps its old import path
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "DatasetLayoutError",
    "ImageDataset",
    "LMDBImages",
    "Record",
    "ReIDData",
    "collate_skip_none",
    "Replaced",
    "combine_train_sets",
    "format_table",
    "list_image_folder",
    "load_labeled_folder",
    "load_labeled_folder_splits",
    "load_dukemtmc",
    "load_market1501",
    "load_msmt17",
    "read_image",
    "split_counts",
]

logger = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image file (or byte string) that cannot be decoded into a complete picture."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        # 16-bit data (I;16*, or I holding 0..65535): Pillow's convert would clip at 255 and saturate the picture;
        # scale the full range instead so 65535 -> 255.
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        img = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file or encoded bytes into a fully loaded RGB image.

    Args:
        source: a path, or encoded bytes (e.g. from an LMDB).
        name: what to call the image in errors (default: the path, or "<bytes>").

    Returns:
        An RGB ``PIL.Image`` (L, LA, RGBA, P, CMYK and 16-bit inputs converted; alpha dropped as ``convert`` does).

    Raises:
        CorruptImageError: missing, empty, truncated or non-image data, or more pixels than ``Image.MAX_IMAGE_PIXELS``.
    """
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    label = name or ("<bytes>" if is_bytes else os.fspath(source))
    try:
        with Image.open(io.BytesIO(source) if is_bytes else source) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise CorruptImageError(
                    f"{label}: {img.width}x{img.height} pixels exceeds Image.MAX_IMAGE_PIXELS "
                    f"({limit}); refusing to decode it"
                )
            img.load()  # decode everything now so truncated files fail here rather than inside a transform
            return _to_rgb(img)
    except CorruptImageError:
        raise
    except Exception as e:  # PIL signals bad data with many types (OSError, SyntaxError, DecompressionBombError...)
        raise CorruptImageError(f"cannot read image {label}: {type(e).__name__}: {e}") from e


def _open_lmdb(path: str) -> lmdb.Environment:
    # lock=False: read-only readers need no lock file (the folder may be read-only); readahead=False: random access
    # over millions of small values would otherwise thrash the page cache.
    try:
        return lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as e:
        raise DatasetLayoutError(f"{path}: not an LMDB ({type(e).__name__}: {e}); expected an LMDB folder holding "
                                 "data.mdb (as LUPerson's convert_lmdb.py writes it)") from None  # fmt: skip


# One environment per LMDB per process: py-lmdb refuses to open the same files twice in a process, so every
# LMDBImages on a path shares it. Environments are not valid across fork(); a forked DataLoader worker inherits them
# (and py-lmdb's record that they are open), so it closes them and opens its own.
_ENVS: dict[str, lmdb.Environment] = {}
_envs_pid = os.getpid()


def _shared_env(path: str) -> lmdb.Environment:
    global _envs_pid
    if _envs_pid != os.getpid():
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _envs_pid = os.getpid()
    if path not in _ENVS:
        _ENVS[path] = _open_lmdb(path)
    return _ENVS[path]


def _read_keys_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _write_atomic(path: str, lines: list[str]) -> None:
    # Readers (other ranks) never see a half-written list.
    atomic_write(path, lambda fh: fh.write("".join(key + "\n" for key in lines).encode("utf-8")), "LMDB key list")


class LMDBImages:
    """Raw encoded images stored in an LMDB (LUPerson's ``convert_lmdb.py`` output, LUPerson-NL), by key.

    ``keys.pkl`` next to such an LMDB is never read: unpickling runs arbitrary code. Keys come from ``keys_file``
    (plain text, one per line) or from iterating the LMDB once; that list is cached as ``keys.txt`` inside the LMDB
    folder, or under ``~/.cache/dino_recog/lmdb_keys/`` when the folder is read-only. Keys starting with ``__`` are
    metadata, not images. The environment is opened lazily in each process and never pickled, so the object can be
    sent to DataLoader workers (forked or spawned).

    Args:
        path: the LMDB folder (or file, for a ``subdir=False`` LMDB).
        keys_file: optional plain-text key list; skips the cache.
    """

    def __init__(self, path: str | os.PathLike, keys_file: str | os.PathLike | None = None) -> None:
        self.path = os.path.abspath(path)
        data_file = os.path.join(self.path, "data.mdb") if os.path.isdir(self.path) else self.path
        if not os.path.isfile(data_file):
            raise DatasetLayoutError(
                f"missing LMDB data file {data_file}; expected an LMDB folder holding data.mdb "
                "(as LUPerson's convert_lmdb.py writes it)"
            )
        if keys_file is not None:
            self.keys: list[str] = _read_keys_file(os.fspath(keys_file))
        else:
            self.keys = self._cached_keys(os.path.getmtime(data_file))
        if not self.keys:
            raise DatasetLayoutError(f"LMDB {self.path} has no image keys")
        self._check_keys(keys_file)

    def _check_keys(self, keys_file: str | os.PathLike | None) -> None:
        """A key list that does not match the LMDB (a stale cache, a keys file of another copy) fails here, with the
        missing keys counted and named, not as a KeyError hours into an epoch. The entry count and a sample of 1,000
        keys are checked; only when they disagree is every key looked up."""
        with _shared_env(self.path).begin() as txn:
            entries = txn.stat()["entries"]
            sample = self.keys[:: max(1, len(self.keys) // 1000)]
            if len(self.keys) <= entries and all(txn.get(k.encode("utf-8")) is not None for k in sample):
                return
            missing = [k for k in self.keys if txn.get(k.encode("utf-8")) is None]
        if missing:
            source = keys_file or "its cached key list (keys.txt beside it or in ~/.cache/dino_recog/lmdb_keys)"
            raise DatasetLayoutError(
                f"LMDB {self.path}: {len(missing)} of the {len(self.keys)} keys of {source} are not in it (e.g. "
                f"{', '.join(map(repr, missing[:3]))}); delete a stale cache to list the keys again, or give the "
                "keys file of this LMDB"
            )

    def _cached_keys(self, data_mtime: float) -> list[str]:
        local = os.path.join(self.path, "keys.txt") if os.path.isdir(self.path) else self.path + ".keys.txt"
        digest = hashlib.sha1(self.path.encode("utf-8")).hexdigest()
        candidates = [local, os.path.join(os.path.expanduser("~/.cache/dino_recog/lmdb_keys"), digest + ".txt")]
        for cache in candidates:
            if os.path.isfile(cache) and os.path.getmtime(cache) >= data_mtime:  # an older list may miss new keys
                return _read_keys_file(cache)
        with _shared_env(self.path).begin() as txn:
            keys = [
                k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False) if not k.startswith(b"__")
            ]
        for cache in candidates:
            try:
                _write_atomic(cache, keys)
                logger.info("cached %d LMDB keys of %s in %s", len(keys), self.path, cache)
                break
            except OSError as e:
                logger.debug("cannot write key cache %s: %s", cache, e)
        else:
            logger.warning("could not cache the keys of %s; they will be listed again next time", self.path)
        return keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> bytes:
        key = self.keys[i]
        with _shared_env(self.path).begin() as txn:
            value = txn.get(key.encode("utf-8"))
        if value is None:
            raise KeyError(f"key {key!r} not in LMDB {self.path} (stale key list? delete the keys.txt cache)")
        return value


class ImageDataset(Dataset):
    """Torch data set over labeled records, unlabeled paths or an :class:`LMDBImages`.

    Items are ``(transform(image), pid, camid, index)``; unlabeled sources give pid = camid = -1. With
    ``train=True`` an undecodable image is logged and returned as ``None`` (drop it with :func:`collate_skip_none`)
    so one bad file among millions does not end a run; with ``train=False`` it raises, since evaluation results must
    cover every image. With ``replace_by_identity=True`` (labeled training items), an undecodable image is replaced
    instead by another image of the same identity, drawn from the item's seed (so a resumed run draws the same one;
    up to ``MAX_REPLACEMENTS`` are tried, each once): a P x K batch keeps K images of each identity, which the
    triplet loss and the sampler's balance rely on. The item then comes as :class:`Replaced`, which
    :func:`collate_skip_none` counts with the skipped ones; ``None`` only when no other image of the identity decodes.

    An item may be asked for as ``dataset[(i, seed)]`` (what :class:`~dino_recog.data.samplers.SeededBatches` yields):
    the transform then draws its randomness (python, numpy and torch CPU generators) from `seed` alone, and the
    process's own generators are left as they were.

    Args:
        items: ``list[Record]``, ``list[str]`` of paths, ``LMDBImages``, or a ``LabeledLMDB`` (labeled_lmdb.py).
        transform: applied to the RGB ``PIL.Image``.
        train: skip (True) or raise on (False) corrupt images.
        replace_by_identity: replace an undecodable image by another of its identity (labeled items) instead of
            skipping it.
    """

    MAX_REPLACEMENTS = 8

    def __init__(
        self,
        items: Sequence[Record] | Sequence[str] | LMDBImages,
        transform: Callable[[Image.Image], Any] | None = None,
        train: bool = True,
        replace_by_identity: bool = False,
    ) -> None:
        self.items = items
        self.transform = transform
        self.train = train
        self.replace_by_identity = replace_by_identity
        self._by_pid: tuple[np.ndarray, ...] | None = None  # (pids, indices sorted by pid, their pids): on demand

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int, int] | None:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self._load(i, seed)
        if item is not None or not self.replace_by_identity:
            return item
        bad = 1
        for j in self._same_identity(i, seed)[: self.MAX_REPLACEMENTS]:
            item = self._load(int(j), seed)
            if item is not None:
                return Replaced(item, bad)
            bad += 1
        return None

    def _load(self, i: int, seed: int | None) -> tuple[Any, int, int, int] | None:
        item = self.items[i]
        if isinstance(self.items, LMDBImages):
            name, pid, camid = f"{self.items.path}[{self.items.keys[i]}]", -1, -1
        elif isinstance(item, tuple):  # a Record, or (bytes, pid, camid) of a LabeledLMDB
            item, pid, camid = item
            name = self.items.name(i) if hasattr(self.items, "name") else item
        else:
            name, pid, camid = os.fspath(item), -1, -1
        try:  # a transform with its own `read` takes the image in another form (crops.decode: gpu, encoded bytes)
            img = getattr(self.transform, "read", read_image)(item, name)
        except CorruptImageError as e:
            if not self.train:
                raise
            logger.warning("skipping a training image: %s", e)  # the message names the file
            return None
        if self.transform is None:
            return img, pid, camid, i
        with _seeded(seed) if seed is not None else contextlib.nullcontext():
            return self.transform(img), pid, camid, i

    def __getstate__(self) -> dict:  # DataLoader workers build their own grouping if they need one
        return {**self.__dict__, "_by_pid": None}

    def _same_identity(self, i: int, seed: int | None) -> np.ndarray:
        """The other items of item i's identity, in an order drawn from (seed, i)."""
        if self._by_pid is None:  # built once per worker, at its first undecodable image (not pickled to workers)
            pids = np.asarray(self.items.pids if hasattr(self.items, "pids") else [r[1] for r in self.items])
            order = np.argsort(pids, kind="stable")
            self._by_pid = pids, order, pids[order]
        pids, order, sorted_pids = self._by_pid
        lo, hi = np.searchsorted(sorted_pids, pids[i], "left"), np.searchsorted(sorted_pids, pids[i], "right")
        others = order[lo:hi][order[lo:hi] != i]
        return np.random.default_rng([(i if seed is None else seed) % 2**63, i]).permutation(others)


class Replaced(tuple):
    """A training item that stands in for an undecodable image of the same identity, after `n_bad` undecodable reads
    (the image itself and the failed replacements; ImageDataset)."""

    def __new__(cls, item: tuple, n_bad: int) -> Replaced:
        self = super().__new__(cls, item)
        self.n_bad = n_bad
        return self

    def __reduce__(self):  # DataLoader workers send items through pickle: keep the count
        return Replaced, (tuple(self), self.n_bad)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the python, numpy and torch CPU generators for the block, then put back their previous states (in the main
    process, with num_workers=0, those streams also drive dropout and stochastic depth)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed the GPUs too
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate_skip_none(batch: list[Any]) -> tuple[Any, int]:
    """``default_collate`` over the items that are not ``None``.

    Returns:
        ``(collated, n_skipped)``: n_skipped counts the undecodable images, those replaced (:class:`Replaced`) and
        those dropped; ``(None, n_skipped)`` when every item was ``None``.
    """
    kept = [item for item in batch if item is not None]
    replaced = sum(item.n_bad for item in kept if isinstance(item, Replaced))
    return (default_collate([tuple(item) for item in kept]) if kept else None), len(batch) - len(kept) + replaced
