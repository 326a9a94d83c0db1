"""The re-identification protocol: distances, CMC, mAP and mINP, dense (chunked) or from a faiss top-K search.

`evaluate_rank` ranks a distance matrix as fast-reid and torchreid do; `evaluate_features` computes the same from
features without holding the whole query x gallery matrix. Both are re-exported by `dino_recog.evaluation`.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

__all__ = ["evaluate_features", "evaluate_rank", "pairwise_distance"]


def pairwise_distance(query: np.ndarray, gallery: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Distance matrix between two feature sets.

    Args:
        query: (Q, D) features.
        gallery: (G, D) features.
        metric: "cosine" (1 - cosine similarity) or "euclidean" (squared L2 distance; same ranking as L2).

    Returns:
        (Q, G) float32 distances.
    """
    q = np.asarray(query, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return 1.0 - q @ g.T
    if metric == "euclidean":
        d = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
        return np.maximum(d, 0.0)
    raise ValueError(f"metric {metric!r}: expected 'cosine' or 'euclidean'")


def _sortable_keys(distances: np.ndarray) -> np.ndarray:
    """(c, G) distances -> int64 keys ordered as (float32 distance, gallery index), so that every key is unique and
    comparing keys is comparing positions in a stable sort by distance."""
    d = np.asarray(distances, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 = +0.0: one zero, as a sort sees it
    bits = np.ascontiguousarray(d).view(np.int32).astype(np.int64)
    bits = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # IEEE order of negative floats is reversed
    return (bits << 32) | np.arange(distances.shape[1], dtype=np.int64)


class _RankStats:
    """Running sums of the protocol over query chunks (see `evaluate_rank`)."""

    def __init__(self, max_rank: int, cutoff: int | None) -> None:
        self.max_rank, self.cutoff = max_rank, cutoff
        self.hits_at = np.zeros(max_rank, dtype=np.int64)  # valid queries whose first match is at rank k+1
        self.ap_sum = self.inp_sum = 0.0
        self.num_valid = self.num_queries = 0

    def add(self, ranks: np.ndarray | None, num_matches: int) -> None:
        """One query: `ranks` are the sorted 1-based filtered ranks of its true matches that were found (all of them
        without a cut-off), `num_matches` = |G|, its number of true matches in the filtered gallery."""
        self.num_queries += 1
        if num_matches == 0:
            return
        self.num_valid += 1
        if len(ranks) == 0:  # every true match lies beyond the cut-off
            return
        if ranks[0] <= self.max_rank:
            self.hits_at[ranks[0] - 1] += 1
        self.ap_sum += float((np.arange(1, len(ranks) + 1) / ranks).sum()) / num_matches
        if len(ranks) == num_matches:  # the last true match is within reach; beyond the cut-off INP counts as 0
            self.inp_sum += num_matches / float(ranks[-1])

    def result(self) -> dict:
        if self.num_valid == 0:
            raise ValueError("no query has a true match in the gallery (after removing same-camera matches and junk)")
        out = {
            "cmc": np.cumsum(self.hits_at) / self.num_valid,
            "mAP": self.ap_sum / self.num_valid,
            "mINP": self.inp_sum / self.num_valid,
            "num_valid": self.num_valid,
            "num_skipped": self.num_queries - self.num_valid,
        }
        if self.cutoff is not None:
            out["cutoff"] = self.cutoff
        return out


def _rank_dense_chunk(
    stats: _RankStats, dist: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, g_pids, g_camids
) -> None:
    """Add a (c, G) block of the distance matrix to `stats`, without sorting: a true match's filtered rank is 1 + the
    number of kept gallery entries whose (distance, index) key is smaller."""
    never = np.iinfo(np.int64).max
    keys = _sortable_keys(dist)  # (c, G)
    same_pid = g_pids[None, :] == q_pids[:, None]
    keep = ~(same_pid & (g_camids[None, :] == q_camids[:, None])) & (g_pids[None, :] != -1)
    match = same_pid & keep
    kept_keys = np.where(keep, keys, never)
    for row in range(len(q_pids)):
        match_keys = keys[row, match[row]]
        ranks = np.sort((kept_keys[row][None, :] < match_keys[:, None]).sum(1)) + 1  # r_1 < ... < r_|G|
        if stats.cutoff is not None:
            ranks = ranks[ranks <= stats.cutoff]
        stats.add(ranks, len(match_keys))


def _check_labels(num_q: int, num_g: int, q_pids, g_pids, q_camids, g_camids) -> None:
    if len(q_pids) != num_q or len(q_camids) != num_q or len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"{num_q} queries x {num_g} gallery entries but got {len(q_pids)} query pids, {len(q_camids)} query "
            f"camids, {len(g_pids)} gallery pids and {len(g_camids)} gallery camids"
        )


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_size: int | None = None,
    cutoff: int | None = None,
) -> dict:
    """The Market-1501 / MSMT17 protocol as fast-reid and torchreid compute it.

    For each query the gallery is ordered by distance (ties keep gallery order); entries with the query's identity
    *and* camera are removed, junk (pid -1) is removed, distractors (pid 0) stay as negatives. A query with no true
    match left is skipped and counted. With the filtered ranks r_1 < ... < r_|G| of the |G| true matches:

        CMC@k = fraction of valid queries with r_1 <= k
        AP    = (1/|G|) * sum_j j / r_j               (non-interpolated; the official Market MATLAB code
                                                       interpolates precision and differs slightly)
        INP   = |G| / r_|G|                            (Ye et al. 2021, "Deep Learning for Person Re-identification")

    With a `cutoff` K, only ranks <= K count, as in a top-K retrieval: AP@K sums over the true matches within the
    first K (still divided by |G|) and INP@K is 0 when the last true match lies beyond K. This is what the faiss
    top-K path of `evaluate_features` computes; CMC up to K is unchanged.

    No sort: the rank of a true match is 1 + the number of kept gallery entries before it, counted by comparing
    (distance, index) keys, which costs |G| x gallery per query instead of a gallery-sized argsort. Distances are
    compared in float32 (what fast-reid and torchreid produce). Queries are processed in chunks, so the extra memory
    is bounded whatever the gallery size (`evaluate_features` also computes the distances chunk by chunk).

    Args:
        distmat: (Q, G) distances, smaller is closer.
        q_pids, q_camids: (Q,) identities and cameras of the queries.
        g_pids, g_camids: (G,) identities and cameras of the gallery.
        max_rank: length of the CMC curve (shortened to the gallery size).
        chunk_size: queries per chunk; default keeps each chunk near 4 M matrix entries.
        cutoff: K of a top-K evaluation, or None for the full ranking.

    Returns:
        {"cmc": (max_rank,) float array, "mAP": float, "mINP": float, "num_valid": int, "num_skipped": int}
        (+ "cutoff" when given).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    _check_labels(num_q, num_g, q_pids, g_pids, q_camids, g_camids)
    stats = _RankStats(min(max_rank, num_g, cutoff or num_g), cutoff)
    chunk = chunk_size or max(1, (1 << 22) // max(num_g, 1))
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        _rank_dense_chunk(stats, distmat[start:stop], q_pids[start:stop], q_camids[start:stop], g_pids, g_camids)
    return stats.result()


def evaluate_features(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: str = "cosine",
    max_rank: int = 50,
    topk: int | None = None,
    chunk_size: int | None = None,
) -> dict:
    """The protocol of `evaluate_rank` from features, never holding the whole query x gallery matrix.

    Dense (topk None): distances are computed and ranked one chunk of queries at a time, so the memory is
    chunk x gallery (about 16 MB by default) however large the problem; the result equals
    `evaluate_rank(pairwise_distance(query, gallery, metric), ...)` exactly.

    Top-K (topk=K): a faiss exact index gives each query its nearest gallery entries and the protocol runs on
    those lists (`evaluate_rank(..., cutoff=K)` semantics): CMC up to K, mAP@K and mINP@K. Junk (pid -1) is left out
    of the index, and each query is searched deep enough (K + its own same-identity same-camera entries) that K kept
    entries remain after filtering. Memory is Q x K.

    Returns:
        as `evaluate_rank`.
    """
    q = _as_float32(query, metric)
    g = _as_float32(gallery, metric)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    _check_labels(len(q), len(g), q_pids, g_pids, q_camids, g_camids)
    if topk is None:
        stats = _RankStats(min(max_rank, len(g)), None)
        chunk = chunk_size or max(1, (1 << 22) // max(len(g), 1))
        for start in range(0, len(q), chunk):
            stop = min(start + chunk, len(q))
            dist = pairwise_distance(q[start:stop], g, metric)
            _rank_dense_chunk(stats, dist, q_pids[start:stop], q_camids[start:stop], g_pids, g_camids)
        return stats.result()
    return _evaluate_topk(q, g, q_pids, g_pids, q_camids, g_camids, metric, max_rank, topk)


def _as_float32(x: np.ndarray | torch.Tensor, metric: str) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _evaluate_topk(q, g, q_pids, g_pids, q_camids, g_camids, metric: str, max_rank: int, k: int) -> dict:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric {metric!r}: expected 'cosine' or 'euclidean'")
    valid = np.flatnonzero(g_pids != -1)  # junk never counts: leave it out of the index
    g, g_pids, g_camids = g[valid], g_pids[valid], g_camids[valid]
    index = faiss.IndexFlatIP(g.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(g.shape[1])
    index.add(g)
    # per query: its true matches (|G|) and the entries the protocol removes (same identity and camera)
    pid_cam = np.stack([g_pids, g_camids], 1)
    uniq, counts = np.unique(pid_cam, axis=0, return_counts=True)
    lookup = {(int(p), int(c)): int(n) for (p, c), n in zip(uniq, counts)}
    per_pid = dict(zip(*np.unique(g_pids, return_counts=True)))
    removed = np.array([lookup.get((int(p), int(c)), 0) for p, c in zip(q_pids, q_camids)])
    num_matches = np.array([per_pid.get(p, 0) for p in q_pids]) - removed
    k = min(k, len(g))
    depth = min(len(g), k + int(removed.max(initial=0)))
    sims, idx = index.search(q, depth)  # (Q, depth), nearest first
    dist = (1.0 - sims) if metric == "cosine" else sims
    stats = _RankStats(min(max_rank, k), k)
    for row in range(len(q)):
        order = np.lexsort((idx[row], dist[row]))  # ties in gallery order, as the dense path
        cand = idx[row][order]
        keep = ~((g_pids[cand] == q_pids[row]) & (g_camids[cand] == q_camids[row]))
        cand = cand[keep][:k]
        ranks = np.flatnonzero(g_pids[cand] == q_pids[row]) + 1
        stats.add(ranks, int(num_matches[row]))
    return stats.result()
