"""Deterministic synthetic person re-identification data for demos, smoke tests and CI.

``generate`` draws little people with simple shapes (:mod:`dino_recog.data.demo_draw`) and writes them in the exact
Market-1501 layout and file naming (``market/bounding_box_train``, ``market/query``, ``market/bounding_box_test``),
plus an unlabeled pool of other identities in the LUPerson crop-folder form
(``lup/images/<cc>_<ci>_<vvvv>/<frame>_<obj>.jpg``) for self-supervised pretraining. Identities share colours and
garments from small palettes and every camera has its own lighting, colour cast, background, blur and occluders, so
colour statistics alone match poorly while a trained network can learn the identities from the combination of build,
garments, patterns and accessories.

Run ``python -m dino_recog.data.demo --out DIR`` or call :func:`ensure_demo` for an idempotent, atomic set-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .demo_draw import MARKET_SIZE, Camera, make_camera, make_person, render

DEMO_VERSION = 2
"""Bump whenever the generator's output changes, so :func:`ensure_demo` rebuilds stale sets (2: the gallery counts
of ``demo_stats.json`` leave junk out, as the loader does)."""

logger = logging.getLogger(__name__)

_JPEG_QUALITY = 90
_MAX_PID = 1501
_COMPLETE = ".complete"
_STATS = "demo_stats.json"
# Independent random streams, so e.g. an identity looks the same whatever the other counts are.
_S_PIDS, _S_CAMERA, _S_LABELLED, _S_DISTRACTOR, _S_JUNK, _S_VIDEO, _S_UNLABELED = range(7)


def _save(img: Image.Image, path: Path) -> None:
    img.save(path, "JPEG", quality=_JPEG_QUALITY)


class _Market:
    """Writes Market-1501 crops, keeping file names unique and per-split statistics.

    The statistics count what the Market-1501 loader (`parsers.split_counts`) counts: identities without the
    distractors (pid 0), images and cameras with the distractors but without the junk (pid -1, which the loader
    leaves out), and distractor and junk images apart.
    """

    def __init__(self, root: Path, cams: list[Camera]) -> None:
        self.root, self.cams, self.used = root, cams, set()
        self.stats: dict[str, dict] = {
            s: {"ids": set(), "images": 0, "cameras": set(), "distractors": 0, "junk": 0}
            for s in ("train", "query", "gallery")
        }
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            (root / folder).mkdir(parents=True)

    def track(self, rng: np.random.Generator, pid: int, cam: int, n: int) -> list[str]:
        """Returns ``n`` unused names of one sequence: same camera and seq, increasing frames."""
        seq, frame = int(rng.integers(1, 7)), int(rng.integers(0, 200_000))
        prefix = "-1" if pid == -1 else f"{pid:04d}"  # Market-1501 writes junk as "-1", not "-001"
        names = []
        for _ in range(n):
            frame += int(rng.integers(5, 60))
            box = 1
            # Distractors and junk share pid/camera among many images; the detection index keeps names apart.
            while (name := f"{prefix}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg") in self.used:
                box += 1
            self.used.add(name)
            names.append(name)
        return names

    def write(self, split: str, name: str, img: Image.Image, pid: int, cam: int) -> None:
        folder = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}[split]
        _save(img, self.root / folder / name)
        st = self.stats[split]
        if pid == -1:
            st["junk"] += 1
            return
        st["images"] += 1
        st["cameras"].add(cam)
        if pid == 0:
            st["distractors"] += 1
        else:
            st["ids"].add(pid)


def _labelled_identity(market: _Market, rng: np.random.Generator, pid: int, train: bool) -> None:
    person, n_cams = make_person(rng), len(market.cams)
    cams = sorted(int(c) for c in rng.choice(n_cams, int(rng.integers(2, n_cams + 1)), replace=False))
    if train:
        counts = 1 + rng.multinomial(int(rng.integers(10, 15)) - len(cams), np.full(len(cams), 1 / len(cams)))
        query_cams: set[int] = set()
    else:
        # Every camera keeps >= 1 gallery image and an identity spans >= 2 cameras, so each query has a match
        # in another camera; like Market-1501, a query camera contributes exactly one query.
        counts = rng.integers(1, 4, len(cams))
        query_cams = {int(c) for c in rng.choice(cams, int(rng.integers(1, len(cams) + 1)), replace=False)}
    for cam, n in zip(cams, counts, strict=True):
        n = int(n) + (cam in query_cams)
        track_back = rng.random() < market.cams[cam].back_prob
        query_at = int(rng.integers(n)) if cam in query_cams else -1
        for i, name in enumerate(market.track(rng, pid, cam, n)):
            img = render(market.cams[cam], rng, MARKET_SIZE, person, track_back ^ bool(rng.random() < 0.15))
            split = "train" if train else ("query" if i == query_at else "gallery")
            market.write(split, name, img, pid, cam)


def _unlabeled_pool(root: Path, seed: int, n_ids: int) -> int:
    """Writes ``n_ids`` unseen identities in LUPerson video folders; returns the number of images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng([seed, _S_VIDEO])
    videos: dict[str, Camera] = {}
    while len(videos) < -(-n_ids // 10):  # about ten people per video, like busy street footage
        name = f"{rng.integers(1, 100):02d}_{rng.integers(1, 100):02d}_{rng.integers(0, 10_000):04d}"
        if name not in videos:
            videos[name] = make_camera(np.random.default_rng([seed, _S_VIDEO, len(videos)]))
    names, objects, images = sorted(videos), dict.fromkeys(videos, 0), 0
    for i in range(n_ids):
        rng = np.random.default_rng([seed, _S_UNLABELED, i])
        person, video = make_person(rng), names[int(rng.integers(len(names)))]
        folder, obj, frame = root / video, objects[video], int(rng.integers(0, 50_000))
        objects[video] += 1
        folder.mkdir(parents=True, exist_ok=True)
        back = rng.random() < videos[video].back_prob
        for _ in range(int(rng.integers(5, 8))):
            frame += int(rng.integers(1, 25))
            h = int(rng.integers(96, 193))
            size = (round(h / 2 * rng.uniform(0.85, 1.15)), h)  # detector boxes vary in size and aspect
            _save(render(videos[video], rng, size, person, back), folder / f"{frame:08d}_{obj:04d}.jpg")
            images += 1
    return images


def generate(
    out: str | Path,
    seed: int = 0,
    train_ids: int = 150,
    test_ids: int = 100,
    cameras: int = 6,
    unlabeled_ids: int = 300,
    distractors: int = 100,
    junk: int = 50,
) -> dict:
    """Writes a synthetic Market-1501-style set and a LUPerson-style unlabeled pool into ``out``.

    The same arguments give byte-identical files (for the same numpy and Pillow versions). ``out/.complete`` is
    written last, so its presence marks a finished generation.

    Args:
        out: Destination directory; must not exist or be empty.
        seed: Seed of every random choice.
        train_ids: Identities in ``bounding_box_train``.
        test_ids: Identities in ``query`` and ``bounding_box_test``, disjoint from the training identities.
        cameras: Number of cameras, 2..9 (Market-1501 has 6).
        unlabeled_ids: Further identities in the unlabeled pool ``lup/images``.
        distractors: Gallery images of unrelated people, labelled pid 0000.
        junk: Gallery images of bad detections (fragments, background), labelled pid -1.

    Returns:
        The statistics also written to ``out/demo_stats.json``: per split the identities (``ids``, distractors not
        counted), ``images`` and ``cameras`` as the Market-1501 loader counts them (distractors included, junk left
        out), and for the gallery the ``distractors`` and ``junk`` images apart.

    Raises:
        ValueError: On invalid counts or when ``out`` is a non-empty directory.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 2 <= cameras <= 9:
        raise ValueError(f"cameras must be in 2..9 (one digit in Market names), got {cameras}")
    if min(train_ids, test_ids) < 1 or train_ids + test_ids > _MAX_PID:
        raise ValueError(f"need 1 <= train_ids, test_ids and train_ids + test_ids <= {_MAX_PID}")
    if min(unlabeled_ids, distractors, junk) < 0:
        raise ValueError("unlabeled_ids, distractors and junk must be >= 0")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; delete it or choose another --out")

    cams = [make_camera(np.random.default_rng([seed, _S_CAMERA, c])) for c in range(cameras)]
    pids = np.random.default_rng([seed, _S_PIDS]).choice(
        np.arange(1, _MAX_PID + 1), train_ids + test_ids, replace=False
    )
    market = _Market(out / "market", cams)
    logger.info("Generating %d train and %d test identities in %d cameras", train_ids, test_ids, cameras)
    for i, pid in enumerate(sorted(int(p) for p in pids[:train_ids]) + sorted(int(p) for p in pids[train_ids:])):
        _labelled_identity(market, np.random.default_rng([seed, _S_LABELLED, pid]), pid, train=i < train_ids)
    for stream, pid, count in ((_S_DISTRACTOR, 0, distractors), (_S_JUNK, -1, junk)):
        for i in range(count):
            rng = np.random.default_rng([seed, stream, i])
            cam = int(rng.integers(cameras))
            # Half of the junk is pure background, the rest an enlarged fragment of someone.
            person = make_person(rng) if pid == 0 or rng.random() < 0.5 else None
            img = render(
                cams[cam],
                rng,
                MARKET_SIZE,
                person,
                bool(rng.random() < 0.5),
                zoom=rng.uniform(1.8, 3.0) if pid == -1 else 1.0,
            )
            market.write("gallery", market.track(rng, pid, cam, 1)[0], img, pid, cam)
    logger.info("Generating %d unlabeled identities", unlabeled_ids)
    unlabeled_images = _unlabeled_pool(out / "lup" / "images", seed, unlabeled_ids)

    splits: dict[str, dict] = {
        k: {"ids": len(v["ids"]), "images": v["images"], "cameras": len(v["cameras"])} for k, v in market.stats.items()
    }
    splits["gallery"].update(distractors=market.stats["gallery"]["distractors"], junk=market.stats["gallery"]["junk"])
    splits["unlabeled"] = {"ids": unlabeled_ids, "images": unlabeled_images}
    stats = {"seed": seed, "version": DEMO_VERSION, "splits": splits}
    (out / _STATS).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    params = {
        "train_ids": train_ids,
        "test_ids": test_ids,
        "cameras": cameras,
        "unlabeled_ids": unlabeled_ids,
        "distractors": distractors,
        "junk": junk,
    }
    marker = {"seed": seed, "version": DEMO_VERSION, "params": params}
    (out / _COMPLETE).write_text(json.dumps(marker, sort_keys=True) + "\n")
    return stats


def _is_current(root: Path, seed: int, params: dict | None) -> bool:
    """Tells whether ``root`` is a finished set of this seed and version (and of ``params`` unless None)."""
    try:
        marker = json.loads((root / _COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or (marker.get("seed"), marker.get("version")) != (seed, DEMO_VERSION):
        return False
    return params is None or marker.get("params") == params


def _remove_stale(root: Path) -> None:
    """Removes leftovers of interrupted runs: our own pid's, or those of processes no longer alive on this host."""
    for path in root.parent.glob(f".{root.name}.*-*"):
        kind, _, pid = path.name[len(root.name) + 2 :].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # its owner may still be generating
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, owned by another user
        logger.warning("Removing leftover %s of an interrupted demo generation", path)
        shutil.rmtree(path, ignore_errors=True)


def ensure_demo(root: str | Path, seed: int = 0) -> Path:
    """Returns ``root`` holding a finished default-size demo set for ``seed``, generating it first if needed.

    Generation happens in a temporary sibling directory that is renamed into place, so an interrupted run never
    leaves a set that looks finished. A finished set of this seed and version is reused whatever its counts (so a
    small set made with :func:`generate` or the CLI is accepted); one of another seed or version is replaced.

    Args:
        root: Directory of the demo set.
        seed: Seed of the set.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: If ``root`` exists, is not empty and is not a finished demo set.
    """
    return _build(Path(root), seed, None)


def _build(root: Path, seed: int, params: dict | None) -> Path:
    """Implements :func:`ensure_demo` and the CLI.

    ``params`` are :func:`generate`'s counts, which a finished set must also match to be reused; None generates with
    the defaults and reuses a finished set of any counts.
    """
    if _is_current(root, seed, params):
        logger.info("Reusing the finished demo set in %s", root)
        return root
    if root.exists() and not (root.is_dir() and ((root / _COMPLETE).exists() or not any(root.iterdir()))):
        raise ValueError(f"{root} exists but is not a finished demo set (no {_COMPLETE}); delete it to regenerate")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    logger.info("Generating the demo set (seed %d) in %s", seed, root)
    try:
        generate(tmp, seed=seed, **(params or {}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not _is_current(root, seed, params):  # unless a concurrent process has just put the same set in place
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        if root.exists():  # an empty directory or a finished set of another seed, version or counts
            os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def _table(stats: dict) -> str:
    rows = [f"{'split':<10}{'ids':>6}{'images':>8}{'cameras':>9}"]
    for split in ("train", "query", "gallery", "unlabeled"):
        st = stats["splits"][split]
        row = f"{split:<10}{st['ids']:>6}{st['images']:>8}{st.get('cameras', '-'):>9}"
        if split == "gallery":
            row += f"  (images incl. {st['distractors']} distractors pid 0000; + {st['junk']} junk pid -1, not loaded)"
        rows.append(row)
    rows.append("ids: identities, distractors not counted; images: those the Market-1501 loader reads, junk left out")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: builds a demo set and prints its statistics.

    Like :func:`ensure_demo`, generation is atomic and a finished set at ``--out`` with the same seed, version and
    counts is reused, so running the command twice is cheap; one with other settings is replaced.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dino_recog.data.demo", description="Generate the synthetic person re-identification demo set."
    )
    parser.add_argument("--out", required=True, type=Path, help="destination: new, empty or an earlier demo set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-ids", type=int, default=150)
    parser.add_argument("--test-ids", type=int, default=100)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--unlabeled-ids", type=int, default=300)
    parser.add_argument("--distractors", type=int, default=100)
    parser.add_argument("--junk", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = {k: getattr(args, k) for k in ("train_ids", "test_ids", "cameras", "unlabeled_ids", "distractors", "junk")}
    try:
        root = _build(args.out, args.seed, params)
    except ValueError as e:
        parser.error(str(e))
    stats = json.loads((root / _STATS).read_text())
    print(f"demo set v{stats['version']} (seed {stats['seed']}) in {args.out}")
    print(_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
