"""Data sets: Market-1501, MSMT17, generic image folders, LUPerson LMDBs, and robust image reading.

Labeled sets come back as lists of ``Record(path, pid, camid)`` with 0-based cameras; :class:`ImageDataset` turns any
of them (or unlabeled paths, or an :class:`LMDBImages`) into a torch data set that skips undecodable images while
training and refuses them while evaluating.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..atomic import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "DatasetLayoutError",
    "ImageDataset",
    "LMDBImages",
    "Record",
    "ReIDData",
    "collate_skip_none",
    "combine_train_sets",
    "format_table",
    "list_image_folder",
    "load_labeled_folder",
    "load_market1501",
    "load_msmt17",
    "read_image",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MARKET_LAYOUT = (
    "expected ROOT/bounding_box_train, ROOT/query, ROOT/bounding_box_test with files like 0002_c1s1_000451_03.jpg"
)
_MARKET_NAME = re.compile(r"([-\d]+)_c(\d)")
_MSMT_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_LAYOUT = (
    "expected ROOT/train + ROOT/test (MSMT17_V1) or ROOT/mask_train_v2 + ROOT/mask_test_v2 (MSMT17_V2), plus "
    "ROOT/list_train.txt, list_val.txt, list_query.txt, list_gallery.txt with lines like "
    "'0000/0000_000_01_0303morning_0015_0.jpg 0'"
)
_FOLDER_CAMERA = re.compile(r"_c(\d+)")


class CorruptImageError(ValueError):
    """An image file (or byte string) that cannot be decoded into a complete picture."""


class DatasetLayoutError(ValueError):
    """A data set root that does not have the expected folders, file names or list lines."""


class Record(NamedTuple):
    """One labeled image: ``camid`` is 0-based, ``pid`` -1 never appears (junk is dropped at load time)."""

    path: str
    pid: int
    camid: int


@dataclass
class ReIDData:
    """A labeled re-identification data set; query and gallery share one identity numbering."""

    name: str
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    info: dict[str, str] = field(default_factory=dict)

    @property
    def num_train_pids(self) -> int:
        """Classifier width: max train pid + 1 (equals the identity count, since train pids are relabelled)."""
        return max((r.pid for r in self.train), default=-1) + 1

    @property
    def num_train_cams(self) -> int:
        """Camera-embedding size: max train camid + 1 (offset camids of combined sets stay below it)."""
        return max((r.camid for r in self.train), default=-1) + 1


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}; {layout}")


def _relabel(records: list[Record]) -> list[Record]:
    """Map train pids to 0..N-1 in sorted original order so a classifier head can index them directly."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records]


def _market_split(folder: Path) -> list[Record]:
    _require_dir(folder, _MARKET_LAYOUT)
    records = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.lower().endswith(".jpg"):
            continue
        match = _MARKET_NAME.match(name)
        if match is None:
            raise DatasetLayoutError(f"cannot parse identity and camera from {folder / name}; {_MARKET_LAYOUT}")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:  # junk boxes: the protocol ignores them entirely
            continue
        if not (0 <= pid <= 1501 and 1 <= cam <= 6):
            raise DatasetLayoutError(f"{folder / name}: pid {pid} / camera {cam} outside 0..1501 / 1..6")
        records.append(Record(str(folder / name), pid, cam - 1))
    if not records:
        raise DatasetLayoutError(f"no usable .jpg images in {folder}; {_MARKET_LAYOUT}")
    return records


def load_market1501(root: str | os.PathLike) -> ReIDData:
    """Load Market-1501: junk (pid -1) dropped, distractors (pid 0) kept, train pids relabelled to 0..N-1.

    Args:
        root: folder holding ``bounding_box_train``, ``query`` and ``bounding_box_test``.

    Returns:
        The data set (751 ids / 12,936 train, 750 ids / 3,368 query, 15,913 gallery images on the real data).

    Raises:
        DatasetLayoutError: missing root or split, unparsable file name, pid/camera out of range, empty split.
    """
    root = Path(root)
    _require_dir(root, _MARKET_LAYOUT)
    return ReIDData(
        name="market1501",
        train=_relabel(_market_split(root / "bounding_box_train")),
        query=_market_split(root / "query"),
        gallery=_market_split(root / "bounding_box_test"),
    )


def _msmt_version(root: Path, version: str) -> str:
    present = [v for v, dirs in _MSMT_DIRS.items() if all((root / d).is_dir() for d in dirs)]
    if version == "auto":
        if len(present) != 1:
            found = "both" if present else "neither"
            raise DatasetLayoutError(
                f"{root} has {found} of the V1/V2 image folders; pass version='V1' or 'V2'. {_MSMT_LAYOUT}"
            )
        return present[0]
    version = version.upper()
    if version not in _MSMT_DIRS:
        raise ValueError(f"MSMT17 version {version!r}: expected 'auto', 'V1' or 'V2'")
    for d in _MSMT_DIRS[version]:
        _require_dir(root / d, f"MSMT17 {version} requested; {_MSMT_LAYOUT}")
    return version


def _msmt_list(list_file: Path, image_dir: Path) -> list[Record]:
    """Parse one list file; only the list is read, image existence is checked when an image is loaded."""
    if not list_file.is_file():
        raise DatasetLayoutError(f"missing list file {list_file}; {_MSMT_LAYOUT}")
    records = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rel, pid_text = line.split()
                pid, cam = int(pid_text), int(os.path.basename(rel).split("_")[2])
                if pid < 0 or not 1 <= cam <= 15:
                    raise ValueError(f"pid {pid} / camera {cam} outside >=0 / 1..15")
            except (ValueError, IndexError) as e:
                raise DatasetLayoutError(
                    f"{list_file}:{lineno}: malformed line {line.rstrip()!r} ({e}); {_MSMT_LAYOUT}"
                ) from e
            records.append(Record(str(image_dir / rel), pid, cam - 1))
    if not records:
        raise DatasetLayoutError(f"list file {list_file} has no entries")
    return records


def load_msmt17(root: str | os.PathLike, version: str = "auto", use_val: bool = True) -> ReIDData:
    """Load MSMT17 (V1 or V2) from its list files.

    Args:
        root: the MSMT17 folder (image folders plus ``list_*.txt``).
        version: "auto" (detect from the image folders), "V1" or "V2" (error if those folders are missing).
        use_val: add ``list_val.txt`` to train, as TransReID / PASS / TransReID-SSL do (fast-reid and torchreid
            do not); the val pids share the train numbering.

    Returns:
        The data set; ``info`` records "version" and "use_val". Query and gallery keep their list pids.

    Raises:
        DatasetLayoutError: missing root, image folder or list file, malformed list line, empty list.
    """
    root = Path(root)
    _require_dir(root, _MSMT_LAYOUT)
    version = _msmt_version(root, version)
    train_dir, test_dir = (root / d for d in _MSMT_DIRS[version])
    train = _msmt_list(root / "list_train.txt", train_dir)
    if use_val:
        train += _msmt_list(root / "list_val.txt", train_dir)
    return ReIDData(
        name="msmt17",
        train=_relabel(train),
        query=_msmt_list(root / "list_query.txt", test_dir),
        gallery=_msmt_list(root / "list_gallery.txt", test_dir),
        info={"version": version, "use_val": str(use_val)},
    )


def _find_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def list_image_folder(root: str | os.PathLike) -> list[str]:
    """All images under ``root`` at any depth (hidden files and folders skipped), sorted for determinism.

    Raises:
        DatasetLayoutError: ``root`` is not a folder or holds no image.
    """
    root = Path(root)
    _require_dir(root, f"expected a folder of images ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
    images = _find_images(root)
    if not images:
        raise DatasetLayoutError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return images


def load_labeled_folder(root: str | os.PathLike, name: str = "folder") -> list[Record]:
    """Load ``ROOT/<identity>/<image>``: identities relabelled 0..N-1 in sorted folder-name order.

    The camera comes from ``_c<number>`` in the file name (camid = number - 1). Without it every image gets camid 0
    and one warning is logged: used as query/gallery, such a folder loses every true match to the same-camera filter
    of the re-id protocol, so only use it for training.

    Args:
        root: folder of identity folders.
        name: data set name used in messages.

    Raises:
        DatasetLayoutError: missing root, no image in any identity folder, or a ``_c0`` camera.
    """
    root = Path(root)
    layout = f"{name}: expected ROOT/<identity>/<image>"
    _require_dir(root, layout)
    records, no_camera = [], 0
    identities = sorted(d for d in os.listdir(root) if not d.startswith(".") and (root / d).is_dir())
    image_lists = [_find_images(root / d) for d in identities]
    for pid, paths in enumerate(p for p in image_lists if p):  # empty identity folders get no label: no gaps
        for path in paths:
            match = _FOLDER_CAMERA.search(os.path.basename(path))
            no_camera += match is None
            cam = int(match.group(1)) if match else 1
            if cam < 1:
                raise DatasetLayoutError(f"{path}: camera numbers start at 1 (_c1)")
            records.append(Record(path, pid, cam - 1))
    if not records:
        raise DatasetLayoutError(f"no images under {root}; {layout}")
    if no_camera:
        logger.warning(
            "%s: no camera (_c<number>) in %d of %d file names under %s; using camid 0 for them. "
            "Same-camera filtering would remove every true match if this folder is used as query/gallery.",
            name,
            no_camera,
            len(records),
            root,
        )
    return records


def combine_train_sets(sets: Sequence[list[Record]]) -> list[Record]:
    """Concatenate train sets, shifting each set's pids and camids past the previous ones so none collide.

    Offsets are max + 1 of the previous set (not its count) so non-contiguous labels cannot overlap either.

    Raises:
        ValueError: a set contains a negative pid or camid (train sets must be fully labeled).
    """
    combined: list[Record] = []
    pid_offset = cam_offset = 0
    for records in sets:
        if not records:
            continue
        if min(r.pid for r in records) < 0 or min(r.camid for r in records) < 0:
            raise ValueError("combine_train_sets: train records must have pid >= 0 and camid >= 0")
        combined += [Record(r.path, r.pid + pid_offset, r.camid + cam_offset) for r in records]
        pid_offset += max(r.pid for r in records) + 1
        cam_offset += max(r.camid for r in records) + 1
    return combined


def format_table(data: ReIDData) -> str:
    """Summary table in fast-reid style: subset | # ids | # images | # cameras, then one line per ``info`` entry."""
    rule = "  " + "-" * 43
    lines = [f"=> Loaded {data.name}", rule, "  subset   | # ids | # images | # cameras", rule]
    for subset, records in (("train", data.train), ("query", data.query), ("gallery", data.gallery)):
        ids, cams = len({r.pid for r in records}), len({r.camid for r in records})
        lines.append(f"  {subset:<8} | {ids:>5} | {len(records):>8} | {cams:>9}")
    lines.append(rule)
    lines += [f"  {key}: {value}" for key, value in data.info.items()]
    return "\n".join(lines)


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
    return lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False, meminit=False)


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
    cover every image.

    An item may be asked for as ``dataset[(i, seed)]`` (what :class:`~dino_recog.data.samplers.SeededBatches` yields):
    the transform then draws its randomness (python, numpy and torch CPU generators) from `seed` alone, and the
    process's own generators are left as they were.

    Args:
        items: ``list[Record]``, ``list[str]`` of paths, or ``LMDBImages``.
        transform: applied to the RGB ``PIL.Image``.
        train: skip (True) or raise on (False) corrupt images.
    """

    def __init__(
        self,
        items: Sequence[Record] | Sequence[str] | LMDBImages,
        transform: Callable[[Image.Image], Any] | None = None,
        train: bool = True,
    ) -> None:
        self.items = items
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int, int] | None:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[i]
        if isinstance(self.items, LMDBImages):
            name, pid, camid = f"{self.items.path}[{self.items.keys[i]}]", -1, -1
        elif isinstance(item, tuple):
            item, pid, camid = item
            name = item
        else:
            name, pid, camid = os.fspath(item), -1, -1
        try:
            img = read_image(item, name)
        except CorruptImageError as e:
            if not self.train:
                raise
            logger.warning("skipping a training image: %s", e)  # the message names the file
            return None
        if self.transform is None:
            return img, pid, camid, i
        with _seeded(seed) if seed is not None else contextlib.nullcontext():
            return self.transform(img), pid, camid, i


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
        ``(collated, n_skipped)``; ``(None, n_skipped)`` when every item was ``None``.
    """
    kept = [item for item in batch if item is not None]
    return (default_collate(kept) if kept else None), len(batch) - len(kept)
