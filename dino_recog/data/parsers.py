"""Data-set parsers: Market-1501, MSMT17, labeled and unlabeled image folders -> records.

Labeled sets come back as lists of ``Record(path, pid, camid)`` with 0-based cameras, grouped in a :class:`ReIDData`;
only names and list files are read here, images are decoded when :class:`~dino_recog.data.datasets.ImageDataset`
loads them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetLayoutError",
    "Record",
    "ReIDData",
    "combine_train_sets",
    "format_table",
    "list_image_folder",
    "load_labeled_folder",
    "load_labeled_folder_splits",
    "load_dukemtmc",
    "load_market1501",
    "load_msmt17",
    "split_counts",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MARKET_LAYOUT = (
    "expected ROOT/bounding_box_train, ROOT/query, ROOT/bounding_box_test with files like 0002_c1s1_000451_03.jpg"
)
_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_MARKET_NAME = re.compile(r"(-1|\d+)_c(\d)")  # junk is -1; "12-34_c1" is not a name of this layout
_MSMT_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_LAYOUT = (
    "expected ROOT/train + ROOT/test (MSMT17_V1) or ROOT/mask_train_v2 + ROOT/mask_test_v2 (MSMT17_V2), plus "
    "ROOT/list_train.txt, list_val.txt, list_query.txt, list_gallery.txt with lines like "
    "'0000/0000_000_01_0303morning_0015_0.jpg 0'"
)
_FOLDER_CAMERA = re.compile(r"_c(\d+)")


class DatasetLayoutError(ValueError):
    """A data set root that does not have the expected folders, file names or list lines."""


class Record(NamedTuple):
    """One labeled image: ``camid`` is 0-based, ``pid`` -1 never appears (junk is dropped at load time)."""

    path: str
    pid: int
    camid: int


@dataclass
class ReIDData:
    """A labeled re-identification data set; query and gallery share one identity numbering.

    ``distractor_pid`` is the label of the query/gallery images of nobody in particular (0 in the Market-1501 layout,
    None where a set has none): they stay in the gallery as negatives but are no identity. ``junk`` counts, per split,
    the images the protocol ignores (Market-1501's pid -1), left out of the records at load time.
    """

    name: str
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    info: dict[str, str] = field(default_factory=dict)
    distractor_pid: int | None = None
    junk: dict[str, int] = field(default_factory=dict)

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


def _market_split(folder: Path, max_pid: int = 1501, max_cam: int = 6) -> tuple[list[Record], int]:
    """The records of one Market-1501-style folder and the number of junk images (pid -1) left out."""
    _require_dir(folder, _MARKET_LAYOUT)
    records, junk = [], 0
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.lower().endswith(".jpg"):
            continue
        match = _MARKET_NAME.match(name)
        if match is None:
            raise DatasetLayoutError(f"cannot parse identity and camera from {folder / name}; {_MARKET_LAYOUT}")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:  # junk boxes: the protocol ignores them entirely
            junk += 1
            continue
        if not (0 <= pid <= max_pid and 1 <= cam <= max_cam):
            raise DatasetLayoutError(f"{folder / name}: pid {pid} / camera {cam} outside 0..{max_pid} / 1..{max_cam}")
        records.append(Record(str(folder / name), pid, cam - 1))
    if not records:
        raise DatasetLayoutError(f"no usable .jpg images in {folder}; {_MARKET_LAYOUT}")
    return records, junk


def _market_layout(name: str, root: Path, max_pid: int, max_cam: int) -> ReIDData:
    """Market-1501's folders and naming: junk (pid -1) counted and dropped, distractors (pid 0) kept, train pids
    relabelled."""
    _require_dir(root, _MARKET_LAYOUT)
    splits = {s: _market_split(root / f, max_pid, max_cam) for s, f in _MARKET_FOLDERS.items()}
    return ReIDData(name, _relabel(splits["train"][0]), splits["query"][0], splits["gallery"][0], distractor_pid=0,
                    junk={s: n for s, (_, n) in splits.items() if n})  # fmt: skip


def load_market1501(root: str | os.PathLike) -> ReIDData:
    """Load Market-1501: junk (pid -1) dropped, distractors (pid 0) kept, train pids relabelled to 0..N-1.

    Args:
        root: folder holding ``bounding_box_train``, ``query`` and ``bounding_box_test``.

    Returns:
        The data set (751 ids / 12,936 train, 750 ids / 3,368 query, 15,913 gallery images on the real data).

    Raises:
        DatasetLayoutError: missing root or split, unparsable file name, pid/camera out of range, empty split.
    """
    return _market_layout("market1501", Path(root), 1501, 6)


def load_dukemtmc(root: str | os.PathLike) -> ReIDData:
    """Load DukeMTMC-reID, which has Market-1501's folders and file names (``0001_c2_f0046182.jpg``) with 8 cameras
    (702 ids / 16,522 train, 702 ids / 2,228 query, 17,661 gallery images on the real data)."""
    return _market_layout("dukemtmcreid", Path(root), 9999, 8)


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
    # surrogateescape: a name that is not UTF-8 becomes the str os.fsdecode gives for it on disk, so it opens
    with open(list_file, encoding="utf-8", errors="surrogateescape") as f:
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


def split_counts(data: ReIDData) -> dict[str, dict[str, int]]:
    """Per split (train, query, gallery): ``ids`` identities (distractors not counted: they are nobody in
    particular), ``images`` loaded images (distractors included, junk not: it is not loaded), ``cameras`` among the
    loaded images, and, where there are any, ``distractors`` (images) and ``junk`` (images left out)."""
    counts = {}
    for split, records in (("train", data.train), ("query", data.query), ("gallery", data.gallery)):
        # Train pids are relabelled 0..N-1, so a train pid 0 is a person, never a distractor.
        distractor = data.distractor_pid if split != "train" else None
        c = {"ids": len({r.pid for r in records} - {distractor}), "images": len(records),
             "cameras": len({r.camid for r in records})}  # fmt: skip
        if n := sum(r.pid == distractor for r in records):
            c["distractors"] = n
        if data.junk.get(split):
            c["junk"] = data.junk[split]
        counts[split] = c
    return counts


def format_table(data: ReIDData) -> str:
    """Summary table in fast-reid style: subset | # ids | # images | # cameras (as `split_counts` counts them), a line
    per split with distractors or junk, then one line per ``info`` entry."""
    rule = "  " + "-" * 43
    lines = [f"=> Loaded {data.name}", rule, "  subset   | # ids | # images | # cameras", rule]
    counts = split_counts(data)
    for subset, c in counts.items():
        lines.append(f"  {subset:<8} | {c['ids']:>5} | {c['images']:>8} | {c['cameras']:>9}")
    lines.append(rule)
    for subset, c in counts.items():
        notes = []
        if "distractors" in c:
            notes.append(f"{c['distractors']} distractor images (pid {data.distractor_pid}) in # images, not in # ids")
        if "junk" in c:
            notes.append(f"{c['junk']} junk images (pid -1) not loaded")
        if notes:
            lines.append(f"  {subset}: {'; '.join(notes)}")
    lines += [f"  {key}: {value}" for key, value in data.info.items()]
    return "\n".join(lines)


_FOLDER_SPLITS = (
    "expected ROOT/query/<identity>/<image> + ROOT/gallery/<identity>/<image> (re-identification; cameras from _c<N> "
    "in the file names) or ROOT/train/<class>/<image> + ROOT/val/<class>/<image> (ImageNet style, for eval_knn.py)"
)


def load_labeled_folder_splits(root: str | os.PathLike, name: str = "labeled_folder") -> ReIDData:
    """A labeled folder as an evaluation set: ``ROOT/query/<id>/`` + ``ROOT/gallery/<id>/``, or, ImageNet style as
    the official DINO ``eval_knn.py`` reads it, ``ROOT/val/<class>/`` (the queries) + ``ROOT/train/<class>/`` (the
    gallery the queries are classified against). The training split is ``ROOT/train/`` where it exists.

    Identity folders with the same name are the same identity in both splits (pids 1..N, in sorted name order: pid 0
    would be a distractor to the protocol). Cameras come from ``_c<N>`` in the file names. Where no file name has
    one, every query gets camera 0 and every gallery image camera 1, so the protocol's same-camera rule, which would
    remove every true match, cannot apply; that is logged and recorded in ``info``. Some names with a camera and some
    without is an error naming one of each.
    """
    root = Path(root)
    _require_dir(root, _FOLDER_SPLITS)
    if (root / "query").is_dir() or (root / "gallery").is_dir():
        layout, splits = "query/gallery", {"query": root / "query", "gallery": root / "gallery"}
    elif (root / "val").is_dir() or (root / "train").is_dir():
        layout, splits = "train/val", {"query": root / "val", "gallery": root / "train"}
    else:
        raise DatasetLayoutError(f"{name} {root}: no query/gallery or train/val folders; {_FOLDER_SPLITS}")
    for folder in splits.values():
        _require_dir(folder, _FOLDER_SPLITS)
    found = {split: _identity_folders(folder) for split, folder in splits.items()}
    ids = sorted({d for per_id in found.values() for d, paths in per_id.items() if paths})
    pid = {d: i + 1 for i, d in enumerate(ids)}
    paths = {split: [(p, pid[d]) for d, ps in per_id.items() for p in ps] for split, per_id in found.items()}
    for split, folder in splits.items():
        if not paths[split]:
            raise DatasetLayoutError(f"no images under {folder}; {_FOLDER_SPLITS}")
    every = [p for split in paths.values() for p, _ in split]
    cams = {p: _FOLDER_CAMERA.search(os.path.basename(p)) for p in every}
    with_cam = [p for p in every if cams[p]]
    info = {"layout": layout}
    if with_cam and len(with_cam) < len(every):
        without = next(p for p in every if not cams[p])
        raise DatasetLayoutError(f"{name} {root}: {with_cam[0]} names a camera (_c<N>) but {without} does not; "
                                 "expected a camera in every file name or in none")  # fmt: skip
    split_records = {}
    for i, (split, items) in enumerate(paths.items()):
        records = []
        for path, label in items:
            cam = int(cams[path].group(1)) - 1 if with_cam else i  # no cameras: query 0, gallery 1
            if cam < 0:
                raise DatasetLayoutError(f"{path}: camera numbers start at 1 (_c1)")
            records.append(Record(path, label, cam))
        split_records[split] = records
    if not with_cam:
        info["same_camera_rule"] = "off (no _c<N> camera in the file names)"
        logger.warning("%s %s: no camera (_c<N>) in the file names; the same-camera rule of the protocol is off",
                       name, root)  # fmt: skip
    has_train = layout == "query/gallery" and (root / "train").is_dir()
    train = load_labeled_folder(root / "train", name) if has_train else []
    return ReIDData(name, train, split_records["query"], split_records["gallery"], info)


def _identity_folders(folder: Path) -> dict[str, list[str]]:
    names = sorted(d for d in os.listdir(folder) if not d.startswith(".") and (folder / d).is_dir())
    return {d: _find_images(folder / d) for d in names}
