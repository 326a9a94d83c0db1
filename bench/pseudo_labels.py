"""Benchmark of one pseudo-labelling round (k-reciprocal Jaccard distance + DBSCAN): `dino_recog.pseudo_labels` against
the published cluster-contrast `compute_jaccard_distance` followed by scikit-learn's DBSCAN on its dense matrix.

    bash bench/cluster_contrast_env.sh /path/to/cluster-contrast-reid   # once: bench/.cluster-contrast-ref
    python bench/pseudo_labels.py [--sizes 12936 32621 100000] [--reference-max 32621] [--no-reference]

Synthetic L2-normalised 384-d features (ViT-S/16) clustered like re-ID features: N/15 identity centres, each image its
centre plus Gaussian noise of a per-image strength; centres share a common direction (cosine about 0.5 between centres,
about 0.4 between two images of one identity, 0.2 between identities). Both run k1 = 30, k2 = 6, eps = 0.6, min_samples
= 4 (cluster contrast's Market-1501 settings), the reference with its CPU faiss search (search_option=3: the same exact
IndexFlatL2 as ours). Each run is a fresh process that loads the features, imports everything, then reports wall and CPU
seconds and the growth of its peak resident memory above that point (VmHWM - VmRSS, Linux; faiss's and scikit-learn's
buffers included). Ours stores only distances <= eps, as `pseudo_labels.cluster` does; the reference then compares its
dense matrix with our graph on every entry that either has <= eps (an entry we lack counts as 1) and its labels with
ours.
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from rerank import reset_peak, rss_mb  # noqa: E402 (bench/rerank.py: the same memory measure as that benchmark)

REFERENCE = BENCH / ".cluster-contrast-ref"
K1, K2, EPS, MIN_SAMPLES, DIM = 30, 6, 0.6, 4, 384


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, DIM) unit features around n // 15 identity centres, and their identities."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, max(1, n // 15), n)
    common = rng.normal(size=DIM).astype(np.float32)  # features share a mean direction, as real ones do
    centres = (rng.normal(size=(max(1, n // 15), DIM)).astype(np.float32) + common) / np.sqrt(DIM)
    strength = rng.uniform(1.0, 2.2, (n, 1)).astype(np.float32) / np.sqrt(DIM)
    f = centres[ids] + strength * rng.normal(size=(n, DIM)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True), ids


def available_gb() -> float:
    """MemAvailable of the machine (Linux /proc/meminfo), in GB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def worker(name: str, folder: Path) -> None:
    """Run one implementation on the saved features; print its times, peak RSS growth and checks as JSON."""
    import scipy.sparse as sp
    import torch
    from sklearn.cluster import DBSCAN

    from dino_recog.pseudo_labels import cluster_graph, cluster_quality, jaccard_distance

    feats, ids = np.load(folder / "features.npy"), np.load(folder / "ids.npy")
    if name == "reference":
        sys.path.insert(0, str(REFERENCE))
        from clustercontrast_utils.faiss_rerank import compute_jaccard_distance
    reset_peak()
    base = rss_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "ours":
        dist = jaccard_distance(feats, k1=K1, k2=K2, max_distance=EPS)  # what `cluster` does
        t1 = time.perf_counter()
        labels = cluster_graph(dist, eps=EPS, min_samples=MIN_SAMPLES)
    else:  # as cluster contrast's examples/cluster_contrast_train_usl.py, on the CPU
        dist = compute_jaccard_distance(torch.from_numpy(feats), k1=K1, k2=K2, print_flag=False, search_option=3)
        t1 = time.perf_counter()
        labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=-1).fit_predict(dist)
    t2, cpu = time.perf_counter(), time.process_time() - c0
    stats = {"jaccard_s": t1 - t0, "dbscan_s": t2 - t1, "seconds": t2 - t0, "cpu": cpu}
    stats |= {"peak_growth_mb": rss_mb("VmHWM") - base, "base_mb": base, **cluster_quality(labels, ids)}
    if name == "ours":
        sp.save_npz(folder / "ours.npz", dist, compressed=False)
        np.save(folder / "labels.npy", labels)
        stats["stored_per_row"] = dist.nnz / len(feats)
    else:  # after the measurement: on every entry <= eps of either, our graph against the dense matrix
        ours, worst = sp.load_npz(folder / "ours.npz").tocsr(), 0.0
        for start in range(0, len(feats), 1024):
            block, ref = ours[start : start + 1024], dist[start : start + 1024]
            dense = np.ones(block.shape, dtype=np.float32)
            dense[np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)), block.indices] = block.data
            both = (ref <= EPS) | (dense <= EPS)
            worst = max(worst, float(np.abs(dense[both] - ref[both]).max(initial=0.0)))
        stats["max_abs_diff"] = worst
        stats["same_labels"] = bool((np.load(folder / "labels.npy") == labels).all())
    print(json.dumps(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12936, 32621, 100000])
    parser.add_argument("--reference-max", type=int, default=32621, help="largest N the reference is run at")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.dir)
    has_ref = (REFERENCE / "clustercontrast_utils" / "faiss_rerank.py").is_file()
    if not (has_ref or args.no_reference):
        sys.exit(f"{REFERENCE} is missing: run `bash bench/cluster_contrast_env.sh PATH` or pass --no-reference")
    commit = (REFERENCE / "clustercontrast_utils" / "COMMIT").read_text().strip() if has_ref else "-"
    print(f"k1={K1}, k2={K2}, eps={EPS}, min_samples={MIN_SAMPLES}, D={DIM}; cluster-contrast-reid {commit[:10]}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        "| N | implementation | Jaccard s | DBSCAN s | total s | CPU s | peak RSS growth MB | clusters / outliers "
        "| NMI / ARI | max abs diff. | same labels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            feats, ids = synthetic(n)
            np.save(folder / "features.npy", feats)
            np.save(folder / "ids.npy", ids)
            del feats
            names = ["ours"] + ([] if args.no_reference or n > args.reference_max else ["reference"])
            need_gb, free_gb = 3 * 4 * n * n / 2**30, available_gb()
            if "reference" in names and need_gb > free_gb:  # its V, V_qe, jaccard_dist: an OOM kill hits others too
                print(f"| {n:,} | reference | not run: needs about {need_gb:.0f} GB, {free_gb:.0f} GB available |")
                names.remove("reference")
            runs = {}
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, "--dir", str(folder)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {n:,} | {name} | failed (exit {done.returncode}): {done.stderr.strip()[-200:]} |")
                    continue
                s = runs[name] = json.loads(done.stdout.splitlines()[-1])
                cells = [f"{n:,}", name, *(f"{s[k]:.1f}" for k in ("jaccard_s", "dbscan_s", "seconds", "cpu"))]
                cells += [f"{s['peak_growth_mb']:,.0f}", f"{s['num_clusters']:,} / {s['num_outliers']:,}"]
                cells += [f"{s['nmi']:.4f} / {s['ari']:.4f}"]
                cells += [f"{s['max_abs_diff']:.1e}", str(s["same_labels"])] if name == "reference" else ["-", "-"]
                print("| " + " | ".join(cells) + " |", flush=True)
            if len(runs) == 2:
                ref, ours = runs["reference"], runs["ours"]
                print(
                    f"N={n:,}: reference / ours = {ref['seconds'] / ours['seconds']:.1f}x the wall time, "
                    f"{ref['cpu'] / ours['cpu']:.1f}x the CPU time, "
                    f"{ref['peak_growth_mb'] / ours['peak_growth_mb']:.1f}x the peak memory growth; "
                    f"ours stores {ours['stored_per_row']:.0f} entries a row",
                    flush=True,
                )
            elif "ours" in runs:
                print(f"N={n:,}: ours stores {runs['ours']['stored_per_row']:.0f} entries a row", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f} (2 cores shared with other work: compare CPU seconds too)")


if __name__ == "__main__":
    main()
