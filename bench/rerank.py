"""Benchmark of k-reciprocal re-ranking: `dino_recog.rerank` against the published fast-reid and torchreid code.

    bash bench/ref_env.sh                                  # once: the published packages in bench/.venv-ref
    python bench/rerank.py [--size small|market|msmt] [--no-reference]

Synthetic 768-d features from bench/eval_rank.py (Market-1501 size: 3,368 queries x 15,913 gallery). The cosine
distance matrices q_g, q_q, g_g (float32, as `pairwise_distance` gives them) are saved to a temporary folder; every
implementation then runs in a fresh process that loads its inputs and reports wall and CPU seconds (all threads: the
reference is single-threaded, ours uses both cores) and the growth of its peak resident memory above the loaded inputs
(VmHWM - VmRSS, Linux). `re_rank_features` starts from the features instead and computes its distances itself.
Results are compared with fast-reid's (max |delta|) and scored with `evaluate_rank`. At MSMT17 size (11,659 x
82,161) only `re_rank_features` runs: g_g alone would be 27 GB, each of the reference's N x N matrices 35 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_rank import problem  # noqa: E402 (bench/ is the script's folder)

from dino_recog.evaluation import evaluate_rank, pairwise_distance  # noqa: E402

SIZES = {  # queries, gallery, identities, cameras
    "small": (500, 2500, 200, 6),
    "market": (3368, 15913, 751, 6),
    "msmt": (11659, 82161, 3060, 15),
}
IMPLEMENTATIONS = {  # name: (label, input, needs the reference environment)
    "fastreid": ("fast-reid 1.4.0 `re_ranking`", "distance matrices", True),
    "torchreid": ("torchreid (PyPI 0.2.5) `re_ranking`", "distance matrices", True),
    "re_rank": ("dino_recog `re_rank`", "distance matrices", False),
    "re_rank_features": ("dino_recog `re_rank_features`", "features", False),
}


def rss_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Set VmHWM to the current RSS. Needed because a child's ru_maxrss starts at its parent's RSS (fork + exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(name: str, folder: Path) -> None:
    """Run one implementation on the saved inputs; print its times and peak RSS growth as JSON; save the result."""
    import torch  # noqa: F401  (imported before the baseline by every worker: its memory is no implementation's)
    from reference import load

    from dino_recog.rerank import re_rank, re_rank_features

    if name == "re_rank_features":
        inputs = [np.load(folder / "qf.npy"), np.load(folder / "gf.npy")]
        fn = re_rank_features
    else:
        inputs = [np.load(folder / f"{m}.npy") for m in ("q_g", "q_q", "g_g")]
        fn = re_rank if name == "re_rank" else load(f"{name}.rerank").re_ranking
    reset_peak()
    base = rss_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*inputs, k1=20, k2=6, lambda_value=0.3)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_growth_mb": rss_mb("VmHWM") - base, "base_mb": base}))
    np.save(folder / f"out_{name}.npy", np.asarray(out, dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="market")
    parser.add_argument("--no-reference", action="store_true", help="skip fast-reid and torchreid")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.dir)

    names = ["re_rank_features"] if args.size == "msmt" else list(IMPLEMENTATIONS)
    if args.no_reference:
        names = [n for n in names if not IMPLEMENTATIONS[n][2]]
    nq, ng, ids, cams = SIZES[args.size]
    qf, gf, q_pids, g_pids, q_cams, g_cams = problem(nq, ng, ids, cams)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "qf.npy", qf)
        np.save(folder / "gf.npy", gf)
        q_g = pairwise_distance(qf, gf)
        if args.size != "msmt":
            np.save(folder / "q_g.npy", q_g)
            np.save(folder / "q_q.npy", pairwise_distance(qf, qf))
            np.save(folder / "g_g.npy", pairwise_distance(gf, gf))
        del qf, gf

        def score(distmat: np.ndarray) -> str:
            r = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
            return f"{100 * r['cmc'][0]:.2f} / {100 * r['mAP']:.2f}"

        print(f"{args.size}: {nq:,} queries x {ng:,} gallery, k1=20, k2=6, lambda=0.3", flush=True)
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        print(
            "| implementation | input | seconds | CPU seconds | peak RSS growth MB | max abs diff. to fast-reid | "
            "rank-1 / mAP |"
        )
        print("|---|---|---|---|---|---|---|")
        print(f"| no re-ranking (cosine distance) | - | - | - | - | - | {score(q_g)} |", flush=True)
        del q_g
        first, stats_of = None, {}
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder)]
            stats = stats_of[name] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            out = np.load(folder / f"out_{name}.npy")
            first = first if first is not None else (name, out)
            delta = f"{np.abs(out - first[1]).max():.1e}" if first[0] == "fastreid" and name != "fastreid" else "-"
            label, kind, _ = IMPLEMENTATIONS[name]
            cells = [label, kind, f"{stats['seconds']:.2f}", f"{stats['cpu']:.2f}", f"{stats['peak_growth_mb']:,.0f}"]
            print("| " + " | ".join([*cells, delta, score(out)]) + " |", flush=True)
            del out
        for name in ("re_rank", "re_rank_features"):
            if "fastreid" in stats_of and name in stats_of:
                ref, ours = stats_of["fastreid"], stats_of[name]
                print(
                    f"fast-reid / {name}: {ref['cpu'] / ours['cpu']:.1f}x the CPU time, "
                    f"{ref['seconds'] / ours['seconds']:.1f}x the wall time, "
                    f"{ref['peak_growth_mb'] / ours['peak_growth_mb']:.1f}x the peak memory growth"
                )
        print(
            f"load average at end: {os.getloadavg()[0]:.2f} (2 cores shared with other work: compare CPU seconds too)"
        )


if __name__ == "__main__":
    main()
