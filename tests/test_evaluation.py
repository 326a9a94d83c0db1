import numpy as np
import pytest
from conftest import train_sh

from dino_recog.evaluation import evaluate_features, evaluate_rank, pairwise_distance


def brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, cutoff=None):
    """The protocol written plainly, one query at a time; with a cutoff K only the first K filtered ranks count."""
    cmc_hits, aps, inps = np.zeros(max_rank), [], []
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda g: (distmat[i, g], g))
        ranked = [g for g in order if g_pids[g] != -1 and not (g_pids[g] == q_pids[i] and g_camids[g] == q_camids[i])]
        good = [r + 1 for r, g in enumerate(ranked) if g_pids[g] == q_pids[i]]
        if not good:
            continue
        if good[0] <= max_rank:
            cmc_hits[good[0] - 1 :] += 1
        reach = cutoff or len(ranked)
        aps.append(sum((j + 1) / r for j, r in enumerate(good) if r <= reach) / len(good))
        inps.append(len(good) / good[-1] if good[-1] <= reach else 0.0)
    n = len(aps)
    return cmc_hits / n, float(np.mean(aps)), float(np.mean(inps)), n


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties_junk_distractors(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 23, 61
    q_pids = rng.integers(1, 8, nq)
    g_pids = rng.integers(-1, 9, ng)  # includes junk (-1) and distractors (0)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    distmat = rng.integers(0, 6, (nq, ng)).astype(np.float32)  # many ties
    cmc, m_ap, m_inp, n = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, 10)
    for chunk in (None, 1, 7):
        out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=chunk)
        np.testing.assert_allclose(out["cmc"], cmc, atol=1e-12)
        assert out["mAP"] == pytest.approx(m_ap, abs=1e-12)
        assert out["mINP"] == pytest.approx(m_inp, abs=1e-12)
        assert out["num_valid"] == n and out["num_skipped"] == nq - n


@pytest.mark.parametrize("seed", range(3))
def test_cutoff_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 17, 40
    q_pids, g_pids = rng.integers(1, 6, nq), rng.integers(-1, 7, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    distmat = rng.integers(0, 6, (nq, ng)).astype(np.float32)
    for cutoff in (1, 4, 9):
        cmc, m_ap, m_inp, n = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, cutoff, cutoff)
        out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50, chunk_size=5, cutoff=cutoff)
        np.testing.assert_allclose(out["cmc"], cmc, atol=1e-12)
        assert out["mAP"] == pytest.approx(m_ap, abs=1e-12) and out["mINP"] == pytest.approx(m_inp, abs=1e-12)
        assert out["num_valid"] == n and out["cutoff"] == cutoff


def feature_problem(seed, nq=40, ng=150, dim=16):
    """Identities with several cameras, junk, distractors and same-camera true matches; continuous features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    g_pids = rng.integers(-1, 12, ng)
    q_pids = rng.integers(1, 12, nq)
    g_cams, q_cams = rng.integers(0, 4, ng), rng.integers(0, 4, nq)
    gf = centres[np.maximum(g_pids, 0)] + rng.normal(scale=1.2, size=(ng, dim))
    qf = centres[q_pids] + rng.normal(scale=1.2, size=(nq, dim))
    return qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_features_path_equals_dense_matrix_in_every_chunking(metric):
    qf, gf, qp, gp, qc, gc = feature_problem(0)
    ref = evaluate_rank(pairwise_distance(qf, gf, metric), qp, gp, qc, gc)
    assert 0.2 < ref["mAP"] < 0.9  # neither trivial nor hopeless
    for chunk in (None, 1, 13):
        out = evaluate_features(qf, gf, qp, gp, qc, gc, metric, chunk_size=chunk)
        np.testing.assert_array_equal(out["cmc"], ref["cmc"])
        assert (out["mAP"], out["mINP"], out["num_skipped"]) == (ref["mAP"], ref["mINP"], ref["num_skipped"])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [3, 20, 150])
def test_faiss_topk_path_equals_dense_up_to_the_cutoff(metric, k):
    qf, gf, qp, gp, qc, gc = feature_problem(1)
    dense = evaluate_rank(pairwise_distance(qf, gf, metric), qp, gp, qc, gc, max_rank=50, cutoff=k)
    topk = evaluate_features(qf, gf, qp, gp, qc, gc, metric, max_rank=50, topk=k)
    np.testing.assert_allclose(topk["cmc"], dense["cmc"], rtol=0, atol=1e-12)
    assert topk["mAP"] == pytest.approx(dense["mAP"], abs=1e-12)
    assert topk["mINP"] == pytest.approx(dense["mINP"], abs=1e-12)
    assert topk["num_valid"] == dense["num_valid"]
    if k >= len(gf):  # a cut-off beyond the gallery is the full protocol
        full = evaluate_rank(pairwise_distance(qf, gf, metric), qp, gp, qc, gc)
        assert topk["mAP"] == pytest.approx(full["mAP"], abs=1e-12)


def test_hand_worked_example():
    # One query (pid 1, cam 0). Gallery sorted by distance: [1/cam0 (removed), 2, 1/cam1, 0 (distractor), 1/cam2].
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([1, 2, 1, 0, 1])
    g_cams = np.array([0, 1, 1, 1, 2])
    out = evaluate_rank(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # Filtered list: 2, 1, 0, 1 -> true matches at ranks 2 and 4.
    np.testing.assert_allclose(out["cmc"], [0, 1, 1, 1])
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)
    # Top-3: only the match at rank 2 is retrieved; AP still divides by both true matches, the last one is missed.
    cut = evaluate_rank(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4, cutoff=3)
    np.testing.assert_allclose(cut["cmc"], [0, 1, 1])
    assert cut["mAP"] == pytest.approx((1 / 2) / 2) and cut["mINP"] == 0.0


def test_query_without_match_is_skipped_and_counted():
    distmat = np.array([[0.1, 0.2], [0.3, 0.1]])
    out = evaluate_rank(distmat, np.array([1, 5]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1]))
    assert out["num_skipped"] == 1 and out["mAP"] == 1.0


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="2 queries x 3 gallery entries but got 1 query pids"):
        evaluate_rank(np.zeros((2, 3)), [1], [1, 2, 3], [0, 0], [0, 0, 0])


def test_pairwise_distance_against_definitions():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 5)), rng.normal(size=(6, 5))
    eu = pairwise_distance(q, g, "euclidean")
    np.testing.assert_allclose(eu, ((q[:, None] - g[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    cos = pairwise_distance(q, g, "cosine")
    ref = 1 - (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None]
    np.testing.assert_allclose(cos, ref, atol=1e-5)
    with pytest.raises(ValueError, match="metric 'l1'"):
        pairwise_distance(q, g, "l1")


def test_knn_hand_worked_example():
    from dino_recog.evaluation import knn_classify, knn_votes

    # Training features on the unit circle at 0, 10, 90 and 180 degrees with labels 0, 1, 1, 2.
    ang = np.deg2rad([0.0, 10.0, 90.0, 180.0])
    train = np.stack([np.cos(ang), np.sin(ang)], 1)
    labels = np.array([0, 1, 1, 2])
    test = np.array([[1.0, 0.0]])  # at 0 degrees: similarities 1, cos 10, 0, -1
    votes = knn_votes(train, labels, test, ks=(1, 2, 3), temperature=0.5)
    np.testing.assert_allclose(votes[1], [[np.exp(2.0), 0, 0]])
    np.testing.assert_allclose(votes[2], [[np.exp(2.0), np.exp(np.cos(np.deg2rad(10)) / 0.5), 0]], rtol=1e-6)
    np.testing.assert_allclose(votes[3][0, 1], np.exp(np.cos(np.deg2rad(10)) / 0.5) + np.exp(0.0), rtol=1e-6)
    # k=3: label 1 gets e^{1.97} + e^0 > e^2 for label 0, so the majority of weight wins
    assert knn_classify(train, labels, test, k=1, temperature=0.5)[0] == 0
    assert knn_classify(train, labels, test, k=3, temperature=0.5)[0] == 1
    # unnormalised inputs give the same answer (cosine similarity)
    assert knn_classify(train * 3, labels, test * 0.1, k=3, temperature=0.5)[0] == 1


@pytest.mark.parametrize("seed", range(3))
def test_negative_distances_and_float_ties(seed):
    rng = np.random.default_rng(100 + seed)
    nq, ng = 17, 40
    q_pids, g_pids = rng.integers(1, 6, nq), rng.integers(-1, 7, ng)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    distmat = np.round(rng.normal(size=(nq, ng)), 1).astype(np.float32)  # negatives, -0.0 / 0.0 and ties
    distmat[0, :5] = [-0.0, 0.0, -0.0, 0.0, -1.5]
    cmc, m_ap, m_inp, n = brute_force(distmat, q_pids, g_pids, q_cams, g_cams, 10)
    out = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    np.testing.assert_allclose(out["cmc"], cmc, atol=1e-12)
    assert out["mAP"] == pytest.approx(m_ap, abs=1e-12) and out["mINP"] == pytest.approx(m_inp, abs=1e-12)


def test_signed_zeros_tie_by_gallery_order():
    # -0.0 == 0.0: the tie keeps gallery order, so the true match (index 1) is second.
    out = evaluate_rank(np.array([[0.0, -0.0]], dtype=np.float32), [1], [2, 1], [0], [1, 1])
    np.testing.assert_allclose(out["cmc"], [0.0, 1.0])


@pytest.mark.slow
def test_sharded_extraction_with_two_processes_equals_one_process(small_demo, tmp_path):
    import torch

    from dino_recog.data import datasets as ds
    from dino_recog.data.transforms import reid_test_transform
    from dino_recog.evaluation import extract_features
    from dino_recog.models import build_backbone

    market = small_demo / "market"
    r = train_sh("cpu", 2, "tests/scripts/extract_check.py", market, tmp_path / "f.pth")
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "f.pth", weights_only=True)
    torch.manual_seed(0)
    model = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    records = ds.load_market1501(market).query
    assert len(records) % 2 == 1  # an odd count: the two shards differ in length (the padded gather is exercised)
    data = ds.ImageDataset(records, reid_test_transform((32, 16), (0.5,) * 3, (0.5,) * 3), train=False)
    feats, pids, camids = extract_features(model, data, torch.device("cpu"), batch_size=7)
    torch.testing.assert_close(got["feats"], feats, rtol=1e-5, atol=1e-6)
    assert got["pids"].tolist() == [x.pid for x in records] == pids.tolist()
    assert got["camids"].tolist() == camids.tolist()
    # the form, extract_features(model, loader): the loader's dataset and batch size, the model's device
    from torch.utils.data import DataLoader

    by_loader, pids2, _ = extract_features(model, DataLoader(data, batch_size=5, shuffle=True))
    torch.testing.assert_close(by_loader, feats, rtol=1e-5, atol=1e-6)  # in dataset order, whatever the sampler
    assert pids2.tolist() == pids.tolist()
