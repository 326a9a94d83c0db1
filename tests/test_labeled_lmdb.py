"""dino_recog/data/labeled_lmdb.py, build_lmdb.py and convert_keys.py: LUPerson-NL's layout, our packed LMDBs."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import ROOT

from dino_recog.config import DatasetSpec
from dino_recog.data import datasets as ds
from dino_recog.data.build import train_records
from dino_recog.data.build_lmdb import build_lmdb
from dino_recog.data.labeled_lmdb import LabeledLMDB, read_keys_pickle


def luperson_nl(root: Path, pids: list[int]) -> list[str]:
    """A tiny folder in LUPerson-NL's released layout: lmdb/ of JPEG bytes and keys.pkl {"keys", "pids"}."""
    from PIL import Image

    (root / "lmdb").mkdir(parents=True)
    keys = [f"{1 + i // 4:05d}_{pid:06d}_{i:07d}_00" for i, pid in enumerate(pids)]
    env = lmdb.open(str(root / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            import io

            buf = io.BytesIO()
            Image.new("RGB", (8, 16), (i * 7 % 256, 0, 0)).save(buf, "JPEG")
            txn.put(key.encode("ascii"), buf.getvalue())
    env.close()
    with open(root / "keys.pkl", "wb") as fh:  # as LUP-NL/convert_lmdb.py writes it
        pickle.dump({"keys": keys, "pids": pids}, fh)
    return keys


def test_reads_the_luperson_nl_release_and_drops_small_identities(tmp_path):
    pids = [40, 40, 40, 7, 7, 900, 40, 7]  # identity 900 has one image
    keys = luperson_nl(tmp_path / "lupnl_lmdb", pids)
    data = LabeledLMDB(tmp_path / "lupnl_lmdb", min_images_per_id=2)
    assert data.dropped == {"identities": 1, "images": 1} and data.num_identities == 2 and len(data) == 7
    assert data.pids.tolist() == [1, 1, 1, 0, 0, 1, 0]  # 7 -> 0, 40 -> 1, in sorted order
    assert [data.key(i) for i in range(len(data))] == [k for k, p in zip(keys, pids) if p != 900]
    image, pid, camid = data[5]
    assert isinstance(image, bytes) and (pid, camid) == (1, -1)
    assert ds.read_image(image).size == (8, 16)
    item = ds.ImageDataset(data)[3]
    assert item[1:] == (0, -1, 3)
    # The labels are cached as memory-mapped arrays, which the next reader (rank, worker) maps.
    again = LabeledLMDB(tmp_path / "lupnl_lmdb")
    assert isinstance(again._keys, np.memmap) and len(again) == 8 and again.dropped == {"identities": 0, "images": 0}
    # What a spawned DataLoader worker receives: where to map the arrays from, not a copy of them.
    blob = pickle.dumps(data)
    assert len(blob) < 500
    copy = pickle.loads(blob)
    assert copy.pids.tolist() == data.pids.tolist() and copy[5] == data[5] and isinstance(copy._keys, np.memmap)


def test_train_records_reads_an_lmdb_set_and_filters_folders_too(small_demo, tmp_path):
    luperson_nl(tmp_path / "nl", [3, 3, 5, 5, 5, 8])
    data = train_records([DatasetSpec(name="luperson_nl", root=str(tmp_path / "nl"))], min_images_per_id=3)
    assert isinstance(data, LabeledLMDB) and data.pids.tolist() == [0, 0, 0]
    market = ds.load_market1501(small_demo / "market").train
    counts = np.bincount([r.pid for r in market])
    minimum = int(np.sort(counts)[len(counts) // 2])  # drops about half of the identities
    kept = train_records([DatasetSpec(name="market1501", root=str(small_demo / "market"))], minimum)
    assert len({r.pid for r in kept}) == int((counts >= minimum).sum())
    assert sorted({r.pid for r in kept}) == list(range(int((counts >= minimum).sum())))  # relabelled 0..N-1
    assert {r.path for r in kept} == {r.path for r in market if counts[r.pid] >= minimum}


def test_build_lmdb_round_trips_a_labeled_set_and_never_overwrites(small_demo, tmp_path):
    records = ds.load_market1501(small_demo / "market").train
    out = build_lmdb(records, tmp_path / "packed", commit_every=7)
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb", "labels.txt", "lock.mdb"]
    data = LabeledLMDB(out)
    assert len(data) == len(records) and data.pids.tolist() == [r.pid for r in records]
    for i in (0, len(records) // 2, len(records) - 1):
        assert data[i][0] == Path(records[i].path).read_bytes()
    with pytest.raises(FileExistsError, match="packed: already exists; expected a new folder"):
        build_lmdb(records, out)
    cli = [sys.executable, "-m", "dino_recog.data.build_lmdb", small_demo / "market", tmp_path / "cli", "--dataset",
           "market1501"]  # fmt: skip
    r = subprocess.run(list(map(str, cli)), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{len(records)} images of {len({r.pid for r in records})} identities" in r.stdout
    assert (tmp_path / "cli" / "labels.txt").read_text() == (out / "labels.txt").read_text()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_crafted_keys_pkl_is_refused_unread_and_convert_keys_writes_plain_text(tmp_path):
    luperson_nl(tmp_path / "nl", [1, 1, 2])
    marker = tmp_path / "ran"
    with open(tmp_path / "nl" / "keys.pkl", "wb") as fh:
        pickle.dump({"keys": ["a"], "pids": [_Payload(marker)]}, fh)
    with pytest.raises(ds.DatasetLayoutError, match=r"keys.pkl: refused: it asks to load the Python object "
                                                    r"posix.mkdir; a key file holds only lists"):  # fmt: skip
        LabeledLMDB(tmp_path / "nl")
    r = subprocess.run([sys.executable, "-m", "dino_recog.data.convert_keys", str(tmp_path / "nl" / "keys.pkl")],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "refused" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not marker.exists()

    keys = luperson_nl(tmp_path / "good", [4, 4, 9])
    r = subprocess.run([sys.executable, "-m", "dino_recog.data.convert_keys", str(tmp_path / "good" / "keys.pkl")],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "good" / "labels.txt").read_text() == "".join(f"{k} {p}\n" for k, p in zip(keys, [4, 4, 9]))
    (tmp_path / "good" / "keys.pkl").unlink()  # labels.txt alone is enough
    assert LabeledLMDB(tmp_path / "good").pids.tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], r"holds list; expected LUPerson-NL's dict with a 'keys' and a 'pids' list"),
        ({"keys": ["a", "b"], "pids": [1]}, r"2 keys but 1 pids; expected one pid per key"),
        ({"keys": ["a"], "pids": ["x"]}, r"entry 0 is key 'a' with pid 'x'; expected a string key and an integer pid"),
    ],
)
def test_a_keys_pkl_of_another_shape_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "keys.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ds.DatasetLayoutError, match=message):
        read_keys_pickle(path)


def test_a_label_file_of_another_lmdb_names_the_missing_keys(tmp_path):
    luperson_nl(tmp_path / "nl", [1, 1, 2])
    (tmp_path / "nl" / "labels.txt").write_text("elsewhere_1 0\nelsewhere_2 0\n")
    with pytest.raises(ds.DatasetLayoutError, match=r"labels.txt: 2 of 2 sampled keys are not in the LMDB .* "
                                                    r"\(e.g. 'elsewhere_1', 'elsewhere_2'\)"):  # fmt: skip
        LabeledLMDB(tmp_path / "nl")
    (tmp_path / "nl" / "labels.txt").write_text("a b c\n")
    with pytest.raises(ds.DatasetLayoutError, match=r"labels.txt, line 1: 'a b c'; expected 'KEY PID'"):
        LabeledLMDB(tmp_path / "nl")
    with pytest.raises(ds.DatasetLayoutError, match=r"no data.mdb in .*lmdb or"):
        LabeledLMDB(tmp_path)
