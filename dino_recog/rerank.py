"""Test-time refinement of retrieval: k-reciprocal re-ranking and alpha-weighted average query expansion."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import faiss
import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["re_rank", "re_rank_features", "average_query_expansion"]

_BLOCK = 1 << 23  # matrix entries handled at once (32 MB in float32): bounds peak memory whatever the pool size


def re_rank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking of query-gallery distances.

    Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017. Computes what
    torchreid's and fast-reid's `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)` compute (one code
    in both: `torchreid/utils/rerank.py`, `fastreid/evaluation/rerank.py`), equal to within float32 rounding. Not
    what fast-reid's ReidEvaluator runs for TEST.RERANK: `fastreid/utils/compute_dist.py::compute_jaccard_distance`
    takes k1 neighbours with the probe among them (here k1 + 1), weights by exp(-squared feature distance) without
    the max-normalisation, and mixes with the plain metric distance, so its numbers differ.

    The pool P holds the Q queries followed by the G gallery items (N = Q + G); queries are neighbours too.

    1. Original distance d, as the reference: squared, then divided by its maximum over the pool,
           d(p, g) = D(g, p)^2 / max_h D(h, p)^2,   D = [[q_q, q_g], [q_g^T, g_g]]
       (the reference normalises columns and transposes; for symmetric q_q and g_g that is D(p, g)^2 / row max).
    2. N(p, k): the k + 1 items of P closest to p by d, p itself included (ties in any order, as np.argsort).
       k-reciprocal neighbours R(p, k) = {g in N(p, k) : p in N(g, k)}.
    3. Expansion: R*(p, k1) = R(p, k1) united with R(q, k1/2) for every q in R(p, k1) such that
           |R(q, k1/2) & R(p, k1)| > 2/3 |R(q, k1/2)|,
       k1/2 rounded half to even as np.around (20 -> 10, 5 -> 2, 7 -> 4). The paper writes >= where the code has >.
    4. Gaussian-kernel encoding: V_p(g) = exp(-d(p, g)) / sum_{h in R*(p, k1)} exp(-d(p, h)) for g in R*(p, k1),
       else 0 (the paper leaves the weights unnormalised; the code normalises, so every V_p sums to 1).
    5. Local query expansion, when k2 > 1: V_p <- (1 / k2) sum_{q in N(p, k2 - 1)} V_q (the k2 nearest, p included).
    6. Jaccard distance d_J(p, g) = 1 - sum_l min(V_p(l), V_g(l)) / sum_l max(V_p(l), V_g(l)), where
       sum max = 2 - sum min because both vectors sum to 1.
    7. d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g) for query p and gallery g. With lambda = 1 the result is d
       of step 1 (normalised squared distances), not the input.

    How: one pass over blocks of rows of d keeps each item's k1 + 1 nearest (torch.topk), its maximum and the query
    rows; the reciprocal sets and the expansion are vectorised over that (N, k1 + 1) table; V is stored sparse
    (row, column, weight); the Jaccard sums are joined over shared columns l for blocks of queries against gallery
    rows only. Memory is the (Q, G) result plus O(N k1^2) and one block, instead of the reference's N x N matrices.

    Args:
        q_g_dist: (Q, G) query-gallery distances (e.g. `evaluation.pairwise_distance`).
        q_q_dist: (Q, Q) query-query distances.
        g_g_dist: (G, G) gallery-gallery distances.
        k1: neighbourhood size of the k-reciprocal sets (paper: 20); any k1 >= N uses the whole pool, as the
            reference does.
        k2: neighbours averaged in the local query expansion (paper: 6); 1 turns it off.
        lambda_value: weight of the original distance (paper: 0.3).

    Returns:
        (Q, G) float32 re-ranked distances, smaller is closer.
    """
    q_g, q_q, g_g = (np.asarray(m) for m in (q_g_dist, q_q_dist, g_g_dist))
    if q_g.ndim != 2 or q_q.shape != (len(q_g),) * 2 or g_g.shape != (q_g.shape[1],) * 2 or q_g.size == 0:
        raise ValueError(
            f"q_g_dist {q_g.shape}, q_q_dist {q_q.shape}, g_g_dist {g_g.shape}: expected (Q, G), (Q, Q), (G, G) "
            "with Q, G >= 1"
        )
    q_g, q_q, g_g = (m if m.dtype in (np.float32, np.float64) else m.astype(np.float64) for m in (q_g, q_q, g_g))
    num_q = len(q_g)

    def columns(start: int, stop: int) -> np.ndarray:  # (b, N) columns start:stop of D, as rows
        qa, qb = min(start, num_q), min(stop, num_q)  # the queries among them
        ga, gb = max(start, num_q) - num_q, max(stop, num_q) - num_q  # the gallery items among them
        block = np.block([[q_q[:, qa:qb], q_g[:, ga:gb]], [q_g[qa:qb].T, g_g[:, ga:gb]]])  # (N, b)
        return np.ascontiguousarray(block.T)  # one transposing copy: numpy does it cache-friendly

    def entries(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # D(cols, rows), elementwise
        out = np.empty(len(rows), dtype=np.result_type(q_g, q_q, g_g))
        for m, value in (
            ((cols < num_q) & (rows < num_q), lambda c, r: q_q[c, r]),
            ((cols < num_q) & (rows >= num_q), lambda c, r: q_g[c, r - num_q]),
            ((cols >= num_q) & (rows < num_q), lambda c, r: q_g[r, c - num_q]),
            ((cols >= num_q) & (rows >= num_q), lambda c, r: g_g[c - num_q, r - num_q]),
        ):
            out[m] = value(cols[m], rows[m])
        return out

    return _re_rank(columns, entries, num_q, num_q + q_g.shape[1], k1, k2, lambda_value)


def re_rank_features(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "cosine",
) -> np.ndarray:
    """`re_rank` on the distances of `evaluation.pairwise_distance(., ., metric)`, from features.

    The same result as `re_rank(pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))` up
    to float32 rounding, but no (Q + G)^2 matrix is ever held: distances are computed block by block (and, for the
    few pairs that the weights of step 4 need, pair by pair). This is what makes MSMT17 (G = 82,161) possible.

    Args:
        query_features: (Q, D).
        gallery_features: (G, D).
        metric: "cosine" (1 - cosine similarity) or "euclidean" (squared L2), as `pairwise_distance`; squared again
            in step 1, as the reference does with whatever distance it is given.

    Returns:
        (Q, G) float32 re-ranked distances.
    """
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1] or len(q) == 0 or len(g) == 0:
        raise ValueError(f"query features {q.shape}, gallery features {g.shape}: expected (Q, D), (G, D), Q, G >= 1")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric {metric!r}: expected 'cosine' or 'euclidean'")
    feats = np.concatenate([q, g])
    if metric == "cosine":  # normalised once here, not once per block
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    sq = (feats * feats).sum(1)

    def distance(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray) -> np.ndarray:  # as pairwise_distance
        return 1.0 - dot if metric == "cosine" else np.maximum(sq_a + sq_b - 2.0 * dot, 0.0)

    def columns(start: int, stop: int) -> np.ndarray:  # D is symmetric: rows start:stop
        return distance(feats[start:stop] @ feats.T, sq[start:stop, None], sq[None, :])

    def entries(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return distance(pair_dots(feats, rows, cols), sq[rows], sq[cols])

    return _re_rank(columns, entries, len(q), len(feats), k1, k2, lambda_value)


def _re_rank(
    columns: Callable[[int, int], np.ndarray],
    entries: Callable[[np.ndarray, np.ndarray], np.ndarray],
    num_q: int,
    n: int,
    k1: int,
    k2: int,
    lambda_value: float,
) -> np.ndarray:
    """Steps 1-7 of `re_rank`, reading D through `columns(start, stop)` (columns start:stop of D as (b, N) rows) and
    `entries(p, g)` (D(g, p) for index arrays)."""
    if not (isinstance(k1, int | np.integer) and k1 >= 1 and isinstance(k2, int | np.integer) and k2 >= 1):
        raise ValueError(f"k1 = {k1!r}, k2 = {k2!r}: expected integers >= 1")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value = {lambda_value}: expected a weight in [0, 1]")
    num_g = n - num_q
    k_half = int(np.around(k1 / 2))
    width = min(max(k1 + 1, k2), n)

    # Steps 1-2: d block by block; keep each item's nearest neighbours (sorted), its maximum and the query rows.
    ranks = np.empty((n, width), dtype=np.int32)  # int32 halves the (N, k1 + 1, k1 + 1) temporaries
    peak = np.empty(n, dtype=np.float32)
    out = np.empty((num_q, num_g), dtype=np.float32)
    step = max(1, _BLOCK // n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        d = torch.from_numpy(columns(start, stop)).square_().float()  # (b, N) squared, then float32, as the reference
        top = d.amax(1, keepdim=True)
        d /= top
        peak[start:stop] = top[:, 0].numpy()
        ranks[start:stop] = _nearest(d, width)
        if start < num_q:
            out[start : min(stop, num_q)] = d[: num_q - start, num_q:].numpy()

    # Steps 2-3: R*(p, k1) as sparse pairs, from N(p, k1) (k1 + 1 items, p included) and N(q, k1/2).
    rows, cols = k_reciprocal_expansion(ranks, k1 + 1, k_half + 1)

    # Step 4: Gaussian weights over R*(p, k1), normalised per row.
    dist = np.square(entries(rows, cols)).astype(np.float32) / peak[rows]
    weight = np.exp(-dist)
    vals = weight / np.bincount(rows, weights=weight, minlength=n).astype(np.float32)[rows]

    # Step 5: V_p <- mean of the rows of its k2 nearest.
    if k2 != 1:
        rows, cols, vals = local_query_expansion(rows, cols, vals, ranks[:, :k2])

    # Steps 6-7: sum_l min(V_p(l), V_g(l)) for query rows p against gallery rows g, in blocks of queries.
    max_rows = max(1, _BLOCK // (4 * num_g))  # a (b, G) block of sums
    for start, stop, src, tgt, pair_min in shared_mass(rows, cols, vals, n, num_q, num_q, max_rows):
        s_min = np.bincount(src * num_g + tgt, weights=pair_min, minlength=(stop - start) * num_g)
        jaccard = (1.0 - s_min / (2.0 - s_min)).astype(np.float32).reshape(stop - start, num_g)
        out[start:stop] = jaccard * np.float32(1 - lambda_value) + out[start:stop] * np.float32(lambda_value)
    return out


def pair_dots(feats: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(M,) float32 dot products feats[rows[i]] . feats[cols[i]], in blocks of _BLOCK gathered entries."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, _BLOCK // feats.shape[1])
    for s in range(0, len(rows), step):
        out[s : s + step] = np.einsum("nd,nd->n", feats[rows[s : s + step]], feats[cols[s : s + step]])
    return out


def k_reciprocal_expansion(ranks: np.ndarray, fwd_width: int, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """The expanded k-reciprocal sets R*(p, k1) of every item p as sparse pairs (rows, cols), sorted by row then column.

    N(p, k1) is ranks[p, :fwd_width] and N(q, k1/2) is ranks[q, :half_width] (each item's nearest, itself usually
    first; which widths the conventions take is the caller's). R(p, k) = {g in N(p, k) : p in N(g, k)}, and
    R*(p, k1) = R(p, k1) united with R(c, k1/2) for every c in R(p, k1) with |R(c, k1/2) & R(p, k1)| > 2/3 |R(c, k1/2)|.
    Vectorised over the (N, width) table: O(N width^2) memory, no (N, N) matrix.
    """
    n = len(ranks)
    ids = np.arange(n)[:, None, None]
    fwd = ranks[:, :fwd_width]  # (N, A) N(p, k1)
    p, a = np.nonzero((ranks[fwd, :fwd_width] == ids).any(2))  # (M,) fwd[p, a] in R(p, k1)
    c = fwd[p, a]
    half = ranks[:, :half_width]  # (N, B) N(q, k1/2)
    in_half = (ranks[half, :half_width] == ids).any(2)  # (N, B) half[q, b] in R(q, k1/2)
    h, m = half[c], in_half[c]  # (M, B) R(c, k1/2) as N(c, k1/2) and a mask
    pairs = p[:, None] * n + h  # (M, B) as keys p * N + h
    known = np.sort(p * n + c)  # R(p, k1) as sorted keys: a binary search, where np.isin sorts all M * B queries
    found = np.searchsorted(known, pairs).clip(max=len(known) - 1)
    shared = m & (known[found] == pairs)  # (M, B) also in R(p, k1)
    grow = 3 * shared.sum(1) > 2 * m.sum(1)  # "> 2/3 |R(c, k1/2)|" in integers, exactly as in floating point
    added = m & grow[:, None]
    # The union, deduplicated by scipy (COO to CSR, sorting only within rows), where np.unique sorts all the keys.
    rows = np.concatenate([p, np.broadcast_to(p[:, None], added.shape)[added]])
    union = sp.coo_matrix((np.ones(len(rows), np.int32), (rows, np.concatenate([c, h[added]]))), shape=(n, n)).tocsr()
    union.sum_duplicates()  # also sorts each row's columns
    return np.repeat(np.arange(n), np.diff(union.indptr)), union.indices.astype(np.int64)


def local_query_expansion(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, nearest: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse V (rows ascending) replaced by V_p <- mean of V_q over q in nearest[p] ((N, k2), p usually included);
    entries of the same (p, l) summed. Returns the new (rows, cols, float32 vals), sorted by row then column."""
    n = len(nearest)
    pos, counts = _segments(_indptr(rows, n), nearest.ravel())
    owner = np.repeat(np.repeat(np.arange(n), nearest.shape[1]), counts)
    key, inverse = np.unique(owner * n + cols[pos], return_inverse=True)
    vals = (np.bincount(inverse, weights=vals[pos]) / nearest.shape[1]).astype(np.float32)
    return key // n, key % n, vals


def shared_mass(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, num_src: int, tgt_from: int, max_rows: int
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """The terms of sum_l min(V_p(l), V_g(l)) for source rows p < num_src against target rows g >= tgt_from of a sparse
    V over n items (rows ascending), joined on the column l, in blocks of source rows.

    Yields (start, stop, src, tgt, pair_min) per block of sources start:stop, with at most _BLOCK / 4 terms (~50 bytes
    each) or `max_rows` rows (one row at least): one term per shared column, src = p - start, tgt = g - tgt_from.
    Terms of the same pair are not summed; pairs sharing no column have none.
    """
    target = rows >= tgt_from
    order = np.argsort(cols[target], kind="stable")
    t_rows, t_cols, t_vals = rows[target][order] - tgt_from, cols[target][order], vals[target][order]
    by_col = _indptr(t_cols, n)
    s_ptr = _indptr(rows[rows < num_src], num_src)
    pairs_before = np.concatenate([[0], np.cumsum(np.diff(by_col)[cols[: s_ptr[-1]]])])[s_ptr]  # (S + 1,) terms
    start = 0
    while start < num_src:
        stop = np.searchsorted(pairs_before, pairs_before[start] + _BLOCK // 4, side="right") - 1
        stop = min(max(stop, start + 1), start + max_rows, num_src)
        lo, hi = s_ptr[start], s_ptr[stop]
        pos, counts = _segments(by_col, cols[lo:hi])
        pair_min = np.minimum(np.repeat(vals[lo:hi], counts), t_vals[pos])
        yield start, stop, np.repeat(rows[lo:hi] - start, counts), t_rows[pos], pair_min
        start = stop


def _nearest(d: torch.Tensor, width: int) -> np.ndarray:
    """(b, width) indices of the smallest entries of each row of `d`, ascending. A row with equal values among them
    (or at the cut) is ordered by np.argsort instead, as the reference orders it: ties then give its neighbour sets,
    which a different tie order changes, and with them re-ranked distances by far more than rounding. Such rows are
    few (exact float32 ties among a row's nearest), so the cost of sorting them whole is small."""
    vals, idx = torch.topk(d, min(width + 1, d.shape[1]), dim=1, largest=False)
    for row in torch.nonzero((vals[:, 1:] == vals[:, :-1]).any(1)).flatten().tolist():
        idx[row] = torch.from_numpy(np.argsort(d[row].numpy())[: idx.shape[1]])
    return idx[:, :width].numpy()


def _indptr(sorted_rows: np.ndarray, n: int) -> np.ndarray:
    """CSR row pointers (n + 1,) of entries whose row indices are `sorted_rows` (ascending)."""
    return np.concatenate([[0], np.cumsum(np.bincount(sorted_rows, minlength=n))])


def _segments(indptr: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the entries of rows `sel` (repeats allowed) of a CSR structure, concatenated, and their counts."""
    starts, counts = indptr[sel], indptr[sel + 1] - indptr[sel]
    offsets = np.cumsum(counts) - counts  # where each row's run begins in the output
    return np.arange(counts.sum()) + np.repeat(starts - offsets, counts), counts


def average_query_expansion(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    k: int = 5,
    alpha: float = 3.0,
    times: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-weighted average query expansion (alpha-QE), applied to queries and gallery alike, as fast-reid's `aqe`.

    Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018. Every item x of
    the pool (queries and gallery together) is replaced by the average of its k nearest items by cosine similarity,
    itself included, each weighted by its similarity to the power alpha:

        x' = (1/k) sum_{y in N_k(x)} cos(x, y)^alpha y,        then L2-normalised,

    repeated `times` times (similarities from the normalised current features, averages of the current features).
    fast-reid (`fastreid/evaluation/query_expansion.py::aqe`, defaults TEST.AQE.QE_K=5, ALPHA=3.0, QE_TIME=1; the
    function's own default k is 10) returns x' unnormalised; here it is normalised, so cosine distances are the same
    and Euclidean ones are on the unit sphere like those of `extract_features`. Neighbours come from faiss (exact).

    Args:
        query_features: (Q, D).
        gallery_features: (G, D).
        k: items averaged, the item itself included (shortened to Q + G).
        alpha: similarity exponent (0 gives the plain average query expansion of Chum et al. 2007).
        times: rounds of expansion.

    Returns:
        (Q, D) and (G, D) L2-normalised float32 features.
    """
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"query features {q.shape}, gallery features {g.shape}: expected (Q, D), (G, D)")
    if k < 1 or times < 0:
        raise ValueError(f"k = {k}, times = {times}: expected k >= 1 and times >= 0")
    feats = np.concatenate([q, g])
    k = min(k, len(feats))
    for _ in range(times):
        unit = _unit(feats)
        index = faiss.IndexFlatIP(unit.shape[1])
        index.add(unit)
        sims, nearest = index.search(unit, k)  # (N, k), most similar first: the item itself
        weights = sims**alpha
        feats = sum(weights[:, t, None] * feats[nearest[:, t]] for t in range(k)) / k  # (N, D)
    feats = _unit(feats)
    return feats[: len(q)], feats[len(q) :]


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)
