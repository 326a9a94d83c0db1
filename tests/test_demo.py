"""Tests of the synthetic demo data generator (dino_recog.data.demo)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from dino_recog.data import demo

SMALL = {"train_ids": 8, "test_ids": 6, "unlabeled_ids": 5, "distractors": 5, "junk": 3}
MARKET_RE = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
MARKET_DIRS = ("bounding_box_train", "query", "bounding_box_test")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _parse(folder: Path) -> list[tuple[int, int, Path]]:
    """Returns (pid, camera, path) of every file, asserting the Market-1501 naming."""
    out = []
    for path in sorted(folder.iterdir()):
        m = MARKET_RE.match(path.name)
        assert m, f"bad Market name {path.name}"
        out.append((int(m.group(1)), int(m.group(2)), path))
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "set"
    return root, demo.generate(root, seed=0, **SMALL)


def test_same_seed_is_byte_identical_and_other_seed_differs(small_set: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = small_set
    demo.generate(tmp_path / "again", seed=0, **SMALL)
    demo.generate(tmp_path / "other", seed=1, **SMALL)
    first = _hashes(root)
    assert len(first) > 100
    assert _hashes(tmp_path / "again") == first
    other = _hashes(tmp_path / "other")
    assert not set(other.values()) & {h for name, h in first.items() if name.endswith(".jpg")}


def test_market_layout_naming_and_image_format(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    assert (root / demo._COMPLETE).is_file()
    files = {d: _parse(root / "market" / d) for d in MARKET_DIRS}
    for entries in files.values():
        assert entries
        for _, cam, path in entries[:: max(1, len(entries) // 20)]:
            with Image.open(path) as img:
                assert (img.format, img.size, img.mode) == ("JPEG", (64, 128), "RGB")
            assert 1 <= cam <= 6
    train = {pid for pid, _, _ in files["bounding_box_train"]}
    test = {pid for pid, _, _ in files["query"] + files["bounding_box_test"]} - {0, -1}
    assert not train & test
    assert not {pid for pid, _, _ in files["bounding_box_train"] + files["query"]} & {0, -1}
    gallery_pids = [pid for pid, _, _ in files["bounding_box_test"]]
    assert gallery_pids.count(0) == SMALL["distractors"] and gallery_pids.count(-1) == SMALL["junk"]
    cams_per_id: dict[int, set[int]] = defaultdict(set)
    for pid, cam, _ in files["bounding_box_train"] + files["query"] + files["bounding_box_test"]:
        cams_per_id[pid].add(cam)
    assert all(len(cams) >= 2 for pid, cams in cams_per_id.items() if pid > 0)


def test_every_query_has_a_cross_camera_match(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    gallery = {(pid, cam) for pid, cam, _ in _parse(root / "market" / "bounding_box_test")}
    queries = _parse(root / "market" / "query")
    assert {pid for pid, _, _ in queries} == {pid for pid, _ in gallery} - {0, -1}
    seen: set[tuple[int, int]] = set()
    for pid, cam, _ in queries:
        assert (pid, cam) not in seen, "one query per identity and camera"
        seen.add((pid, cam))
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery)


def test_counts_agree_with_stats(small_set: tuple[Path, dict]) -> None:
    root, stats = small_set
    assert json.loads((root / "demo_stats.json").read_text()) == stats
    assert (stats["seed"], stats["version"]) == (0, demo.DEMO_VERSION)
    splits = stats["splits"]
    for split, folder in zip(("train", "query", "gallery"), MARKET_DIRS, strict=True):
        entries = _parse(root / "market" / folder)
        loaded = [(pid, cam) for pid, cam, _ in entries if pid != -1]  # junk is on disk but never loaded
        assert splits[split]["images"] == len(loaded)
        assert splits[split]["ids"] == len({pid for pid, _ in loaded} - {0})
        assert splits[split]["cameras"] == len({cam for _, cam in loaded})
    assert splits["train"]["ids"] == SMALL["train_ids"] and splits["query"]["ids"] == SMALL["test_ids"]
    assert (splits["gallery"]["distractors"], splits["gallery"]["junk"]) == (SMALL["distractors"], SMALL["junk"])
    assert splits["unlabeled"]["ids"] == SMALL["unlabeled_ids"]


def test_reported_counts_are_the_loaders(small_set: tuple[Path, dict]) -> None:
    # The generator used to count junk in the gallery images (and distractors nowhere) while the loader counted the
    # distractors' pid 0 as one more identity and left the junk out: 100 ids / 973 images against 101 / 923.
    from dino_recog.data.parsers import format_table, load_market1501, split_counts

    root, stats = small_set
    data = load_market1501(root / "market")
    loaded = split_counts(data)
    for split in ("train", "query", "gallery"):
        reported = {k: v for k, v in stats["splits"][split].items() if v or k not in ("distractors", "junk")}
        assert loaded[split] == reported
    assert loaded["gallery"]["ids"] == SMALL["test_ids"]
    assert (loaded["gallery"]["distractors"], loaded["gallery"]["junk"]) == (SMALL["distractors"], SMALL["junk"])
    table = format_table(data)
    g = loaded["gallery"]
    assert f"  gallery  | {g['ids']:>5} | {g['images']:>8} | {g['cameras']:>9}" in table
    assert f"gallery: {SMALL['distractors']} distractor images (pid 0) in # images, not in # ids; " \
           f"{SMALL['junk']} junk images (pid -1) not loaded" in table  # fmt: skip
    printed = demo._table(stats).splitlines()
    assert printed[3].split()[:4] == ["gallery", str(g["ids"]), str(g["images"]), str(g["cameras"])]


def test_unlabeled_pool(small_set: tuple[Path, dict]) -> None:
    root, stats = small_set
    images = sorted((root / "lup" / "images").rglob("*.jpg"))
    assert len(images) == stats["splits"]["unlabeled"]["images"] >= 5 * SMALL["unlabeled_ids"]
    objects, sizes = set(), set()
    for path in images:
        assert re.fullmatch(r"\d{2}_\d{2}_\d{4}", path.parent.name), path
        assert re.fullmatch(r"\d{8}_\d{4}\.jpg", path.name), path
        objects.add((path.parent.name, path.name[9:13]))
        with Image.open(path) as img:
            w, h = img.size
            sizes.add(img.size)
            assert img.mode == "RGB" and 96 <= h <= 192 and 1.6 < h / w < 2.5
    assert len(objects) == SMALL["unlabeled_ids"]
    assert len(sizes) > 1
    assert not set(_hashes(root / "market").values()) & {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(ValueError, match="not empty"):
        demo.generate(tmp_path / "full", **SMALL)
    with pytest.raises(ValueError, match="cameras"):
        demo.generate(tmp_path / "a", cameras=10, **SMALL)
    with pytest.raises(ValueError):
        demo.generate(tmp_path / "b", train_ids=1000, test_ids=600)


@pytest.fixture()
def small_ensure(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Makes ensure_demo generate small sets, recording each generation's directory."""
    calls: list[Path] = []
    real = demo.generate

    def fake(out: Path, seed: int = 0) -> dict:
        calls.append(Path(out))
        return real(out, seed=seed, **SMALL)

    monkeypatch.setattr(demo, "generate", fake)
    return calls


def test_ensure_demo_generates_once(tmp_path: Path, small_ensure: list[Path]) -> None:
    root = tmp_path / "demo"
    assert demo.ensure_demo(root) == root
    assert len(small_ensure) == 1 and small_ensure[0].parent == tmp_path and small_ensure[0] != root
    assert json.loads((root / "demo_stats.json").read_text())["seed"] == 0
    mtime = (root / demo._COMPLETE).stat().st_mtime_ns
    assert demo.ensure_demo(str(root)) == root
    assert len(small_ensure) == 1 and (root / demo._COMPLETE).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary leftovers

    demo.ensure_demo(root, seed=3)  # another seed replaces the finished set
    assert len(small_ensure) == 2
    assert json.loads((root / "demo_stats.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_ensure_demo_refuses_unfinished_directory(tmp_path: Path, small_ensure: list[Path]) -> None:
    root = tmp_path / "half"
    (root / "market").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(root))):
        demo.ensure_demo(root)
    (tmp_path / "afile").touch()
    with pytest.raises(ValueError, match="afile"):
        demo.ensure_demo(tmp_path / "afile")
    assert not small_ensure
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (demo.ensure_demo(empty) / demo._COMPLETE).is_file()  # an empty directory is fine to fill


def test_ensure_demo_recovers_from_interrupted_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "demo"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    for pid in (123, int(dead.stdout), os.getpid()):  # leftovers that look like killed runs
        (tmp_path / f".demo.tmp-{pid}" / "market").mkdir(parents=True)
        (tmp_path / f".demo.tmp-{pid}" / "market" / "0001_c1s1_000001_01.jpg").touch()

    def crash(out: Path, seed: int = 0) -> dict:
        Path(out, "market").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "generate", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(root)
    assert not root.exists() and not (tmp_path / f".demo.tmp-{os.getpid()}").exists()
    monkeypatch.undo()
    monkeypatch.setattr(demo, "generate", functools.partial(demo.generate, **SMALL))
    assert (demo.ensure_demo(root) / demo._COMPLETE).is_file()
    assert not (tmp_path / f".demo.tmp-{int(dead.stdout)}").exists()
    assert json.loads((root / "demo_stats.json").read_text())["splits"]["train"]["ids"] == SMALL["train_ids"]


def test_cli_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "--out",
        str(out),
        "--train-ids",
        "4",
        "--test-ids",
        "3",
        "--unlabeled-ids",
        "2",
        "--distractors",
        "2",
        "--junk",
        "1",
        "--cameras",
        "3",
        "--seed",
        "5",
    ]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    for word in ("train", "query", "gallery", "unlabeled", "ids", "images", "cameras"):
        assert word in printed
    stats = json.loads((out / "demo_stats.json").read_text())
    assert stats["seed"] == 5 and stats["splits"]["train"]["ids"] == 4 and stats["splits"]["train"]["cameras"] <= 3

    mtime = (out / demo._COMPLETE).stat().st_mtime_ns
    assert demo.main(args) == 0  # same settings: the finished set is reused
    assert (out / demo._COMPLETE).stat().st_mtime_ns == mtime and "train" in capsys.readouterr().out
    assert demo.main([*args[:-1], "6"]) == 0  # other settings replace it
    assert json.loads((out / "demo_stats.json").read_text())["seed"] == 6

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").touch()
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "mine")])
    assert str(tmp_path / "mine") in capsys.readouterr().err


def test_minimal_set(tmp_path: Path) -> None:
    stats = demo.generate(
        tmp_path / "min", seed=2, train_ids=1, test_ids=1, cameras=2, unlabeled_ids=0, distractors=0, junk=0
    )
    assert stats["splits"]["unlabeled"] == {"ids": 0, "images": 0}
    assert (tmp_path / "min" / "lup" / "images").is_dir()
    assert stats["splits"]["query"]["ids"] == 1 and stats["splits"]["gallery"]["images"] >= 1
    queries = _parse(tmp_path / "min" / "market" / "query")
    gallery = _parse(tmp_path / "min" / "market" / "bounding_box_test")
    assert all(any(g_cam != q_cam for _, g_cam, _ in gallery) for _, q_cam, _ in queries)
