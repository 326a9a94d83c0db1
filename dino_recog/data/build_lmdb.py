"""Pack a labeled training set into an LMDB that stage 2 reads as `{name: labeled_lmdb, root: OUT}`:

    python -m dino_recog.data.build_lmdb SOURCE OUT [--dataset labeled_folder|market1501|msmt17|demo]

OUT/data.mdb holds each image's file bytes (not re-encoded) under an ASCII key '{pid:07d}_{n:09d}', OUT/labels.txt
one "key pid" per line. The LMDB is written in OUT.tmp-PID and renamed to OUT when complete, so OUT is either absent
or whole. For sets of millions of images: one sequential pass, one transaction per 10,000 images.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import lmdb

from ..config import DatasetSpec
from ..user_errors import user_errors
from .labeled_lmdb import write_labels_txt

__all__ = ["build_lmdb"]

_COMMIT_EVERY = 10_000


def build_lmdb(records, out: str | os.PathLike, commit_every: int = _COMMIT_EVERY) -> Path:
    """Write `records` ((path, pid, camid) tuples, e.g. `data.build.train_records`) into the LMDB folder `out`.

    Raises:
        FileExistsError: `out` exists (never overwritten).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; expected a new folder for the LMDB (remove it to rebuild)")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sizes = [os.path.getsize(r[0]) for r in records]
        # LMDB needs its largest size up front; the file is sparse where the file system allows it
        map_size = 2 * sum(sizes) + 4096 * len(records) + (64 << 20)
        keys, pids = [], []
        env = lmdb.open(os.fspath(tmp), map_size=map_size, subdir=True, meminit=False, map_async=True)
        try:
            txn = env.begin(write=True)
            for n, (path, pid, _camid) in enumerate(records):
                key = f"{pid:07d}_{n:09d}"
                with open(path, "rb") as fh:
                    txn.put(key.encode("ascii"), fh.read())
                keys.append(key)
                pids.append(int(pid))
                if (n + 1) % commit_every == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            txn.commit()
            env.sync()
        finally:
            env.close()
        write_labels_txt(tmp / "labels.txt", keys, pids)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="the data set folder")
    parser.add_argument("out", help="the LMDB folder to create")
    parser.add_argument("--dataset", default="labeled_folder",
                        help="what SOURCE is: labeled_folder (SOURCE/<identity>/<image>), market1501, msmt17, demo; "
                             "its training split is packed")  # fmt: skip
    args = parser.parse_args(argv)
    from .build import train_records

    with user_errors():
        records = train_records([DatasetSpec(name=args.dataset, root=args.source)])
        out = build_lmdb(records, args.out)
        print(f"{out}: {len(records)} images of {len({r.pid for r in records})} identities")


if __name__ == "__main__":
    main()
