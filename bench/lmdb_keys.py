"""Listing and opening a labeled LMDB of millions of keys (LUPerson-NL has 10.7 M): seconds and memory per process.

    python bench/lmdb_keys.py [--keys 100000 1000000] [--workers 2]

Builds a synthetic LMDB per size in a temporary folder (LUPerson-NL's key format, 16-byte values: only the keys
matter here) with LUPerson-NL's keys.pkl, then, each in a fresh process:
  - keys.pkl as Python lists (what LUPerson-NL's own reader holds in every process), and its forked workers;
  - the first LabeledLMDB: reads keys.pkl safely and writes the memory-mapped cache;
  - a later LabeledLMDB (every other rank, every run after the first): maps the cache;
  - per forked DataLoader-style worker that reads every key once: its private memory (smaps_rollup), i.e. what the
    key list costs each worker beyond the pages it shares with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(root: Path, n: int) -> None:
    import lmdb

    (root / "lmdb").mkdir(parents=True)
    keys = [f"{1 + i // 500:05d}_{i // 25:06d}_{i % 10_000_000:07d}_00" for i in range(n)]
    env = lmdb.open(str(root / "lmdb"), map_size=n * 256 + (64 << 20))
    for start in range(0, n, 100_000):
        with env.begin(write=True) as txn:
            for k in keys[start : start + 100_000]:
                txn.put(k.encode("ascii"), b"x" * 16)
    env.close()
    with open(root / "keys.pkl", "wb") as fh:
        pickle.dump({"keys": keys, "pids": [i // 25 for i in range(n)]}, fh)


def _private_mb() -> float:
    with open("/proc/self/smaps_rollup") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(what: str, root: Path, workers: int) -> dict:
    """Run in a fresh process: one of the measurements, as a dict."""
    import dino_recog.data.datasets  # noqa: F401  (torch, PIL, lmdb: loaded before the baseline)
    from dino_recog.data.labeled_lmdb import LabeledLMDB

    base = _rss_mb()
    t = time.perf_counter()
    if what.startswith("pickle"):
        from dino_recog.data.labeled_lmdb import read_keys_pickle

        keys = read_keys_pickle(root / "keys.pkl")[0]  # the lists LUPerson-NL's reader holds in every process
        touch = keys.__getitem__  # a Python list: reading an entry writes its reference count
    else:
        data = LabeledLMDB(root)
        keys, touch = data, data.key
    result = {"seconds": time.perf_counter() - t, "rss_mb": _rss_mb() - base, "keys": len(keys)}
    if what.endswith("workers"):
        pipes = []
        for _ in range(workers):
            r, w = os.pipe()
            if os.fork() == 0:  # a DataLoader worker, as fork starts it
                before = _private_mb()
                for i in range(len(keys)):
                    touch(i)
                os.write(w, json.dumps(_private_mb() - before).encode())
                os._exit(0)
            os.close(w)
            pipes.append(r)
        result["worker_private_mb"] = [json.loads(os.read(r, 100)) for r in pipes]
        for _ in pipes:
            os.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], Path(args.one[1]), args.workers)))
        return
    results = []
    for n in args.keys:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            build(Path(tmp), n)
            row = {"keys": n, "build_s": time.perf_counter() - t}
            for what in ("pickle lists", "pickle workers", "first LabeledLMDB", "cached LabeledLMDB", "workers"):
                out = subprocess.run([sys.executable, __file__, "--one", what, tmp, "--workers", str(args.workers)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                row[what] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row))
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
