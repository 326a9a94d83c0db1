"""Pseudo-labels for unsupervised re-identification: k-reciprocal Jaccard distance, DBSCAN, clustering quality.

One round of cluster contrast (Dai et al. 2021) without its dense (N x N) matrices: faiss neighbours, the k-reciprocal
expansion and query expansion of `rerank`, a sparse distance graph, scikit-learn's DBSCAN on it.
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dino_recog.rerank import k_reciprocal_expansion, local_query_expansion, pair_dots, shared_mass

__all__ = ["jaccard_distance", "cluster", "cluster_graph", "cluster_quality"]

_BLOCK = 1 << 23  # rows of V's self-join handled at once: _BLOCK / N (with at most rerank._BLOCK / 4 terms)


def jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6, max_distance: float = 1.0) -> sp.csr_matrix:
    """k-reciprocal Jaccard distances between all items, as cluster contrast's `compute_jaccard_distance`, sparse.

    The definition of `clustercontrast/utils/faiss_rerank.py::compute_jaccard_distance` (alibaba/cluster-contrast-reid),
    which differs from the re-ranking of Zhong et al. as `rerank.re_rank` computes it in three places:

    1. Neighbours by squared Euclidean distance from an exact faiss search of k1 items, the item itself among them:
       N(p, k1) is those k1 items (not k1 + 1), N(q, k1/2) the k1/2 + 1 nearest (k1/2 rounded half to even).
    2. R(p, k) = {g in N(p, k) : p in N(g, k)}; R*(p, k1) adds R(c, k1/2) for each c in R(p, k1) sharing more than
       2/3 of it with R(p, k1), as in `rerank.k_reciprocal_expansion`.
    3. V_p(g) = softmax over g in R*(p, k1) of -(2 - 2 f_p . f_g): the squared distance of unit vectors, with no
       normalisation by the row's largest distance.
    4. Local query expansion: V_p <- the mean of V_q over the k2 nearest q (p included).
    5. d_J(p, g) = 1 - s / (2 - s), s = sum_l min(V_p(l), V_g(l)), clipped at 0; no mix with the original distance.

    Pairs that share no column of V are at distance exactly 1; only the others (s > 0) are stored, so memory is
    O(N k1^2) instead of the reference's several N x N float32 matrices. Entries of 0 (an item and itself, duplicates)
    are stored as explicit zeros: a sparse graph's consumers (DBSCAN) take stored entries as the only neighbours.

    Args:
        features: (N, D) L2-normalised features (float32, or converted to it).
        k1: size of the k-reciprocal neighbourhoods (cluster contrast: 30); capped at N.
        k2: neighbours averaged in the query expansion (cluster contrast: 6); 1 turns it off.
        max_distance: 1 stores every pair that shares a column of V (d_J < 1); below 1, only pairs with d_J <=
            max_distance (DBSCAN's eps: far fewer entries, e.g. 16 instead of 2,500 a row on synthetic features).

    Returns:
        (N, N) float32 CSR matrix, column indices sorted in each row, holding d_J(p, g) < 1 (or <= max_distance; rows
        and columns in the order of `features`); absent entries mean 1 (or more than max_distance).
    """
    feats = _check_features(features)
    if not 0.0 < max_distance <= 1.0:
        raise ValueError(f"max_distance = {max_distance}: expected a distance in (0, 1]")
    for name, k in (("k1", k1), ("k2", k2)):
        if not (isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"{name} = {k!r}: expected an integer >= 1")
    n = len(feats)
    k1, k2 = min(int(k1), n), min(int(k2), n)
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    _, ranks = index.search(feats, max(k1, k2))  # the reference searches k1; k2 > k1 would index past its table
    ranks = ranks.astype(np.int32)  # int32 halves the (N, k1, k1) temporaries of the expansion

    rows, cols = k_reciprocal_expansion(ranks, k1, min(int(np.around(k1 / 2)) + 1, k1))
    weight = np.exp(-(2.0 - 2.0 * pair_dots(feats, rows, cols)))  # float32
    vals = (weight / np.bincount(rows, weights=weight, minlength=n).astype(np.float32)[rows]).astype(np.float32)
    if k2 != 1:
        rows, cols, vals = local_query_expansion(rows, cols, vals, ranks[:, :k2])

    data, indices, counts = [], [], []
    for start, stop, src, tgt, pair_min in shared_mass(rows, cols, vals, n, n, 0, max(1, _BLOCK // n)):
        # Terms of the same pair summed by scipy (COO to CSR, then a sort within each row): linear in the terms, where
        # a dense (b, N) block of sums costs N per row whatever the few thousand pairs a row has (3x slower at 32k).
        sums = sp.coo_matrix((pair_min.astype(np.float64), (src, tgt)), shape=(stop - start, n)).tocsr()
        sums.sum_duplicates()  # also sorts each row's columns
        s = sums.data.astype(np.float32)  # then float32 arithmetic, as the reference: d_J(p, p) = 0 exactly, mostly
        dist = np.maximum(1.0 - s / (2.0 - s), np.float32(0.0))
        keep = dist < max_distance if max_distance >= 1.0 else dist <= max_distance  # float32 may round a tiny s to 1
        keep &= sums.data > 0  # every term is > 0; kept as the pairs sharing a column, whatever the rounding
        data.append(dist[keep])
        indices.append(sums.indices[keep].astype(np.int32))
        counts.append(np.diff(_kept_indptr(sums.indptr, keep)))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n, n))


def cluster_graph(distances: sp.csr_matrix, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
    """DBSCAN (scikit-learn, metric="precomputed") on a sparse distance graph whose absent entries are > eps.

    Stored entries are the only neighbours scikit-learn considers, so zeros must be stored explicitly (this keeps
    them, and scikit-learn adds the diagonal itself). Entries above eps are dropped first: they are never neighbours,
    and DBSCAN would otherwise copy them.

    Args:
        distances: (N, N) sparse distances, e.g. `jaccard_distance`.
        eps: neighbourhood radius (cluster contrast: 0.6 for Market-1501, 0.7 for MSMT17); in (0, 1) for a Jaccard
            graph, whose absent entries are 1.
        min_samples: neighbours (the point itself included) that make a core point (cluster contrast: 4).

    Returns:
        (N,) int64 cluster labels 0..C-1; -1 for outliers.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps = {eps}: expected a radius in (0, 1) (pairs absent from the graph are at distance 1)")
    if not (isinstance(min_samples, int | np.integer) and min_samples >= 1):
        raise ValueError(f"min_samples = {min_samples!r}: expected an integer >= 1")
    graph = sp.csr_matrix(distances)
    keep = graph.data <= eps
    graph = sp.csr_matrix((graph.data[keep], graph.indices[keep], _kept_indptr(graph.indptr, keep)), graph.shape)
    labels = DBSCAN(eps=eps, min_samples=int(min_samples), metric="precomputed").fit_predict(graph)
    return labels.astype(np.int64)


def cluster(features: np.ndarray, eps: float = 0.6, min_samples: int = 4, k1: int = 30, k2: int = 6) -> np.ndarray:
    """Pseudo-labels of one cluster-contrast round: DBSCAN on the k-reciprocal Jaccard distances of `features`.

    Only distances <= eps are ever stored (DBSCAN looks at no other).

    Args:
        features: (N, D) L2-normalised features.
        eps, min_samples: as `cluster_graph`.
        k1, k2: as `jaccard_distance`.

    Returns:
        (N,) int64 labels; -1 for outliers (cluster contrast drops them for the epoch).
    """
    if not 0.0 < eps < 1.0:  # checked before the expensive part
        raise ValueError(f"eps = {eps}: expected a radius in (0, 1) (pairs absent from the graph are at distance 1)")
    return cluster_graph(jaccard_distance(features, k1, k2, max_distance=eps), eps, min_samples)


def cluster_quality(labels: np.ndarray, true_ids: np.ndarray) -> dict[str, float | int]:
    """How pseudo-labels agree with true identities (for monitoring only).

    NMI (arithmetic normalisation, scikit-learn's default) and ARI are computed over all items, each outlier (-1)
    counted as a cluster of its own: dropping hard items cannot raise the scores, and one "outlier cluster" would
    wrongly group them.

    Args:
        labels: (N,) cluster labels, -1 for outliers.
        true_ids: (N,) identities.

    Returns:
        {"num_clusters", "num_outliers", "nmi", "ari"}.
    """
    labels, true_ids = np.asarray(labels).ravel(), np.asarray(true_ids).ravel()
    if len(labels) != len(true_ids) or len(labels) == 0:
        raise ValueError(f"labels ({len(labels)}) and true_ids ({len(true_ids)}): expected the same length >= 1")
    outlier = labels == -1
    singletons = labels.copy()
    singletons[outlier] = labels.max() + 1 + np.arange(outlier.sum())
    return {
        "num_clusters": len(np.unique(labels[~outlier])),
        "num_outliers": int(outlier.sum()),
        "nmi": float(normalized_mutual_info_score(true_ids, singletons)),
        "ari": float(adjusted_rand_score(true_ids, singletons)),
    }


def _check_features(features: np.ndarray) -> np.ndarray:
    feats = np.ascontiguousarray(np.asarray(features), dtype=np.float32)
    if feats.ndim != 2 or len(feats) == 0 or feats.shape[1] == 0:
        raise ValueError(f"features of shape {feats.shape}: expected (N, D) with N, D >= 1")
    if not np.isfinite(feats).all():
        raise ValueError(f"features: {int((~np.isfinite(feats)).any(1).sum())} rows hold NaN or inf")
    norms = np.linalg.norm(feats, axis=1)
    if np.abs(norms - 1.0).max() > 1e-3:
        bad = int(np.abs(norms - 1.0).argmax())
        raise ValueError(f"features: row {bad} has norm {norms[bad]:.4g}: expected L2-normalised rows (norm 1)")
    return feats


def _kept_indptr(indptr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """CSR row pointers after keeping the entries where `keep` is true."""
    return np.concatenate([[0], np.cumsum(keep)])[indptr]
