"""dino_recog/data/keep_list.py and convert_keys --cfs: subset lists for folders and LMDBs, the released CFS list."""

import logging
import pickle

import pytest
from conftest import ROOT
from PIL import Image
from test_labeled_lmdb import _Payload, luperson_nl

from dino_recog import config as C
from dino_recog.config import DatasetSpec
from dino_recog.data import datasets as ds
from dino_recog.data.build import train_records, unlabeled_items
from dino_recog.data.convert_keys import main as convert_keys
from dino_recog.data.keep_list import relative_names
from dino_recog.data.labeled_lmdb import LabeledLMDB


def image_folder(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16)).save(root / name)
    return root


def test_the_cfs_list_converts_to_a_keep_list_of_its_first_names_and_a_folder_keeps_those(tmp_path, caplog):
    root = image_folder(tmp_path / "LUP", [f"images/{i:08d}_0000.jpg" for i in range(6)])
    ranked = [f"{i:08d}_0000.jpg" for i in (4, 1, 5, 0)] + ["99999999_0000.jpg"]  # best first; one not on disk
    (tmp_path / "cfs.pkl").write_bytes(pickle.dumps(ranked))
    convert_keys(["--cfs", str(tmp_path / "cfs.pkl"), "--keep", "3", "--prefix", "images/", str(tmp_path / "k.txt")])
    assert (tmp_path / "k.txt").read_text().split() == [f"images/{i:08d}_0000.jpg" for i in (4, 1, 5)]
    spec = DatasetSpec(name="image_folder", root=str(root), keep_list=str(tmp_path / "k.txt"))
    with caplog.at_level(logging.INFO, logger="dino_recog.data.keep_list"):
        kept = unlabeled_items(spec)
    assert kept == [str(root / f"images/{i:08d}_0000.jpg") for i in (1, 4, 5)]  # the folder's order, not the list's
    assert "keeping 3 of the 6 images" in caplog.text
    # every name, with one listed that is not there: counted and named, the others kept
    convert_keys(["--cfs", str(tmp_path / "cfs.pkl"), "--prefix", "images/", str(tmp_path / "all.txt")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dino_recog.data.keep_list"):
        kept = unlabeled_items(DatasetSpec(name="image_folder", root=str(root), keep_list=str(tmp_path / "all.txt")))
    assert len(kept) == 4 and "1 listed entries are not in it (e.g. 'images/99999999_0000.jpg')" in caplog.text
    with pytest.raises(SystemExit) as e:  # never overwritten
        convert_keys(["--cfs", str(tmp_path / "cfs.pkl"), str(tmp_path / "k.txt")])
    assert e.value.code == 2


def test_a_crafted_cfs_pickle_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "cfs.pkl").write_bytes(pickle.dumps(["a.jpg", _Payload(marker)]))
    with pytest.raises(SystemExit) as e:
        convert_keys(["--cfs", str(tmp_path / "cfs.pkl"), str(tmp_path / "k.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "refused: it asks to load the Python object posix.mkdir" in err
    assert not marker.exists() and not (tmp_path / "k.txt").exists()
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"keys": ["a"]}))
    with pytest.raises(SystemExit):
        convert_keys(["--cfs", str(tmp_path / "d.pkl"), str(tmp_path / "k.txt")])
    assert "holds a dict; expected a list of image names" in capsys.readouterr().err


def test_a_keep_list_selects_labeled_folders_and_lmdbs_of_both_stages(small_demo, tmp_path):
    market = ds.load_market1501(small_demo / "market").train
    first_two = sorted({r.pid for r in market})[:2]
    chosen = [r for r in market if r.pid in first_two][::2]
    (tmp_path / "m.txt").write_text("".join(f"./{r.path[len(str(small_demo / 'market')) + 1:]}\n" for r in chosen))
    spec = DatasetSpec(name="market1501", root=str(small_demo / "market"), keep_list=str(tmp_path / "m.txt"))
    kept = train_records([spec])
    assert [r.path for r in kept] == [r.path for r in chosen]
    assert sorted({r.pid for r in kept}) == [0, 1]  # relabelled for the classifier

    keys = luperson_nl(tmp_path / "nl", [3, 3, 5, 5, 5, 8])
    (tmp_path / "k.txt").write_text(f"{keys[1]}\n\n{keys[4]}\n{keys[5]}\n")
    data = train_records([DatasetSpec(name="luperson_nl", root=str(tmp_path / "nl"),
                                      keep_list=str(tmp_path / "k.txt"))])  # fmt: skip
    assert isinstance(data, LabeledLMDB) and [data.key(i) for i in range(len(data))] == [keys[1], keys[4], keys[5]]
    assert data.pids.tolist() == [0, 1, 2] and data.num_identities == 3
    assert pickle.loads(pickle.dumps(data))[2] == data[2]  # a DataLoader worker applies the same list
    with pytest.raises(ds.DatasetLayoutError, match="no identity has 2 images or more"):  # counted after the list
        LabeledLMDB(tmp_path / "nl", 2, str(tmp_path / "k.txt"))
    images = unlabeled_items(DatasetSpec(name="luperson_lmdb", root=str(tmp_path / "nl" / "lmdb"),
                                         keep_list=str(tmp_path / "k.txt")))  # fmt: skip
    assert images.keys == [keys[1], keys[4], keys[5]] and images[0] == data[0][0]


def test_names_are_relative_to_the_root_with_slashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert relative_names([str(tmp_path / "a" / "b.jpg"), "c/d.jpg"], tmp_path) == ["a/b.jpg", "c/d.jpg"]
    assert relative_names(["c/d.jpg"], "") == ["c/d.jpg"]  # a demo set's empty root: the working directory


def test_a_keep_list_naming_nothing_present_is_a_clear_error(tmp_path):
    root = image_folder(tmp_path / "imgs", ["a/1.jpg", "a/2.jpg"])
    (tmp_path / "k.txt").write_text("1.jpg\nb/2.jpg\n")
    spec = DatasetSpec(name="image_folder", root=str(root), keep_list=str(tmp_path / "k.txt"))
    with pytest.raises(ds.DatasetLayoutError, match=r"k.txt names none of the 2 images of .*imgs \(its entries look "
                       r"like '1.jpg', 'b/2.jpg'; the images are named like 'a/1.jpg', 'a/2.jpg'\); expected paths "
                       r"relative to"):  # fmt: skip
        unlabeled_items(spec)
    (tmp_path / "k.txt").write_text("\n \n")
    with pytest.raises(ds.DatasetLayoutError, match=r"k.txt is empty; expected relative paths or LMDB keys"):
        unlabeled_items(spec)
    (tmp_path / "k.txt").write_bytes(pickle.dumps(["a/1.jpg"]))  # the pickle itself, not converted
    with pytest.raises(ds.DatasetLayoutError, match=r"is not UTF-8 text .*convert it with python -m "):
        unlabeled_items(spec)
    with pytest.raises(ds.DatasetLayoutError, match=r"missing.txt not found"):
        unlabeled_items(DatasetSpec(name="image_folder", root=str(root), keep_list=str(tmp_path / "missing.txt")))
    with pytest.raises(C.ConfigError, match=r"data.test.keep_list: k.txt; a keep list selects training images"):
        C.load(ROOT / "cfg_recog.yaml", ["data.test.keep_list=k.txt"], cls=C.RecogConfig)
