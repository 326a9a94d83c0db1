from functools import cache
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from dino_recog import pseudo_labels
from dino_recog.pseudo_labels import cluster, cluster_graph, cluster_quality, jaccard_distance

PUBLISHED = Path(__file__).resolve().parents[1] / "bench" / ".cluster-contrast-ref"  # bench/cluster_contrast_env.sh


def dense_jaccard(f, k1, k2):
    """cluster contrast's Jaccard distance written from its formula, one item at a time, with dense vectors."""
    n = len(f)
    k1, k2 = min(k1, n), min(k2, n)
    d2 = np.array([[float(np.sum((a.astype(np.float64) - b) ** 2)) for b in f] for a in f])  # squared L2
    order = np.argsort(d2, axis=1, kind="stable")

    @cache
    def R(p, width):  # k-reciprocal neighbours within the `width` nearest (p included)
        return frozenset(g for g in order[p, :width] if p in order[g, :width])

    half = min(round(k1 / 2) + 1, k1)  # the reference's N(p, k1) holds k1 items, N(p, k1/2) k1/2 + 1
    V = np.zeros((n, n))
    for p in range(n):
        rp = R(p, k1)
        star = set(rp)
        for c in rp:
            rc = R(c, half)
            if len(rc & rp) > 2 / 3 * len(rc):
                star |= rc
        idx = sorted(star)
        w = np.exp(-d2[p, idx])
        V[p, idx] = w / w.sum()
    V = np.array([V[order[p, :k2]].mean(0) for p in range(n)])
    mins = np.minimum(V[:, None], V[None]).sum(2)  # (p, g): sum_l min(V_p(l), V_g(l))
    maxs = np.maximum(V[:, None], V[None]).sum(2)
    return np.maximum(1 - mins / maxs, 0.0)


def clustered(seed, n=90, ids=9, dim=8, noise=0.45):
    """Unit features around `ids` identity centres: reciprocal sets, expansions and clusters are all non-trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    truth = rng.integers(0, ids, n)
    f = centres[truth] + noise * rng.normal(size=(n, dim))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), truth


def densify(graph):
    """The full matrix a sparse Jaccard graph stands for: absent entries are 1, explicit zeros stay 0."""
    out = np.ones(graph.shape)
    rows = np.repeat(np.arange(graph.shape[0]), np.diff(graph.indptr))
    out[rows, graph.indices] = graph.data
    return out


@pytest.mark.parametrize("seed,k1,k2", [(0, 30, 6), (1, 10, 3), (2, 7, 1), (3, 5, 8), (4, 200, 6)])
def test_jaccard_equals_dense_formula(seed, k1, k2):
    f, _ = clustered(seed)
    graph = jaccard_distance(f, k1=k1, k2=k2)
    expected = dense_jaccard(f, k1, k2)
    assert isinstance(graph, sp.csr_matrix) and graph.dtype == np.float32 and graph.has_sorted_indices
    np.testing.assert_allclose(densify(graph), expected, atol=1e-5, rtol=0)
    stored = np.zeros(expected.shape, dtype=bool)
    stored[np.repeat(np.arange(len(f)), np.diff(graph.indptr)), graph.indices] = True
    assert (stored == (expected < 1 - 1e-6)).all()  # exactly the pairs that share neighbourhood mass
    assert graph.nnz > 0 and (k1 > 10 or graph.nnz < len(f) ** 2 / 2)  # sparse for small neighbourhoods
    near = jaccard_distance(f, k1=k1, k2=k2, max_distance=0.6)  # only what DBSCAN with eps 0.6 looks at
    np.testing.assert_array_equal(np.diff(near.indptr), (densify(graph) <= 0.6).sum(1))  # zeros stored too
    np.testing.assert_allclose(densify(near), np.where(expected <= 0.6, expected, 1.0), atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not (PUBLISHED / "clustercontrast_utils" / "faiss_rerank.py").is_file(),
    reason="no bench/.cluster-contrast-ref (bash bench/cluster_contrast_env.sh PATH)",
)
def test_matches_published_compute_jaccard_distance(monkeypatch):
    # The published code itself, when the benchmark's copy exists: confirms the conventions of the docstring.
    monkeypatch.syspath_prepend(str(PUBLISHED))
    from clustercontrast_utils.faiss_rerank import compute_jaccard_distance

    for seed, k1, k2 in [(0, 30, 6), (1, 10, 3), (2, 7, 1)]:
        f, _ = clustered(seed, n=150)
        published = compute_jaccard_distance(torch.from_numpy(f), k1, k2, print_flag=False, search_option=3)
        np.testing.assert_allclose(densify(jaccard_distance(f, k1, k2)), published, atol=1e-5, rtol=0)


def test_blocks_of_any_size_give_the_same_graph(monkeypatch):
    f, _ = clustered(5, n=120)
    whole = jaccard_distance(f, k1=12, k2=4)
    monkeypatch.setattr(pseudo_labels, "_BLOCK", 1)  # one row a block
    small = jaccard_distance(f, k1=12, k2=4)
    assert (whole != small).nnz == 0 and whole.nnz == small.nnz


@pytest.mark.parametrize("eps,min_samples", [(0.6, 4), (0.5, 3), (0.7, 6), (0.3, 2)])
def test_dbscan_on_the_sparse_graph_equals_dense(eps, min_samples):
    f, _ = clustered(6, n=150, ids=12, noise=0.55)
    dense = dense_jaccard(f, 30, 6)
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    labels = cluster(f, eps=eps, min_samples=min_samples)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)
    assert len(set(expected) - {-1}) >= 2  # a case where the comparison means something


def test_zero_distances_count_as_neighbours():
    # Five points at distance exactly 0 from each other and 0.9 from the rest: with min_samples 5 they are one cluster
    # only if the stored zeros count (scikit-learn adds the diagonal itself, not off-diagonal zeros).
    dense = np.full((8, 8), 0.9)
    dense[:5, :5] = 0.0
    np.fill_diagonal(dense, 0.0)
    graph = sp.csr_matrix(np.where(dense < 1, 1.0, 0.0))  # the pattern of stored entries ...
    graph.data[:] = dense[graph.nonzero()]  # ... holding explicit zeros
    assert (graph.data == 0).sum() == 25 + 3
    expected = DBSCAN(eps=0.5, min_samples=5, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(expected, [0, 0, 0, 0, 0, -1, -1, -1])
    np.testing.assert_array_equal(cluster_graph(graph, eps=0.5, min_samples=5), expected)
    dropped = graph.copy()
    dropped.eliminate_zeros()  # what a graph without explicit zeros gives: no cluster at all
    np.testing.assert_array_equal(cluster_graph(dropped, eps=0.5, min_samples=5), [-1] * 8)


def test_duplicate_features_are_at_distance_zero_and_cluster():
    f, _ = clustered(7, n=60)
    f = np.concatenate([f, np.repeat(f[:1], 4, axis=0)])  # four copies of item 0
    graph = jaccard_distance(f, k1=8, k2=1)
    full = densify(graph)
    assert (graph.data == 0).sum() >= len(f)  # the diagonal at least, stored
    np.testing.assert_array_equal(
        cluster_graph(graph, eps=0.6, min_samples=4),
        DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(full),
    )


def test_far_points_are_outliers():
    f, _ = clustered(8, n=80, ids=4, noise=0.2)
    # Unit vectors away from every cluster and from each other: no one has them among its nearest, so their
    # k-reciprocal sets hold themselves only (without query expansion, which would borrow their neighbours' sets).
    far = np.eye(8, dtype=np.float32)[:2] * -1
    labels = cluster(np.concatenate([f, far]), eps=0.6, min_samples=4, k1=10, k2=1)
    assert labels[-2:].tolist() == [-1, -1]
    assert (labels[:-2] >= 0).mean() > 0.75 and labels.max() >= 1  # the clusters themselves are found


def test_cluster_quality_hand_computed():
    # Truth {0,1,2} {3,4,5}; clusters {0,1} {3,4,5}, items 2 outlier (its own singleton).
    # Contingency rows truth, columns clusters (a, b, singleton): [[2,0,1],[0,3,0]].
    # ARI: sum C(n_ij,2) = 1 + 3 = 4; rows C(3,2)+C(3,2) = 6; columns 1 + 3 + 0 = 4; C(6,2) = 15; expected 6*4/15 = 1.6
    # -> (4 - 1.6) / ((6 + 4) / 2 - 1.6) = 2.4 / 3.4. NMI: H(truth) = ln 2; H(clusters) = -(2/6 ln 2/6 + 3/6 ln 3/6
    # + 1/6 ln 1/6); I = H(truth) (each cluster lies in one identity) -> 2 ln2 / (ln2 + H(clusters)).
    h_c = -(1 / 3 * np.log(1 / 3) + 0.5 * np.log(0.5) + 1 / 6 * np.log(1 / 6))
    q = cluster_quality([0, 0, -1, 1, 1, 1], [7, 7, 7, 9, 9, 9])
    assert q["num_clusters"] == 2 and q["num_outliers"] == 1
    assert q["ari"] == pytest.approx(2.4 / 3.4, abs=1e-12)
    assert q["nmi"] == pytest.approx(2 * np.log(2) / (np.log(2) + h_c), abs=1e-12)
    perfect = cluster_quality([3, 3, 5, 5], [1, 1, 0, 0])
    assert perfect == {"num_clusters": 2, "num_outliers": 0, "nmi": 1.0, "ari": 1.0}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f: jaccard_distance(f * 2), r"row \d+ has norm 2: expected L2-normalised"),
        (lambda f: jaccard_distance(np.vstack([f[:3], np.full((1, 8), np.nan), f[3:]])), "1 rows hold NaN or inf"),
        (lambda f: jaccard_distance(f[0]), r"shape \(8,\): expected \(N, D\)"),
        (lambda f: jaccard_distance(f, k1=0), "k1 = 0: expected an integer >= 1"),
        (lambda f: jaccard_distance(f, k2=2.5), "k2 = 2.5"),
        (lambda f: jaccard_distance(f, max_distance=0), r"max_distance = 0: expected a distance in \(0, 1\]"),
        (lambda f: cluster(f, eps=1.0), r"eps = 1.0: expected a radius in \(0, 1\)"),
        (lambda f: cluster_graph(jaccard_distance(f), min_samples=0), "min_samples = 0"),
        (lambda f: cluster_quality([0, 1], [0]), r"labels \(2\) and true_ids \(1\)"),
    ],
)
def test_bad_input_is_named(call, match):
    f, _ = clustered(9, n=20)
    with pytest.raises(ValueError, match=match):
        call(f)
