"""Tests for dino_recog.data.datasets on tiny synthetic trees (real JPEGs of a few pixels)."""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino_recog import config as C
from dino_recog.data import build
from dino_recog.data import datasets as ds
from dino_recog.data.datasets import (
    CorruptImageError,
    DatasetLayoutError,
    ImageDataset,
    LMDBImages,
    Record,
    ReIDData,
    collate_skip_none,
    combine_train_sets,
    format_table,
    list_image_folder,
    load_labeled_folder,
    load_market1501,
    load_msmt17,
    read_image,
)

LOGGER = "dino_recog.data.datasets"


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_jpg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(color))
    return path


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))


# ----------------------------------------------------------------------------------------------------------- Market


def make_market(root: Path) -> Path:
    names = {
        "bounding_box_train": [
            "0002_c1s1_000451_03.jpg",
            "0002_c3s1_000551_01.jpg",
            "0007_c2s1_000123_01.jpg",
            "1500_c6s4_001234_02.jpg",
        ],
        "query": ["0002_c2s1_000301_00.jpg", "0007_c5s1_000401_00.jpg"],
        "bounding_box_test": [
            "0002_c1s1_000101_01.jpg",
            "0007_c4s2_000201_02.jpg",
            "0000_c1s1_000001_01.jpg",
            "0000_c6s1_000002_01.jpg",
            "-1_c1s1_000003_01.jpg",
            "-1_c3s1_000004_01.jpg",
        ],
    }
    for split, files in names.items():
        for name in files:
            write_jpg(root / split / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    return root


def test_market_counts_labels(tmp_path: Path) -> None:
    data = load_market1501(make_market(tmp_path))
    assert (len(data.train), len(data.query), len(data.gallery)) == (4, 2, 4)
    assert sorted({r.pid for r in data.train}) == [0, 1, 2]  # 2, 7, 1500 relabelled in sorted order
    assert [r.pid for r in data.train] == [0, 0, 1, 2]
    assert [r.camid for r in data.train] == [0, 2, 1, 5]
    assert [(r.pid, r.camid) for r in data.query] == [(2, 1), (7, 4)]
    gallery_pids = sorted(r.pid for r in data.gallery)
    assert gallery_pids == [0, 0, 2, 7]  # distractors kept, junk and Thumbs.db gone
    assert all(os.path.isfile(r.path) for r in data.train + data.query + data.gallery)
    assert data.num_train_pids == 3 and data.num_train_cams == 6
    table = format_table(data)
    assert "market1501" in table and "# ids" in table
    assert "  train    |     3 |        4 |         4" in table  # train pid 0 is a person (relabelled), counted
    # the gallery's ids without the distractors (pid 0), its images with them, the junk apart
    assert "  gallery  |     2 |        4 |         3" in table
    note = "  gallery: 2 distractor images (pid 0) in # images, not in # ids; 2 junk images (pid -1) not loaded"
    assert note in table
    assert "query:" not in table  # nothing to say about the query


def test_market_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="missing folder .*nowhere"):
        load_market1501(tmp_path / "nowhere")
    root = make_market(tmp_path / "m")
    os.rename(root / "query", root / "queries")
    with pytest.raises(DatasetLayoutError) as err:
        load_market1501(root)
    assert str(root / "query") in str(err.value) and "ROOT/bounding_box_train, ROOT/query" in str(err.value)
    assert "0002_c1s1_000451_03.jpg" in str(err.value)

    (root / "query").mkdir()
    (root / "query" / "Thumbs.db").write_bytes(b"\0")
    with pytest.raises(DatasetLayoutError, match=f"no usable .jpg images in {root / 'query'}"):
        load_market1501(root)

    write_jpg(root / "query" / "person.jpg")
    with pytest.raises(DatasetLayoutError, match="person.jpg"):
        load_market1501(root)
    os.remove(root / "query" / "person.jpg")
    write_jpg(root / "query" / "0002_c7s1_000001_00.jpg")
    with pytest.raises(DatasetLayoutError, match="0002_c7s1_000001_00.jpg"):
        load_market1501(root)


def test_file_names_that_are_not_utf8_are_read_as_the_file_system_gives_them(tmp_path: Path) -> None:
    """A name with the bytes \\xff \\xfe reaches Python surrogate-escaped (os.fsdecode); each parser keeps that str,
    which opens the file, and an MSMT17 list file with such bytes reads the same name (it was a UnicodeDecodeError)."""
    market = make_market(tmp_path / "m")
    odd = os.fsdecode(os.fsencode(market / "query") + b"/0009_c3s1_\xff\xfe.jpg")
    write_jpg(Path(odd))
    (query_record,) = [r for r in load_market1501(market).query if r.pid == 9]
    assert (query_record.path, query_record.camid) == (odd, 2) and ds.read_image(query_record.path).size == (8, 4)

    people = tmp_path / "people"
    write_jpg(people / "ann" / "a_c1.jpg")
    write_jpg(Path(os.fsdecode(os.fsencode(people) + b"/\xe9va/\xe9_c2.jpg")))  # Latin-1 folder and file names
    assert [(r.pid, r.camid) for r in load_labeled_folder(people)] == [(0, 0), (1, 1)]
    assert all(ds.read_image(r.path) for r in load_labeled_folder(people))

    root = make_msmt(tmp_path / "msmt", "V1")
    with open(root / "list_query.txt", "ab") as fh:
        fh.write(b"0003/0003_000_05_\xff\xfe.jpg 3\n")
    last = load_msmt17(root).query[-1]
    assert last.path == os.fsdecode(os.fsencode(root / "test") + b"/0003/0003_000_05_\xff\xfe.jpg")
    assert (last.pid, last.camid) == (3, 4)


# ----------------------------------------------------------------------------------------------------------- MSMT17

MSMT_LISTS = {
    "list_train.txt": [
        "0000/0000_000_01_0303morning_0015_0.jpg 0",
        "0000/0000_001_01_0303morning_0016_0.jpg 0",
        "0003/0003_000_14_0303noon_0901_1.jpg 3",
    ],
    "list_val.txt": ["0001/0001_000_15_0303afternoon_0040_0.jpg 1"],
    "list_query.txt": ["0000/0000_000_05_0303morning_0100_0.jpg 0", "0001/0001_000_02_0303noon_0111_0.jpg 1"],
    "list_gallery.txt": [
        "0000/0000_001_07_0303morning_0200_0.jpg 0",
        "0001/0001_002_03_0303noon_0211_1.jpg 1",
        "0002/0002_000_11_0304morning_0001_0.jpg 2",
    ],
}


def make_msmt(root: Path, version: str) -> Path:
    for folder in ds._MSMT_DIRS[version]:
        (root / folder).mkdir(parents=True)
    for name, lines in MSMT_LISTS.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17(tmp_path: Path, version: str) -> None:
    root = make_msmt(tmp_path, version)
    train_dir, test_dir = ds._MSMT_DIRS[version]
    data = load_msmt17(root)
    assert data.info == {"version": version, "use_val": "True"}
    assert len(data.train) == 4 and sorted({r.pid for r in data.train}) == [0, 1, 2]  # 0, 1(val), 3 relabelled
    assert [r.camid for r in data.train] == [0, 0, 13, 14]  # third field of the file name, minus one
    assert data.train[0].path == str(root / train_dir / "0000/0000_000_01_0303morning_0015_0.jpg")
    assert [(r.pid, r.camid) for r in data.query] == [(0, 4), (1, 1)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(0, 6), (1, 2), (2, 10)]
    assert all(r.path.startswith(str(root / test_dir)) for r in data.query + data.gallery)
    assert "version: " + version in format_table(data)

    no_val = load_msmt17(root, version=version.lower(), use_val=False)
    assert no_val.info["use_val"] == "False"
    assert len(no_val.train) == 3 and no_val.num_train_pids == 2

    other = "V2" if version == "V1" else "V1"
    with pytest.raises(DatasetLayoutError, match=f"MSMT17 {other} requested"):
        load_msmt17(root, version=other)


def test_msmt17_errors(tmp_path: Path) -> None:
    root = make_msmt(tmp_path / "both", "V1")
    for folder in ds._MSMT_DIRS["V2"]:
        (root / folder).mkdir()
    with pytest.raises(DatasetLayoutError, match="both of the V1/V2"):
        load_msmt17(root)
    assert load_msmt17(root, version="V2").info["version"] == "V2"
    with pytest.raises(ValueError, match="'V3'"):
        load_msmt17(root, version="V3")
    with pytest.raises(DatasetLayoutError, match="neither"):
        load_msmt17(tmp_path)

    root = make_msmt(tmp_path / "bad", "V1")
    lines = MSMT_LISTS["list_gallery.txt"] + ["0002/0002_000_11_0304morning_0002_0.jpg"]
    (root / "list_gallery.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=f"{root / 'list_gallery.txt'}:4"):
        load_msmt17(root)
    (root / "list_gallery.txt").write_text("0002/0002_000.jpg 2\n")
    with pytest.raises(DatasetLayoutError, match=f"{root / 'list_gallery.txt'}:1"):
        load_msmt17(root)
    os.remove(root / "list_val.txt")
    with pytest.raises(DatasetLayoutError, match="missing list file .*list_val.txt"):
        load_msmt17(root)


# ------------------------------------------------------------------------------------------------------------- LMDB


def make_lmdb(path: Path, n: int = 5) -> dict[str, bytes]:
    images = {f"01_02_0003_0000000{i}": jpeg_bytes((40 * i, 255 - 40 * i, 90), (8 + i, 4)) for i in range(n)}
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in images.items():
            txn.put(key.encode("ascii"), value)
        txn.put(b"__len__", str(n).encode())
    env.close()
    # Wrong on purpose: a reader that used keys.pkl would see one key only.
    (path / "keys.pkl").write_bytes(pickle.dumps(list(images)[:1]))
    return images


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("keys.pkl must never be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_lmdb_through_dataloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_unpickling: None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    images = make_lmdb(tmp_path / "lup")
    reader = LMDBImages(tmp_path / "lup")
    assert reader.keys == sorted(images) and len(reader) == 5
    assert reader[0] == images[reader.keys[0]]  # opens the environment here; forked workers must reopen it
    assert LMDBImages(tmp_path / "lup")[4] == images[reader.keys[4]]  # a second reader shares the open environment
    assert (tmp_path / "lup" / "keys.txt").read_text().split() == sorted(images)

    # batch_size=1: the images have different widths, as LUPerson's do.
    loader = DataLoader(
        ImageDataset(reader, transform=to_tensor), batch_size=1, num_workers=2, collate_fn=collate_skip_none
    )
    seen = []
    for (imgs, pids, camids, idx), skipped in loader:
        assert skipped == 0 and pids.tolist() == camids.tolist() == [-1] * len(idx)
        for img, i in zip(imgs, idx.tolist()):
            expected = np.array(Image.open(io.BytesIO(images[reader.keys[i]])).convert("RGB"))
            assert torch.equal(img, torch.from_numpy(expected))
            seen.append(i)
    assert sorted(seen) == list(range(5))


def test_lmdb_key_cache_and_keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_unpickling: None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    images = make_lmdb(tmp_path / "lup")
    real_write, real_open = ds._write_atomic, ds._open_lmdb

    def read_only_lmdb_dir(path: str, lines: list[str]) -> None:
        if path.startswith(str(tmp_path / "lup")):
            raise PermissionError(path)
        real_write(path, lines)

    monkeypatch.setattr(ds, "_write_atomic", read_only_lmdb_dir)
    assert LMDBImages(tmp_path / "lup").keys == sorted(images)
    cached = list((tmp_path / "home/.cache/dino_recog/lmdb_keys").glob("*.txt"))
    assert len(cached) == 1 and cached[0].read_text().split() == sorted(images)
    assert not list((tmp_path / "home/.cache/dino_recog/lmdb_keys").glob(".*.tmp-*"))  # no temp file left over

    # The cache is reused: the LMDB is not listed again.
    cached[0].write_text("01_02_0003_00000003\n01_02_0003_00000001\n")
    monkeypatch.setattr(ds, "_open_lmdb", lambda path: pytest.fail("keys listed again"))
    assert LMDBImages(tmp_path / "lup").keys == ["01_02_0003_00000003", "01_02_0003_00000001"]
    monkeypatch.setattr(ds, "_open_lmdb", real_open)

    keys_file = tmp_path / "my_keys.txt"
    keys_file.write_text("01_02_0003_00000004\n\n01_02_0003_00000000\n")
    reader = LMDBImages(tmp_path / "lup", keys_file=keys_file)
    assert len(reader) == 2 and reader[0] == images["01_02_0003_00000004"]
    # As a spawned DataLoader worker receives it (Unpickler: pickle.loads is disabled here); no env in the pickle.
    clone = pickle.Unpickler(io.BytesIO(pickle.dumps(reader))).load()
    assert clone[1] == images["01_02_0003_00000000"]

    # a stale key list fails when it is read, with the missing keys counted and named (it was a KeyError mid-epoch)
    (tmp_path / "stale.txt").write_text("01_02_0003_00000009\n01_02_0003_00000001\n01_02_0003_00000008\n")
    with pytest.raises(DatasetLayoutError, match=rf"^LMDB {tmp_path / 'lup'}: 2 of the 3 keys of {tmp_path}/stale.txt "
                       r"are not in it \(e.g. '01_02_0003_00000009', '01_02_0003_00000008'\); delete a stale cache"):
        LMDBImages(tmp_path / "lup", keys_file=tmp_path / "stale.txt")
    (tmp_path / "not_lmdb").mkdir()
    (tmp_path / "not_lmdb" / "data.mdb").write_text("a text file, not an LMDB")
    with pytest.raises(DatasetLayoutError, match=rf"^{tmp_path / 'not_lmdb'}: not an LMDB \(.*\); expected an LMDB "
                       "folder holding data.mdb"):
        LMDBImages(tmp_path / "not_lmdb")
    with pytest.raises(DatasetLayoutError, match="missing LMDB data file .*absent"):
        LMDBImages(tmp_path / "absent")
    with pytest.raises(DatasetLayoutError, match="missing LMDB data file .*home"):
        LMDBImages(tmp_path / "home")


# ------------------------------------------------------------------------------------------------------- read_image


def test_read_image_corrupt(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image\n")
    for path in (truncated, empty, text, tmp_path / "missing.jpg"):
        with pytest.raises(CorruptImageError, match=path.name):
            read_image(path)
    with pytest.raises(CorruptImageError, match=r"lup\[01_02\]"):
        read_image(b"garbage", name="lup[01_02]")


def test_read_image_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jpg(tmp_path / "big.jpg")  # 32 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(CorruptImageError, match="big.jpg: 8x4 pixels exceeds Image.MAX_IMAGE_PIXELS"):
            read_image(path)


def save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def test_read_image_modes(tmp_path: Path) -> None:
    rgba = read_image(save(Image.new("RGBA", (8, 4), (10, 20, 30, 0)), tmp_path / "alpha.png"))
    assert rgba.mode == "RGB" and rgba.size == (8, 4)
    gray = np.array(read_image(save(Image.new("L", (8, 4), 77), tmp_path / "gray.png")))
    assert gray.shape == (4, 8, 3) and (gray == 77).all()
    la = read_image(save(Image.new("LA", (8, 4), (50, 128)), tmp_path / "la.png"))
    assert la.mode == "RGB"
    palette = read_image(save(Image.new("P", (8, 4), 3), tmp_path / "palette.png"))
    assert palette.mode == "RGB"
    cmyk = np.array(read_image(save(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")))
    assert cmyk.shape == (4, 8, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # red
    deep = np.array([[0, 65535, 257 * 128, 65535]] * 2, dtype=np.uint16)
    sixteen = np.array(read_image(save(Image.fromarray(deep), tmp_path / "deep.png")))
    assert sixteen[0, :, 0].tolist() == [0, 255, 128, 255] and (sixteen == sixteen[..., :1]).all()
    tiny = read_image(jpeg_bytes(size=(1, 1)))
    assert tiny.mode == "RGB" and tiny.size == (1, 1)


# ----------------------------------------------------------------------------------------------------- ImageDataset


def test_image_dataset_skips_or_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write_jpg(tmp_path / "0001_c1s1_000001_01.jpg")
    bad = tmp_path / "0002_c2s1_000001_01.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    records = [Record(str(good), 0, 0), Record(str(bad), 1, 1)]

    caplog.set_level(logging.WARNING, logger=LOGGER)
    train = ImageDataset(records, transform=to_tensor)
    img, pid, camid, index = train[0]
    assert img.shape == (4, 8, 3) and (pid, camid, index) == (0, 0, 0)
    assert train[1] is None
    assert any(str(bad) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    (imgs, pids, camids, idx), skipped = collate_skip_none([train[0], train[1], train[0]])
    assert skipped == 1 and imgs.shape == (2, 4, 8, 3) and pids.tolist() == [0, 0]
    assert collate_skip_none([None, None]) == (None, 2)

    with pytest.raises(CorruptImageError, match=str(bad)):
        ImageDataset(records, transform=to_tensor, train=False)[1]

    unlabeled = ImageDataset([str(good)], transform=to_tensor, train=False)
    assert len(unlabeled) == 1 and unlabeled[0][1:] == (-1, -1, 0)


# ------------------------------------------------------------------------------------- generic folders, combining


def test_list_image_folder(tmp_path: Path) -> None:
    for rel in [
        "b/x/1.JPG",
        "b/2.Png",
        "a.jpeg",
        "c/d/e/3.webp",
        "c/4.bmp",
        "notes.txt",
        "b/.hidden.jpg",
        ".cache/5.jpg",
        "c/Thumbs.db",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in list_image_folder(tmp_path)]
    assert found == ["a.jpeg", "b/2.Png", "b/x/1.JPG", "c/4.bmp", "c/d/e/3.webp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images"):
        list_image_folder(tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match="missing folder"):
        list_image_folder(tmp_path / "nope")


def test_labeled_folder_and_combine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "people"
    for rel in ["zoe/zoe_c2_01.jpg", "zoe/zoe_c3_02.jpg", "adam/a_c1.jpg", "adam/sub/a_c4_7.png", "bob/b_c2.jpg"]:
        write_jpg(root / rel)
    (root / "empty_id").mkdir()
    records = load_labeled_folder(root, name="people")
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in records] == [
        ("a_c1.jpg", 0, 0),
        ("a_c4_7.png", 0, 3),
        ("b_c2.jpg", 1, 1),
        ("zoe_c2_01.jpg", 2, 1),
        ("zoe_c3_02.jpg", 2, 2),
    ]

    caplog.set_level(logging.WARNING, logger=LOGGER)
    nocam = tmp_path / "nocam"
    for rel in ["x/1.jpg", "x/2.jpg", "y/3.jpg"]:
        write_jpg(nocam / rel)
    plain = load_labeled_folder(nocam, name="nocam")
    assert [(r.pid, r.camid) for r in plain] == [(0, 0), (0, 0), (1, 0)]
    warned = [r for r in caplog.records if "no camera" in r.getMessage()]
    assert len(warned) == 1 and "nocam" in warned[0].getMessage()

    market = load_market1501(make_market(tmp_path / "market")).train
    combined = combine_train_sets([market, records, plain])
    assert len(combined) == len(market) + len(records) + len(plain)
    ranges = [(0, len(market)), (len(market), len(market) + len(records)), (len(market) + len(records), None)]
    pid_sets = [{r.pid for r in combined[a:b]} for a, b in ranges]
    cam_sets = [{r.camid for r in combined[a:b]} for a, b in ranges]
    assert pid_sets == [{0, 1, 2}, {3, 4, 5}, {6, 7}]
    assert cam_sets == [{0, 1, 2, 5}, {6, 8, 7, 9}, {10}]
    data = ReIDData("mix", combined, [], [])
    assert data.num_train_pids == 8 and data.num_train_cams == 11
    with pytest.raises(ValueError, match="pid >= 0"):
        combine_train_sets([[Record("x.jpg", -1, 0)]])
    with pytest.raises(DatasetLayoutError, match="ROOT/<identity>/<image>"):
        load_labeled_folder(tmp_path / "people" / "empty_id")


# ---------------------------------------------------------------------------------------------------------------------
# labeled_folder as an evaluation set


def market_as_folder(small_demo, root, cameras=True):
    """The small demo's Market-1501 query/gallery (distractors left out: a folder has no way to say pid 0) copied to
    ROOT/query/<id>/ + ROOT/gallery/<id>/; without cameras the _c<N> is taken out of the names."""
    data = ds.load_market1501(small_demo / "market")
    for split, records in (("query", data.query), ("gallery", [r for r in data.gallery if r.pid > 0])):
        for r in records:
            name = os.path.basename(r.path) if cameras else os.path.basename(r.path).replace("_c", "_x", 1)
            (root / split / f"{r.pid:04d}").mkdir(parents=True, exist_ok=True)
            shutil.copy(r.path, root / split / f"{r.pid:04d}" / name)
    return data


def test_labeled_folder_with_query_and_gallery_is_the_same_set_as_its_market_original(small_demo, tmp_path):
    market = market_as_folder(small_demo, tmp_path / "mine")
    data = build.labeled_data(C.DatasetSpec(name="labeled_folder", root=str(tmp_path / "mine")))
    pid_of = {}  # the folder numbers identities 1..N; the mapping must be one to one and shared by both splits
    for ours, theirs in ((data.query, market.query), (data.gallery, [r for r in market.gallery if r.pid > 0])):
        assert sorted(os.path.basename(r.path) for r in ours) == sorted(os.path.basename(r.path) for r in theirs)
        by_name = {os.path.basename(r.path): r for r in theirs}
        for r in ours:
            original = by_name[os.path.basename(r.path)]
            assert r.camid == original.camid and pid_of.setdefault(r.pid, original.pid) == original.pid
    assert len(set(pid_of.values())) == len(pid_of) and min(pid_of) == 1
    assert data.train == [] and "same_camera_rule" not in data.info


def test_labeled_folder_without_cameras_switches_the_same_camera_rule_off_and_says_so(small_demo, tmp_path, caplog):
    market_as_folder(small_demo, tmp_path / "mine", cameras=False)
    data = ds.load_labeled_folder_splits(tmp_path / "mine")
    assert {r.camid for r in data.query} == {0} and {r.camid for r in data.gallery} == {1}
    assert data.info["same_camera_rule"] == "off (no _c<N> camera in the file names)"
    assert "the same-camera rule of the protocol is off" in caplog.text


def test_labeled_folder_in_imagenet_form_classifies_val_against_train(tmp_path):
    for split, cls, n in [("train", "cat", 3), ("train", "dog", 2), ("val", "cat", 1), ("val", "dog", 1)]:
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / f"{i}.png")
    data = ds.load_labeled_folder_splits(tmp_path)
    assert [(os.path.basename(os.path.dirname(r.path)), r.pid) for r in data.query] == [("cat", 1), ("dog", 2)]
    assert sorted(r.pid for r in data.gallery) == [1, 1, 1, 2, 2] and data.info["layout"] == "train/val"
    assert build.train_records([C.DatasetSpec(name="labeled_folder", root=str(tmp_path))])[0].path.startswith(
        str(tmp_path / "train")
    )  # training from the same root reads ROOT/train only


def test_labeled_folder_evaluation_layout_errors(small_demo, tmp_path):
    with pytest.raises(ds.DatasetLayoutError, match="no query/gallery or train/val folders; expected ROOT/query/"):
        (tmp_path / "flat" / "0001").mkdir(parents=True)
        ds.load_labeled_folder_splits(tmp_path / "flat")
    market_as_folder(small_demo, tmp_path / "mixed")
    first = sorted((tmp_path / "mixed" / "gallery").rglob("*.jpg"))[0]
    first.rename(first.with_name("nocamera.jpg"))
    with pytest.raises(ds.DatasetLayoutError, match=r"names a camera \(_c<N>\) but .*nocamera.jpg does not"):
        ds.load_labeled_folder_splits(tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "gallery")
    with pytest.raises(ds.DatasetLayoutError, match=f"missing folder {tmp_path / 'mixed' / 'gallery'}"):
        ds.load_labeled_folder_splits(tmp_path / "mixed")


# ---------------------------------------------------------------------------------------------------------------------
# The names torchreid and fast-reid use


def test_dukemtmc_reads_like_market1501_with_eight_cameras(tmp_path):
    root = make_market(tmp_path / "duke")
    (root / "query" / "0007_c8_f0046182.jpg").write_bytes((root / "query" / "0007_c5s1_000401_00.jpg").read_bytes())
    for name in ("dukemtmcreid", "dukemtmc"):
        data = build.labeled_data(C.DatasetSpec(name=name, root=str(root)))
        assert data.name == "dukemtmcreid" and {r.camid for r in data.query} == {1, 4, 7}
        assert len(data.train) == 4 and len(data.gallery) == 4
    with pytest.raises(ds.DatasetLayoutError, match=r"0007_c8_f0046182.jpg: pid 7 / camera 8 outside 0..1501 / 1..6"):
        build.labeled_data(C.DatasetSpec(name="market1501", root=str(root)))


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_v1_and_v2_name_the_version(tmp_path, version):
    root = make_msmt(tmp_path, "V1")
    for folder in ds._MSMT_DIRS["V2"]:
        (root / folder).mkdir()  # both versions present: "auto" could not choose
    data = build.labeled_data(C.DatasetSpec(name=f"msmt17_{version.lower()}", root=str(root)))
    assert data.info["version"] == version
    with pytest.raises(ValueError, match=f"data set msmt17_{version.lower()} with version W; "):
        build.labeled_data(C.DatasetSpec(name=f"msmt17_{version.lower()}", root=str(root), version="W"))


def test_a_market_name_with_a_range_for_a_pid_is_a_layout_error(tmp_path):
    root = make_market(tmp_path / "m")
    (root / "query" / "12-34_c1s1_000001_00.jpg").write_bytes(b"")
    with pytest.raises(
        ds.DatasetLayoutError, match=r"cannot parse identity and camera from .*12-34_c1s1_000001_00.jpg"
    ):
        ds.load_market1501(root)


def test_an_undecodable_labeled_image_is_replaced_by_another_of_its_identity(tmp_path, caplog):
    """A P x K batch keeps K images of each identity: the broken one's place goes to another image of the same
    identity, drawn from the item's seed (the same on a resume), and the broken one is counted as skipped."""
    from dino_recog.data.samplers import PKSampler, SeededBatches

    records = []
    for pid in range(3):
        for j in range(4):
            path = tmp_path / f"{pid}_{j}.jpg"
            write_jpg(path, color=(60 * pid, 20 * j, 90))
            records.append(Record(str(path), pid, j))
    broken = records[5]  # identity 1
    Path(broken.path).write_bytes(b"not a jpeg")
    train = ImageDataset(records, transform=to_tensor, replace_by_identity=True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    item = train[(5, 1234)]
    assert isinstance(item, ds.Replaced) and item.n_bad == 1
    assert item[1] == 1 and item[3] in (4, 6, 7)  # identity 1, another of its images
    assert train[(5, 1234)][3] == item[3]  # the same seed draws the same replacement
    assert {train[(5, s)][3] for s in range(40)} == {4, 6, 7}  # every other image of the identity can stand in
    assert any(broken.path in r.getMessage() for r in caplog.records)
    assert ImageDataset(records, transform=to_tensor)[(5, 1234)] is None  # without labels: skipped, as before
    # an identity whose every other image is broken too: nothing to stand in, skipped
    for r in records[4:8]:
        Path(r.path).write_bytes(b"not a jpeg")
    assert train[(5, 1)] is None
    write_jpg(Path(records[7].path))
    alone = ImageDataset(records[5:6], transform=to_tensor, replace_by_identity=True)
    assert alone[(0, 1)] is None  # the identity's only image
    # through a DataLoader worker (items pickled) and a P x K sampler: K = 4 images of each identity, image 7 standing
    # in for the 3 broken ones of identity 1, each of which is counted (and so are the broken ones tried in vain)
    loader = DataLoader(train, batch_sampler=SeededBatches(PKSampler([r.pid for r in records], 3, 4), seed=0),
                        num_workers=1, collate_fn=collate_skip_none)  # fmt: skip
    (imgs, pids, camids, idx), skipped = next(iter(loader))
    assert sorted(pids.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 and 3 <= skipped <= 3 * 3
    assert set(idx[pids == 1].tolist()) == {7}
