"""Evaluation: feature extraction, weighted kNN, query/gallery evaluation of a model.

The re-identification protocol itself (`evaluate_rank`, `evaluate_features`, `pairwise_distance`: CMC, mAP, mINP)
lives in `dino_recog.rank_protocol` and is re-exported here.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import distributed as dist
from .embedding import embed
from .rank_protocol import evaluate_features, evaluate_rank, pairwise_distance

__all__ = [
    "evaluate_rank",
    "evaluate_features",
    "pairwise_distance",
    "extract_features",
    "knn_classify",
    "knn_votes",
    "evaluate_query_gallery",
    "query_gallery_metrics",
]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset | DataLoader,
    device: torch.device | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """L2-normalised features of every image of `dataset`, in dataset order.

    Under torchrun each rank extracts a contiguous shard and the shards are gathered (shards may differ in length),
    so every rank returns the full result. The dataset yields (image, pid, camid, index) as `ImageDataset` does.

    Args:
        model: maps (B, 3, H, W) to (B, D); put in eval mode here and restored afterwards.
        dataset: the images, or a DataLoader over them (its dataset, batch size and workers are used; its sampler
            is not, since every rank extracts its own shard in order).
        device: where the model runs; None: the device of its parameters.
        flip: average with the features of the horizontally mirrored images.

    Returns:
        (N, D) float32 CPU features, (N,) pids, (N,) camids.
    """
    if isinstance(dataset, DataLoader):
        dataset, batch_size, num_workers = dataset.dataset, dataset.batch_size or batch_size, dataset.num_workers
    if device is None:
        device = next(model.parameters()).device
    n, rank, world = len(dataset), dist.get_rank(), dist.get_world_size()
    shard = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=dist.loader_workers(num_workers), shuffle=False)
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    for img, pid, camid, _ in tqdm(loader, desc="features", disable=not dist.is_main_process(), leave=False):
        feats.append(embed(model, img.to(device, non_blocking=True), flip))  # (B, D)
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


def query_gallery_metrics(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: str = "cosine",
    rerank: tuple[int, int, float] | None = None,
    aqe: tuple[int, float] | None = None,
    topk: int = 0,
    knn: tuple[int, float] | None = None,
) -> dict[str, float]:
    """Rank-1/5/10, mAP, mINP (fractions) of query features against gallery features, with the optional steps.

    Args:
        rerank: (k1, k2, lambda) of k-reciprocal re-ranking (`rerank.re_rank_features`), or None.
        aqe: (k, alpha) of alpha-weighted query expansion applied to queries and gallery first, or None.
        topk: > 0 ranks with a faiss top-k search (`evaluate_features`: mAP@k, mINP@k); 0 the full ranking.
        knn: (k, temperature) to also report DINO's weighted-kNN top-1, each query classified by its gallery
            neighbours (distractors, pid 0, are no class).

    Returns:
        rank1, rank5, rank10, mAP, mINP, num_skipped, (cutoff when topk), (knn_top1 when asked).
    """
    from .rerank import average_query_expansion, re_rank_features

    qf = qf.numpy() if isinstance(qf, torch.Tensor) else np.asarray(qf)
    gf = gf.numpy() if isinstance(gf, torch.Tensor) else np.asarray(gf)
    if aqe is not None:
        qf, gf = average_query_expansion(qf, gf, k=aqe[0], alpha=aqe[1])
    if rerank is not None:
        dist = re_rank_features(qf, gf, rerank[0], rerank[1], rerank[2], metric=metric)
        r = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, cutoff=topk or None)
    else:
        r = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric, topk=topk or None)
    cmc = r["cmc"]
    out = {f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}
    out.update(mAP=r["mAP"], mINP=r["mINP"], num_skipped=r["num_skipped"])
    if topk:
        out["cutoff"] = topk
    if knn is not None:
        bank = np.asarray(g_pids) > 0
        pred = knn_classify(gf[bank], np.asarray(g_pids)[bank], qf, k=knn[0], temperature=knn[1])
        out["knn_top1"] = float((pred == np.asarray(q_pids)).mean())
    return out


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
    **options,
) -> dict[str, float]:
    """Extract query and gallery features with `model` and run the re-identification protocol
    (`query_gallery_metrics`; `options` are its rerank / aqe / topk).

    Returns:
        rank1, rank5, rank10, mAP, mINP (fractions), num_skipped queries, and knn_top1 when asked.
    """
    qf, q_pids, q_cams = extract_features(model, query, device, batch_size, num_workers, flip)
    gf, g_pids, g_cams = extract_features(model, gallery, device, batch_size, num_workers, flip)
    return query_gallery_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, knn=knn, **options)
