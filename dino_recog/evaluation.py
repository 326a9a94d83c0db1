"""Evaluation: feature extraction, weighted kNN, the re-identification protocol (CMC, mAP, mINP)."""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import distributed as dist

__all__ = [
    "evaluate_rank",
    "pairwise_distance",
    "extract_features",
    "knn_classify",
    "knn_votes",
    "evaluate_query_gallery",
]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """L2-normalised features of every image of `dataset`, in dataset order.

    Under torchrun each rank extracts a contiguous shard and the shards are gathered (shards may differ in length),
    so every rank returns the full result. The dataset yields (image, pid, camid, index) as `ImageDataset` does.

    Args:
        model: maps (B, 3, H, W) to (B, D); put in eval mode here and restored afterwards.
        flip: average with the features of the horizontally mirrored images.

    Returns:
        (N, D) float32 CPU features, (N,) pids, (N,) camids.
    """
    n, rank, world = len(dataset), dist.get_rank(), dist.get_world_size()
    shard = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for img, pid, camid, _ in tqdm(loader, desc="features", disable=not dist.is_main_process(), leave=False):
        img = img.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = model(img).float()
            if flip:
                f = f + model(torch.flip(img, dims=[3])).float()
        feats.append(F.normalize(f, dim=1))
        pids.append(pid)
        camids.append(camid)
    model.train(was_training)
    d = feats[0].shape[1] if feats else 0
    local = torch.cat(feats) if feats else torch.zeros(0, d, device=device)
    meta = (
        torch.stack([torch.cat(pids), torch.cat(camids)], 1).to(device)
        if pids
        else torch.zeros(0, 2, device=device, dtype=torch.long)
    )
    features = torch.cat(dist.all_gather_variable(local)).cpu()
    meta = torch.cat(dist.all_gather_variable(meta)).cpu().numpy()
    return features, meta[:, 0], meta[:, 1]


def knn_votes(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    test_features: np.ndarray | torch.Tensor,
    ks: tuple[int, ...] = (20,),
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, np.ndarray]:
    """Class votes of the weighted k-nearest-neighbour classifier of DINO's `eval_knn.py` (Wu et al. 2018).

    Neighbours by cosine similarity (features are L2-normalised here) from one faiss search for the largest k; each of
    the k nearest training samples votes for its label with weight exp(sim / temperature).

    Returns:
        {k: (N_test, num_classes) summed vote weights} for every k in `ks`.
    """
    train = F.normalize(torch.as_tensor(train_features).float(), dim=1).numpy()
    test = F.normalize(torch.as_tensor(test_features).float(), dim=1).numpy()
    labels = np.asarray(train_labels)
    k_max = min(max(ks), len(train))
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train))
    sims, nn_idx = index.search(np.ascontiguousarray(test), k_max)  # (N, k_max), nearest first
    classes = num_classes or int(labels.max()) + 1
    weights, neighbour_labels = np.exp(sims / temperature), labels[nn_idx]
    rows = np.arange(len(test))[:, None]
    out = {}
    for k in ks:
        k = min(k, k_max)
        votes = np.zeros((len(test), classes), dtype=np.float64)
        np.add.at(votes, (np.broadcast_to(rows, (len(test), k)), neighbour_labels[:, :k]), weights[:, :k])
        out[k] = votes
    return out


def knn_classify(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    test_features: np.ndarray | torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted kNN classification (see `knn_votes`): the class with the largest vote. Returns (N_test,) labels."""
    votes = knn_votes(train_features, train_labels, test_features, (k,), temperature, num_classes)
    return next(iter(votes.values())).argmax(1)


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


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    chunk_size: int | None = None,
) -> dict:
    """The Market-1501 / MSMT17 protocol as fast-reid and torchreid compute it.

    For each query the gallery is ordered by distance (ties keep gallery order); entries with the query's identity
    *and* camera are removed, junk (pid -1) is removed, distractors (pid 0) stay as negatives. A query with no true
    match left is skipped and counted. With the filtered ranks r_1 < ... < r_|G| of the |G| true matches:

        CMC@k = fraction of valid queries with r_1 <= k
        AP    = (1/|G|) * sum_j j / r_j               (non-interpolated; the official Market MATLAB code
                                                       interpolates precision and differs slightly)
        INP   = |G| / r_|G|                            (Ye et al. 2021, "Deep Learning for Person Re-identification")

    No sort: the rank of a true match is 1 + the number of kept gallery entries before it, counted by comparing
    (distance, index) keys, which costs |G| x gallery per query instead of a gallery-sized argsort. Distances are
    compared in float32 (what fast-reid and torchreid produce). Queries are processed in chunks, so peak memory is
    bounded whatever the gallery size.

    Args:
        distmat: (Q, G) distances, smaller is closer.
        q_pids, q_camids: (Q,) identities and cameras of the queries.
        g_pids, g_camids: (G,) identities and cameras of the gallery.
        max_rank: length of the CMC curve (shortened to the gallery size).
        chunk_size: queries per chunk; default keeps each chunk near 4 M matrix entries.

    Returns:
        {"cmc": (max_rank,) float array, "mAP": float, "mINP": float, "num_valid": int, "num_skipped": int}.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q or len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"distmat is {num_q}x{num_g} but got {len(q_pids)} query pids, {len(q_camids)} query camids, "
            f"{len(g_pids)} gallery pids and {len(g_camids)} gallery camids"
        )
    max_rank = min(max_rank, num_g)
    chunk = chunk_size or max(1, (1 << 22) // max(num_g, 1))
    never = np.iinfo(np.int64).max

    hits_at = np.zeros(max_rank, dtype=np.int64)  # valid queries whose first match is at rank k+1
    ap_sum = inp_sum = 0.0
    num_valid = 0
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        keys = _sortable_keys(distmat[start:stop])  # (c, G)
        same_pid = g_pids[None, :] == q_pids[start:stop, None]
        keep = ~(same_pid & (g_camids[None, :] == q_camids[start:stop, None])) & (g_pids[None, :] != -1)
        match = same_pid & keep
        kept_keys = np.where(keep, keys, never)
        for row in range(stop - start):
            match_keys = keys[row, match[row]]
            if match_keys.size == 0:
                continue
            ranks = np.sort((kept_keys[row][None, :] < match_keys[:, None]).sum(1)) + 1  # r_1 < ... < r_|G|
            num_valid += 1
            if ranks[0] <= max_rank:
                hits_at[ranks[0] - 1] += 1
            ap_sum += float((np.arange(1, len(ranks) + 1) / ranks).mean())
            inp_sum += len(ranks) / float(ranks[-1])

    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (after removing same-camera matches and junk)")
    return {
        "cmc": np.cumsum(hits_at) / num_valid,
        "mAP": ap_sum / num_valid,
        "mINP": inp_sum / num_valid,
        "num_valid": num_valid,
        "num_skipped": num_q - num_valid,
    }


def evaluate_query_gallery(
    model: nn.Module,
    query: Dataset,
    gallery: Dataset,
    device: torch.device,
    metric: str = "cosine",
    flip: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    knn: tuple[int, float] | None = None,
) -> dict[str, float]:
    """Extract query and gallery features with `model` and run the re-identification protocol.

    Args:
        knn: (k, temperature) to also report DINO's weighted-kNN top-1, each query classified by its gallery
            neighbours (distractors, pid 0, are no class).

    Returns:
        rank1, rank5, rank10, mAP, mINP (fractions), num_skipped queries, and knn_top1 when asked.
    """
    qf, q_pids, q_cams = extract_features(model, query, device, batch_size, num_workers, flip)
    gf, g_pids, g_cams = extract_features(model, gallery, device, batch_size, num_workers, flip)
    r = evaluate_rank(pairwise_distance(qf.numpy(), gf.numpy(), metric), q_pids, g_pids, q_cams, g_cams)
    cmc = r["cmc"]
    out = {f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}
    out.update(mAP=r["mAP"], mINP=r["mINP"], num_skipped=r["num_skipped"])
    if knn is not None:
        bank = g_pids > 0
        pred = knn_classify(gf[bank], g_pids[bank], qf, k=knn[0], temperature=knn[1])
        out["knn_top1"] = float((pred == q_pids).mean())
    return out
