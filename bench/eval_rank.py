"""Benchmark of the re-identification protocol (distance + CMC + mAP + mINP) at Market-1501 and MSMT17 sizes.

    python bench/eval_rank.py [--msmt] [--reference]
    python bench/eval_rank.py --features [--msmt]     # from features: chunked distances, and the faiss top-k path

Synthetic features with realistic sizes and identity / camera counts (Market-1501: 3,368 queries x 15,913 gallery,
751 identities, 6 cameras; MSMT17: 11,659 x 82,161, 3,060 identities, 15 cameras), 768-d. Prints one table: seconds
and peak resident memory growth of `evaluate_rank` (and of the distance computation), and checks the result against
a reference that sorts every row (np.argsort, stable), as torchreid's vectorised evaluators do.

--features times `evaluate_features` instead, which computes the distances chunk by chunk inside the protocol (no
Q x G matrix), and its faiss top-100 path; run it as its own command so the peak memory is its own.

--reference (after `bash bench/ref_env.sh`) adds a second table at Market-1501 size: the published fast-reid and
torchreid evaluators (`evaluate_rank`, which without a compiled rank_cy, as installed from PyPI, runs the Python
`eval_market1501`) against ours on the same distance matrix, with their differences in CMC, mAP and mINP.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_recog.evaluation import evaluate_features, evaluate_rank, pairwise_distance  # noqa: E402

NOISE = 3.0  # feature noise around the identity centre: realistic rank-1 and mAP, with hard negatives


def problem(nq: int, ng: int, ids: int, cams: int, dim: int = 768, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim)).astype(np.float32)
    g_pids, q_pids = rng.integers(0, ids, ng), rng.integers(1, ids, nq)
    g_cams, q_cams = rng.integers(0, cams, ng), rng.integers(0, cams, nq)
    gf = centres[g_pids] + NOISE * rng.normal(size=(ng, dim)).astype(np.float32)
    qf = centres[q_pids] + NOISE * rng.normal(size=(nq, dim)).astype(np.float32)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def argsort_reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """Sort every row (stable), as the vectorised torchreid / fast-reid evaluators do; for checking only."""
    order = np.argsort(distmat, axis=1, kind="stable")
    aps, cmc = [], np.zeros(max_rank)
    for i in range(len(q_pids)):
        o = order[i]
        keep = ~((g_pids[o] == q_pids[i]) & (g_cams[o] == q_cams[i])) & (g_pids[o] != -1)
        m = (g_pids[o] == q_pids[i])[keep]
        if not m.any():
            continue
        ranks = np.flatnonzero(m) + 1
        aps.append((np.arange(1, len(ranks) + 1) / ranks).mean())
        if ranks[0] <= max_rank:
            cmc[ranks[0] - 1 :] += 1
    return cmc / len(aps), float(np.mean(aps))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(name: str, nq: int, ng: int, ids: int, cams: int, check: bool) -> str:
    qf, gf, q_pids, g_pids, q_cams, g_cams = problem(nq, ng, ids, cams)
    base = peak_mb()
    t0 = time.perf_counter()
    distmat = pairwise_distance(qf, gf, "cosine")
    t1 = time.perf_counter()
    r = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    t2 = time.perf_counter()
    line = (f"| {name} | {nq:,} x {ng:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t2 - t0:.2f} | {peak_mb() - base:,.0f} | "
            f"{100 * r['cmc'][0]:.2f} / {100 * r['mAP']:.2f} |")  # fmt: skip
    if check:
        t3 = time.perf_counter()
        cmc, m_ap = argsort_reference(distmat, q_pids, g_pids, q_cams, g_cams)
        t4 = time.perf_counter()
        assert np.abs(cmc - r["cmc"]).max() <= 1e-6 and abs(m_ap - r["mAP"]) <= 1e-6, "results differ"
        line += f" {t4 - t3:.2f} (same CMC/mAP within 1e-6) |"
    else:
        line += " - |"
    return line


def run_features(name: str, nq: int, ng: int, ids: int, cams: int, topk: int | None) -> str:
    qf, gf, q_pids, g_pids, q_cams, g_cams = problem(nq, ng, ids, cams)
    base = peak_mb()
    t0 = time.perf_counter()
    r = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, "cosine", topk=topk)
    t1 = time.perf_counter()
    path = f"faiss top-{topk}" if topk else "chunked dense"
    return (f"| {name} | {nq:,} x {ng:,} | {path} | {t1 - t0:.2f} | {peak_mb() - base:,.0f} | "
            f"{100 * r['cmc'][0]:.2f} / {100 * r['mAP']:.2f} |")  # fmt: skip


def run_reference(nq: int, ng: int, ids: int, cams: int) -> list[str]:
    """Our evaluate_rank against the published evaluators on one distance matrix; asserts agreement within 1e-6."""
    from reference import load  # bench/reference.py: files of bench/.venv-ref, loaded by path

    qf, gf, q_pids, g_pids, q_cams, g_cams = problem(nq, ng, ids, cams)
    distmat = pairwise_distance(qf, gf, "cosine")
    t0, c0 = time.perf_counter(), time.process_time()
    ours = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    lines = [
        f"| dino_recog `evaluate_rank` | {ours_s:.2f} | {ours_cpu:.2f} | 1 | {100 * ours['cmc'][0]:.2f} | "
        f"{100 * ours['mAP']:.2f} | {100 * ours['mINP']:.2f} | - | - | - |"
    ]
    for package, label in (("fastreid", "fast-reid 1.4.0"), ("torchreid", "torchreid (PyPI 0.2.5)")):
        module = load(f"{package}.rank")
        t0, c0 = time.perf_counter(), time.process_time()
        result = module.evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if package == "fastreid":  # (cmc, all_AP, all_INP) per valid query
            cmc, m_ap, m_inp = result[0], float(np.mean(result[1])), float(np.mean(result[2]))
        else:  # (cmc, mAP); torchreid has no mINP
            (cmc, m_ap), m_inp = result, None
        d_cmc, d_ap = np.abs(cmc - ours["cmc"]).max(), abs(m_ap - ours["mAP"])
        d_inp = abs(m_inp - ours["mINP"]) if m_inp is not None else None
        assert d_cmc <= 1e-6 and d_ap <= 1e-6 and (d_inp is None or d_inp <= 1e-6), f"{label} differs"
        lines.append(
            f"| {label} `evaluate_rank` (Python path) | {seconds:.2f} | {cpu:.2f} | {cpu / ours_cpu:.0f} | "
            f"{100 * cmc[0]:.2f} | "
            f"{100 * m_ap:.2f} | {'-' if m_inp is None else f'{100 * m_inp:.2f}'} | {d_cmc:.1e} | {d_ap:.1e} | "
            f"{'-' if d_inp is None else f'{d_inp:.1e}'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--msmt", action="store_true", help="also the MSMT17-sized problem (a few GB of memory)")
    parser.add_argument(
        "--reference", action="store_true", help="fast-reid's and torchreid's evaluators at Market size"
    )
    parser.add_argument("--features", action="store_true", help="evaluate_features: chunked and faiss top-100 paths")
    args = parser.parse_args()
    if args.features:
        print("| problem | queries x gallery | path | total s | peak RSS growth MB | rank-1 / mAP(@k) |")
        print("|---|---|---|---|---|---|")
        sizes = [("Market-1501 size", 3368, 15913, 751, 6)] + [("MSMT17 size", 11659, 82161, 3060, 15)] * args.msmt
        for size in sizes:
            for topk in (None, 100):
                print(run_features(*size, topk), flush=True)
        return
    print("| problem | queries x gallery | distance s | protocol s | total s | peak RSS growth MB | rank-1 / mAP | "
          "argsort reference s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(run("Market-1501 size", 3368, 15913, 751, 6, check=True))
    if args.msmt:
        print(run("MSMT17 size", 11659, 82161, 3060, 15, check=False))
    if args.reference:
        print(f"\nMarket-1501 size, one distance matrix for every evaluator (load average {os.getloadavg()[0]:.2f}):\n")
        print("| evaluator | seconds | CPU seconds | CPU time / ours | rank-1 | mAP | mINP | max abs dCMC | "
              "abs dmAP | abs dmINP |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(run_reference(3368, 15913, 751, 6)))


if __name__ == "__main__":
    main()
