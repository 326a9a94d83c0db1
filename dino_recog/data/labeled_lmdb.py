"""Labeled LMDBs: LUPerson-NL as released, and the ones `python -m dino_recog.data.build_lmdb` packs from a folder.

Layout (what LUPerson-NL's `LUP-NL/convert_lmdb.py`, at commit 6b9298e, writes, and what `build_lmdb` writes):

    ROOT/lmdb/data.mdb (or ROOT/data.mdb)  JPEG bytes under ASCII keys '{video:05d}_{pid:06d}_{frame:07d}_{box:02d}'
    ROOT/keys.pkl     {"keys": [str, ...], "pids": [int, ...]}  (LUPerson-NL's label file: a pickle)
    ROOT/labels.txt   one "key pid" per line                    (ours: plain text; `convert_keys` writes it)

(`build_lmdb` names its keys '{pid:07d}_{n:09d}'; any ASCII key without white space works.)

`keys.pkl` is read with an unpickler that can build only lists, dicts, strings and numbers (it never imports a
name, so a crafted file runs nothing). The labels are then cached once as two memory-mapped arrays (fixed-width key
bytes and int64 pids, `.dino_recog_labels/` beside the label file or under ~/.cache/dino_recog), which every rank
and DataLoader worker maps instead of holding 10 M Python strings of its own.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .parsers import DatasetLayoutError

__all__ = ["LabeledLMDB", "keep_identities", "read_keys_pickle", "read_labels_txt", "read_string_list_pickle",
           "write_labels_txt"]

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what needs no import: lists, tuples, dicts, sets, strings, bytes, numbers, booleans, None."""

    def __init__(self, fh, path: str) -> None:
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str):
        raise DatasetLayoutError(f"{self.path}: refused: it asks to load the Python object {module}.{name}; a key "
                                 "file holds only lists, strings and numbers; nothing in it was run")  # fmt: skip

    def persistent_load(self, pid):
        raise DatasetLayoutError(f"{self.path}: refused: it holds a persistent reference, which a key file never "
                                 "needs; nothing in it was run")  # fmt: skip


def _load_plain(path: str) -> object:
    """A pickle's content through `_PlainUnpickler`: built-in containers and scalars only, nothing imported or run."""
    try:
        with open(path, "rb") as fh:
            return _PlainUnpickler(fh, path).load()
    except DatasetLayoutError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise DatasetLayoutError(f"{path}: not a readable key file ({type(e).__name__}: {e})") from None


def read_string_list_pickle(path: str | os.PathLike) -> list[str]:
    """A pickled list (or tuple) of plain strings, such as TransReID-SSL's released CFS list of LUPerson images, safely.

    Raises:
        DatasetLayoutError: an object that needs an import (refused unread), or not a list of strings.
    """
    path = os.fspath(path)
    data = _load_plain(path)
    if not isinstance(data, (list, tuple)):
        raise DatasetLayoutError(f"{path}: holds a {type(data).__name__}; expected a list of image names")
    bad = next((i for i, v in enumerate(data) if not isinstance(v, str)), None)
    if bad is not None:
        raise DatasetLayoutError(f"{path}: entry {bad} is {data[bad]!r}; expected a list of image names (strings)")
    return list(data)


def read_keys_pickle(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """LUPerson-NL's `keys.pkl` ({"keys": [...], "pids": [...]}, as `convert_lmdb.py` writes it), safely.

    Raises:
        DatasetLayoutError: an object that needs an import (refused unread), or not that dict of two equal lists.
    """
    path = os.fspath(path)
    data = _load_plain(path)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not isinstance(data.get("pids"), list):
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetLayoutError(f"{path}: holds {got}; expected LUPerson-NL's dict with a 'keys' and a 'pids' list")
    keys, pids = data["keys"], data["pids"]
    if len(keys) != len(pids):
        raise DatasetLayoutError(f"{path}: {len(keys)} keys but {len(pids)} pids; expected one pid per key")
    bad = next((i for i, (k, p) in enumerate(zip(keys, pids)) if not isinstance(k, str) or not _is_int(p)), None)
    if bad is not None:
        raise DatasetLayoutError(f"{path}: entry {bad} is key {keys[bad]!r} with pid {pids[bad]!r}; expected a "
                                 "string key and an integer pid")  # fmt: skip
    return keys, [int(p) for p in pids]


def keep_identities(pids, minimum: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Which samples belong to identities with at least `minimum` images, and their new labels 0..N-1 (in sorted
    order of the old ones).

    Returns:
        (kept: positions of the kept samples, labels: their new labels, dropped: {"identities": n, "images": n}).
    """
    unique, inverse, counts = np.unique(np.asarray(pids), return_inverse=True, return_counts=True)
    keep_ids = counts >= max(minimum, 1)
    relabel = np.cumsum(keep_ids) - 1  # new label of each kept identity
    kept = np.flatnonzero(keep_ids[inverse])
    dropped = {"identities": int((~keep_ids).sum()), "images": int(counts[~keep_ids].sum())}
    return kept, relabel[inverse[kept]], dropped


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_labels_txt(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """`labels.txt`: one "key pid" per line (blank lines ignored)."""
    keys, pids = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise DatasetLayoutError(f"{path}, line {n}: {line.strip()!r}; expected 'KEY PID' with an integer "
                                         "PID >= 0")  # fmt: skip
            keys.append(parts[0])
            pids.append(int(parts[1]))
    return keys, pids


def write_labels_txt(path: str | os.PathLike, keys: list[str], pids: list[int]) -> Path:
    """Write `labels.txt` atomically (a reader never sees half of it)."""
    bad = next((k for k in keys if not k or any(c.isspace() for c in k)), None)
    if bad is not None:
        raise ValueError(f"key {bad!r}: a key of labels.txt cannot be empty or hold white space")
    text = "".join(f"{k} {p}\n" for k, p in zip(keys, pids)).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), "label file")


def _lmdb_dir(root: Path) -> Path:
    for d in (root / "lmdb", root):
        if (d / "data.mdb").is_file():
            return d
    raise DatasetLayoutError(f"{root}: no data.mdb in {root / 'lmdb'} or {root}; expected LUPerson-NL's lupnl_lmdb "
                             "folder (lmdb/ and keys.pkl) or a folder written by python -m dino_recog.data.build_lmdb")


def _label_file(root: Path, lmdb_dir: Path) -> Path:
    for f in (root / "labels.txt", lmdb_dir / "labels.txt", root / "keys.pkl", lmdb_dir / "keys.pkl"):
        if f.is_file():
            return f
    raise DatasetLayoutError(f"{root}: no labels.txt or keys.pkl beside the LMDB; expected LUPerson-NL's keys.pkl or "
                             "the labels.txt of python -m dino_recog.data.build_lmdb")  # fmt: skip


class LabeledLMDB:
    """The labeled images of an LMDB: item i is (JPEG bytes, pid, camid -1), pids relabelled 0..N-1 in sorted order.

    Identities with fewer than `min_images_per_id` images are dropped (and counted in `dropped`). The keys and pids
    are memory-mapped arrays (see the module docstring), so the object is cheap to send to DataLoader workers.

    Args:
        root: the folder (see the module docstring for what it holds).
        min_images_per_id: drop identities with fewer images; 0 or 1 keeps all.
        keep_list: a text file of the keys to keep (data.keep_list); "" keeps all. Applied first.
    """

    def __init__(self, root: str | os.PathLike, min_images_per_id: int = 0, keep_list: str = "") -> None:
        self.root, self.min_images_per_id, self.keep_list = Path(root), min_images_per_id, keep_list
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: not a folder; expected a labeled LMDB folder")
        self.path = os.fspath(_lmdb_dir(self.root).resolve())
        self.label_file = _label_file(self.root, Path(self.path))
        keys, raw_pids = _cached_labels(self.label_file)
        self._keys = keys
        listed = np.arange(len(keys))
        if keep_list:
            from .keep_list import keep_positions

            listed = keep_positions([k.decode("ascii", "replace") for k in keys.tolist()], keep_list, str(self.root))
        self.index, pids, self.dropped = keep_identities(raw_pids[listed], min_images_per_id)
        self.index = listed[self.index]  # positions in the label file
        self.pids = pids.astype(np.int32)
        self.num_identities = int(pids.max()) + 1 if len(pids) else 0
        if not len(self.index):
            raise DatasetLayoutError(f"{self.label_file}: no identity has {min_images_per_id} images or more "
                                     "(data.min_images_per_id); nothing to train on")  # fmt: skip
        self._check_keys()

    def _check_keys(self) -> None:
        """A label file of another LMDB fails now, naming keys, not hours into an epoch: a sample is looked up."""
        from .datasets import _shared_env

        sample = range(0, len(self.index), max(1, len(self.index) // 1000))
        with _shared_env(self.path).begin() as txn:
            missing = [self.key(i) for i in sample if txn.get(bytes(self._keys[self.index[i]])) is None]
        if missing:
            raise DatasetLayoutError(f"{self.label_file}: {len(missing)} of {len(sample)} sampled keys are not in the "
                                     f"LMDB {self.path} (e.g. {', '.join(map(repr, missing[:3]))}); expected the "
                                     "label file of this LMDB")  # fmt: skip

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker maps the cached arrays again rather than receive a pickled copy of them.
        return {"root": self.root, "min_images_per_id": self.min_images_per_id, "keep_list": self.keep_list}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["min_images_per_id"], state.get("keep_list", ""))

    def __len__(self) -> int:
        return len(self.index)

    def key(self, i: int) -> str:
        return bytes(self._keys[self.index[i]]).decode("ascii", "replace")

    def name(self, i: int) -> str:
        """How image i is called in messages."""
        return f"{self.path}[{self.key(i)}]"

    def __getitem__(self, i: int) -> tuple[bytes, int, int]:
        from .datasets import _shared_env

        key = bytes(self._keys[self.index[i]])
        with _shared_env(self.path).begin() as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"key {key.decode('ascii', 'replace')!r} not in LMDB {self.path}")
        return bytes(value), int(self.pids[i]), -1


def _cached_labels(label_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys as fixed-width bytes, pids int64), memory-mapped from the cache, built from `label_file` when the cache
    is missing or older than it."""
    digest = hashlib.sha1(os.fspath(label_file.resolve()).encode("utf-8")).hexdigest()[:16]
    places = [label_file.parent / ".dino_recog_labels", Path.home() / ".cache" / "dino_recog" / "lmdb_labels" / digest]
    stamp = f"{_CACHE_VERSION} {label_file.name} {label_file.stat().st_size} {label_file.stat().st_mtime_ns}"
    for d in places:
        try:
            if (d / "stamp.txt").read_text() == stamp:
                return np.load(d / "keys.npy", mmap_mode="r"), np.load(d / "pids.npy", mmap_mode="r")
        except (OSError, ValueError):
            continue
    keys, pids = read_keys_pickle(label_file) if label_file.suffix == ".pkl" else read_labels_txt(label_file)
    if not keys:
        raise DatasetLayoutError(f"{label_file}: no keys; expected one entry per image")
    try:
        key_array = np.array([k.encode("ascii") for k in keys], dtype=np.bytes_)
    except UnicodeEncodeError:
        bad = next(k for k in keys if not k.isascii())
        raise DatasetLayoutError(f"{label_file}: key {bad!r} is not ASCII; LMDB keys of LUPerson-NL are") from None
    pid_array = np.asarray(pids, dtype=np.int64)
    for d in places:
        try:
            d.mkdir(parents=True, exist_ok=True)
            for name, arr in (("keys.npy", key_array), ("pids.npy", pid_array)):
                buf = io.BytesIO()
                np.save(buf, arr)
                atomic_write(d / name, lambda fh, b=buf: fh.write(b.getvalue()), "label cache")
            atomic_write(d / "stamp.txt", lambda fh: fh.write(stamp.encode()), "label cache")  # last: marks it done
            log.info("cached the %d labels of %s in %s", len(keys), label_file, d)
            return np.load(d / "keys.npy", mmap_mode="r"), np.load(d / "pids.npy", mmap_mode="r")
        except OSError as e:
            log.debug("cannot cache labels in %s: %s", d, e)
    log.warning("could not cache the labels of %s; they are read again next time", label_file)
    return key_array, pid_array
