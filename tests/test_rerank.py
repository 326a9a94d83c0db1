import math

import numpy as np
import pytest
import torch

from bench import reference
from dino_recog import rerank
from dino_recog.evaluation import pairwise_distance
from dino_recog.rerank import average_query_expansion, re_rank, re_rank_features


def paper_re_rank(q_g, q_q, g_g, k1, k2, lam):
    """Zhong et al. 2017 (CVPR), equations written out one item at a time, with the conventions of the reference code
    (torchreid / fast-reid `re_ranking`) where the paper leaves a choice. Returns the (Q, G) distances and counts of
    how the 2/3 rule went: candidates added, refused, and refused only because the inequality is strict."""
    num_q, num_g = len(q_g), len(q_g[0])
    pool = range(num_q + num_g)  # queries first, then the gallery

    def D(a, b):  # input distance between pool items a and b
        if a < num_q and b < num_q:
            return float(q_q[a][b])
        if a < num_q:
            return float(q_g[a][b - num_q])
        if b < num_q:
            return float(q_g[b][a - num_q])
        return float(g_g[a - num_q][b - num_q])

    # Original distance d(p, g): D(g, p) squared, divided by the largest such value for p (the code normalises the
    # columns of D^2 by their maximum, then transposes).
    d = {}
    for p in pool:
        largest = max(D(h, p) ** 2 for h in pool)
        d[p] = {g: D(g, p) ** 2 / largest for g in pool}

    def N(p, k):  # Eq. 1, k nearest neighbours; in the code the probe itself is one of the k + 1 first
        return sorted(pool, key=lambda g: d[p][g])[: k + 1]

    def R(p, k):  # Eq. 3, k-reciprocal nearest neighbours
        return {g for g in N(p, k) if p in N(g, k)}

    half = round(k1 / 2)  # Python rounds half to even, as np.around
    stats = {"added": 0, "refused": 0, "tie": 0}
    V = {}
    for p in pool:
        r_star = set(R(p, k1))  # Eq. 6, with the code's strict inequality
        for q in R(p, k1):
            rq = R(q, half)
            if len(rq & R(p, k1)) > 2 / 3 * len(rq):
                r_star |= rq
                stats["added"] += 1
            else:
                stats["refused"] += 1
                stats["tie"] += 3 * len(rq & R(p, k1)) == 2 * len(rq)
        total = sum(math.exp(-d[p][g]) for g in r_star)
        V[p] = {g: math.exp(-d[p][g]) / total for g in r_star}  # Eq. 7, normalised to sum 1 as in the code

    if k2 > 1:  # Eq. 10, local query expansion over the k2 nearest (the probe included)
        V = {p: {g: sum(V[q].get(g, 0.0) for q in N(p, k2 - 1)) / len(N(p, k2 - 1)) for g in pool} for p in pool}

    out = np.zeros((num_q, num_g))
    for p in range(num_q):
        for g in range(num_q, num_q + num_g):
            mins = sum(min(V[p].get(x, 0.0), V[g].get(x, 0.0)) for x in pool)
            maxs = sum(max(V[p].get(x, 0.0), V[g].get(x, 0.0)) for x in pool)
            d_jaccard = 1 - mins / maxs  # Eq. 11
            out[p, g - num_q] = (1 - lam) * d_jaccard + lam * d[p][g]  # Eq. 12
    return out, stats


def features(seed, nq=5, ng=12, ids=3, dim=4, noise=0.6):
    """Clustered random features: identities share neighbours, so reciprocal sets and expansions are non-trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    f = (centres[rng.integers(0, ids, nq + ng)] + noise * rng.normal(size=(nq + ng, dim))).astype(np.float32)
    return f[:nq], f[nq:]


def matrices(qf, gf, metric="cosine"):
    return pairwise_distance(qf, gf, metric), pairwise_distance(qf, qf, metric), pairwise_distance(gf, gf, metric)


CASES = [  # seed, k1, k2, lambda, metric
    (0, 4, 2, 0.3, "cosine"),
    (1, 4, 2, 0.3, "euclidean"),
    (2, 5, 3, 0.5, "cosine"),
    (3, 7, 1, 0.3, "cosine"),
    (1, 7, 3, 0.3, "cosine"),
    (4, 6, 4, 0.0, "euclidean"),
    (5, 3, 2, 0.8, "cosine"),
]


@pytest.mark.parametrize("seed,k1,k2,lam,metric", CASES)
def test_matches_paper_equations(seed, k1, k2, lam, metric):
    qg, qq, gg = matrices(*features(seed), metric)
    expected, _ = paper_re_rank(qg, qq, gg, k1, k2, lam)
    out = re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert out.shape == (5, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_cases_exercise_every_branch_of_the_two_thirds_rule():
    # Without additions, refusals and exact ties (|R(q,k/2) & R(p,k)| = 2/3 |R(q,k/2)|) among the cases, the test
    # above could not tell R* from R, nor ">" from ">=".
    total = {"added": 0, "refused": 0, "tie": 0}
    for seed, k1, k2, lam, metric in CASES:
        _, stats = paper_re_rank(*matrices(*features(seed), metric), k1, k2, lam)
        total = {k: total[k] + stats[k] for k in total}
    assert total["added"] > 0 and total["refused"] > 0 and total["tie"] > 0, total


def test_asymmetric_input_is_read_by_columns_as_the_reference():
    rng = np.random.default_rng(7)
    qg, qq, gg = rng.random((4, 9)), rng.random((4, 4)), rng.random((9, 9))  # float64, not symmetric
    expected, _ = paper_re_rank(qg, qq, gg, 3, 2, 0.3)
    np.testing.assert_allclose(re_rank(qg, qq, gg, k1=3, k2=2, lambda_value=0.3), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k1,k2", [(20, 6), (40, 30)])
def test_k_larger_than_the_pool_uses_the_whole_pool(k1, k2):
    qg, qq, gg = matrices(*features(8, nq=3, ng=5))  # pool of 8 items
    expected, _ = paper_re_rank(qg, qq, gg, k1, k2, 0.3)
    np.testing.assert_allclose(re_rank(qg, qq, gg, k1=k1, k2=k2), expected, atol=1e-5, rtol=0)


def test_lambda_one_gives_the_normalised_squared_distance():
    qg, qq, gg = matrices(*features(9))
    squared = np.concatenate([qq.T, qg], axis=1).astype(np.float64) ** 2  # the query rows of D^T, squared
    expected = squared[:, 5:] / squared.max(1, keepdims=True)
    np.testing.assert_allclose(re_rank(qg, qq, gg, lambda_value=1.0), expected, rtol=1e-6)


def test_jaccard_part_is_symmetric_and_permutation_equivariant():
    qg, qq, gg = matrices(*features(10))
    out = re_rank(qg, qq, gg, k1=4, k2=2, lambda_value=0.0)
    # Swapping the roles of queries and gallery keeps the pool (in another order): the Jaccard distance is symmetric.
    np.testing.assert_allclose(re_rank(qg.T, gg, qq, k1=4, k2=2, lambda_value=0.0), out.T, atol=1e-6)
    rng = np.random.default_rng(0)
    pq, pg = rng.permutation(5), rng.permutation(12)
    full = re_rank(qg[pq][:, pg], qq[pq][:, pq], gg[pg][:, pg], k1=4, k2=2, lambda_value=0.3)
    np.testing.assert_allclose(full, re_rank(qg, qq, gg, k1=4, k2=2, lambda_value=0.3)[pq][:, pg], atol=1e-6)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_blocks_of_any_size_give_the_same_result(monkeypatch):
    qg, qq, gg = matrices(*features(11, nq=9, ng=30))
    whole = re_rank(qg, qq, gg, k1=6, k2=3)
    monkeypatch.setattr(rerank, "_BLOCK", 50)  # a block is then one or two rows
    np.testing.assert_allclose(re_rank(qg, qq, gg, k1=6, k2=3), whole, atol=1e-6)


def test_ties_are_ordered_as_np_argsort_orders_them():
    # The reference sorts rows with np.argsort; where equal distances straddle a cut, the neighbour sets depend on
    # that order, so rows with ties take it (rows without ties give the same with torch.topk).
    rng = np.random.default_rng(0)
    d = rng.integers(0, 6, (40, 50)).astype(np.float32)  # many ties
    d[::3] = rng.random((14, 50), dtype=np.float32)  # and rows without
    expected = np.argsort(d, axis=1)[:, :7]
    np.testing.assert_array_equal(rerank._nearest(torch.from_numpy(d), 7), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_features_path_equals_matrix_path(metric):
    qf, gf = features(12, nq=20, ng=60, ids=8, dim=16)
    expected = re_rank(*matrices(qf, gf, metric), k1=8, k2=3)
    np.testing.assert_allclose(re_rank_features(qf, gf, k1=8, k2=3, metric=metric), expected, atol=1e-5)
    np.testing.assert_allclose(
        re_rank_features(torch.from_numpy(qf), torch.from_numpy(gf), 8, 3, 0.3, metric), expected, atol=1e-5
    )


def test_bad_shapes_are_named():
    qg, qq, gg = matrices(*features(13))
    with pytest.raises(ValueError, match=r"q_q_dist \(4, 4\).*expected \(Q, G\), \(Q, Q\), \(G, G\)"):
        re_rank(qg, qq[:4, :4], gg)
    with pytest.raises(ValueError, match=r"g_g_dist \(12, 11\)"):
        re_rank(qg, qq, gg[:, :11])
    with pytest.raises(ValueError, match=r"q_g_dist \(60,\)"):
        re_rank(qg.ravel(), qq, gg)
    with pytest.raises(ValueError, match=r"query features \(5, 4\), gallery features \(12, 3\)"):
        re_rank_features(*features(13)[:1], features(13)[1][:, :3])


@pytest.mark.parametrize("kwargs", [{"k1": 0}, {"k2": 0}, {"k1": 2.5}, {"lambda_value": 1.5}, {"lambda_value": -0.1}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="k1|lambda_value"):
        re_rank(*matrices(*features(14)), **kwargs)


@pytest.mark.skipif(not reference.available("fastreid.rerank"), reason="no bench/.venv-ref (bash bench/ref_env.sh)")
@pytest.mark.parametrize("package", ["fastreid", "torchreid"])
def test_matches_published_re_ranking(package):
    # The published code itself, when the benchmark environment exists: confirms the conventions written above.
    published = reference.load(f"{package}.rerank").re_ranking
    for seed, k1, k2, lam, metric in CASES:
        qg, qq, gg = matrices(*features(seed, nq=15, ng=40, ids=6, dim=8), metric)
        np.testing.assert_allclose(re_rank(qg, qq, gg, k1, k2, lam), published(qg, qq, gg, k1, k2, lam), atol=1e-5)


def aqe_reference(query, gallery, k, alpha, times):
    """Alpha-QE one item at a time: the k most cosine-similar items (itself first), weighted by similarity^alpha."""
    feats = [np.asarray(x, dtype=np.float64) for x in np.concatenate([query, gallery])]
    for _ in range(times):
        unit = [x / np.linalg.norm(x) for x in feats]
        new = []
        for u in unit:
            sims = sorted(((float(u @ v), j) for j, v in enumerate(unit)), reverse=True)[:k]
            new.append(sum(s**alpha * feats[j] for s, j in sims) / len(sims))
        feats = new
    unit = np.array([x / np.linalg.norm(x) for x in feats])
    return unit[: len(query)], unit[len(query) :]


def test_aqe_hand_worked():
    # q = (1, 0); gallery (0.6, 0.8), (0, 1), (-1, 0). With k = 2 the query keeps itself (cos 1) and (0.6, 0.8)
    # (cos 0.6): x' ~ 1 * (1, 0) + 0.6^3 * (0.6, 0.8) = (1.1296, 0.1728). (0, 1) keeps itself and (0.6, 0.8) (cos 0.8):
    # x' ~ (0, 1) + 0.8^3 * (0.6, 0.8) = (0.3072, 1.4096).
    q = np.array([[1.0, 0.0]])
    g = np.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    new_q, new_g = average_query_expansion(q, g, k=2, alpha=3.0)
    np.testing.assert_allclose(new_q[0], np.array([1.1296, 0.1728]) / np.hypot(1.1296, 0.1728), atol=1e-6)
    np.testing.assert_allclose(new_g[1], np.array([0.3072, 1.4096]) / np.hypot(0.3072, 1.4096), atol=1e-6)
    assert new_q.dtype == np.float32 and new_g.shape == (3, 2)


@pytest.mark.parametrize("k,alpha,times", [(3, 3.0, 1), (5, 1.0, 2), (50, 3.0, 1)])
def test_aqe_matches_loop_reference(k, alpha, times):
    rng = np.random.default_rng(k)
    q, g = rng.random((6, 8)).astype(np.float32), rng.random((15, 8)).astype(np.float32)  # positive: no odd powers
    expected = aqe_reference(q, g, k, alpha, times)
    for got, want in zip(average_query_expansion(q, g, k=k, alpha=alpha, times=times), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.skipif(not reference.available("fastreid.query_expansion"), reason="no bench/.venv-ref")
def test_aqe_matches_fastreid_up_to_normalisation():
    aqe = reference.load("fastreid.query_expansion").aqe
    rng = np.random.default_rng(3)
    q, g = rng.random((10, 16)).astype(np.float32), rng.random((30, 16)).astype(np.float32)
    fq, fg = aqe(torch.from_numpy(q), torch.from_numpy(g), 2, 5, 3.0)
    ours = average_query_expansion(q, g, k=5, alpha=3.0, times=2)
    for got, want in zip(ours, (fq, fg)):
        np.testing.assert_allclose(got, torch.nn.functional.normalize(want.float(), dim=1).numpy(), atol=1e-5)


def test_aqe_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"query features \(2, 3\), gallery features \(4, 5\)"):
        average_query_expansion(np.ones((2, 3)), np.ones((4, 5)))
