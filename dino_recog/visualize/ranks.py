"""Ranked lists: each query beside its nearest gallery images, true matches green, wrong ones red, worst query first.

The order and the filtering are those of `evaluation.evaluate_rank`: gallery sorted by distance (ties by gallery
index), junk (pid -1) removed, gallery entries of the query's identity *and* camera excluded from the ranking. The
excluded ones are still drawn where they fall, with a blue border and no rank, because seeing them explains many
"wrong" rank-1 results that are not wrong at all. Every tile names its identity and camera, and a legend on top says
what the colours mean.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .. import distributed as dist
from ..data.datasets import ImageDataset, read_image
from ..evaluation import extract_features, pairwise_distance
from ._draw import GAP, grid, labelled, legend, save_png

__all__ = [
    "GREEN",
    "RED",
    "BLUE",
    "QUERY",
    "BORDER",
    "LEGEND",
    "rank_lists",
    "worst_first",
    "select",
    "person",
    "tile_labels",
    "draw_ranks",
    "write_rank_lists",
    "save_rank_lists",
]

GREEN = (0, 170, 60)  # a true match, counted
RED = (220, 30, 30)  # another identity (or a distractor)
BLUE = (40, 110, 230)  # same identity, same camera: excluded by the protocol, not counted
QUERY = (90, 90, 90)
BORDER = 4
ORDERS = ("worst", "even", "best")
STATUS_COLORS = {"match": GREEN, "wrong": RED, "same_camera": BLUE}
LEGEND = (
    (QUERY, "query (identity, camera, AP)"),
    (GREEN, "true match"),
    (RED, "wrong identity or distractor"),
    (BLUE, "same identity and camera: excluded by the protocol, no rank"),
)

Records = Sequence[tuple[str, int, int]]  # (path, pid, camid) per image, as `ImageDataset.items`


def rank_lists(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    topk: int = 10,
) -> list[dict]:
    """The top of each query's ranked gallery, with the per-query AP of the re-identification protocol.

    Args:
        distmat: (Q, G) distances, smaller is closer.
        q_pids, q_camids, g_pids, g_camids: identities and cameras.
        topk: ranked (counted) entries to keep per query; excluded same-camera matches among them come on top.

    Returns:
        Per query, in query order: {"query": index, "ap": AP or None (no true match left), "first_match": protocol
        rank of the first true match or None, "num_matches": true matches left, "entries": [{"gallery": index,
        "distance", "rank": protocol rank or None, "status": "match" | "wrong" | "same_camera"}]}.
    """
    dist32 = np.asarray(distmat, dtype=np.float32)
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    out = []
    for i in range(dist32.shape[0]):
        order = np.argsort(dist32[i], kind="stable")  # ties keep gallery order, as evaluate_rank's (distance, index)
        order = order[g_pids[order] != -1]
        same = g_pids[order] == q_pids[i]
        excluded = same & (g_camids[order] == q_camids[i])
        kept = ~excluded
        match_ranks = np.flatnonzero(same[kept]) + 1  # 1-based ranks among the kept entries
        ap = float((np.arange(1, len(match_ranks) + 1) / match_ranks).mean()) if len(match_ranks) else None
        ranks = np.cumsum(kept)
        stop = np.searchsorted(ranks, topk, side="left") + 1  # through the topk-th kept entry
        entries = [
            {"gallery": int(j), "distance": float(dist32[i, j]), "rank": int(r) if k else None,
             "status": "same_camera" if e else ("match" if s else "wrong")}
            for j, r, k, e, s in zip(order[:stop], ranks[:stop], kept[:stop], excluded[:stop], same[:stop])
        ]  # fmt: skip
        out.append({"query": i, "ap": ap, "first_match": int(match_ranks[0]) if len(match_ranks) else None,
                    "num_matches": len(match_ranks), "entries": entries})  # fmt: skip
    return out


def worst_first(lists: list[dict]) -> list[dict]:
    """Queries by AP ascending (then the later first true match first, then query index); those without a true
    match (skipped by the protocol) last."""
    valid = sorted((q for q in lists if q["ap"] is not None), key=lambda q: (q["ap"], -q["first_match"], q["query"]))
    return valid + [q for q in lists if q["ap"] is None]


def select(ordered: list[dict], n: int, order: str = "worst") -> list[dict]:
    """`n` queries of a worst-first list: the worst, the best, or spread evenly from worst to best."""
    valid = [q for q in ordered if q["ap"] is not None]
    if order == "worst":
        return valid[:n]
    if order == "best":
        return valid[::-1][:n]
    if order == "even":
        if n >= len(valid):
            return valid
        return [valid[i] for i in np.linspace(0, len(valid) - 1, n).round().astype(int)]
    raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")


def person(pid: int, camid: int, distractor_pid: int | None = None) -> str:
    """An image's identity and camera as Market-1501 file names give them ("id 2 c1": cameras count from 1), or
    "distractor c1" for the distractor label."""
    who = "distractor" if distractor_pid is not None and pid == distractor_pid else f"id {pid}"
    return f"{who} c{camid + 1}"


def tile_labels(q: dict, query: Records, gallery: Records, distractor_pid: int | None = None) -> list[list[str]]:
    """The text lines above each tile of one query's row: the query's (identity and camera, AP), then each ranked
    entry's (identity and camera, protocol rank and distance, or "excl" and the distance of an excluded one).

    Args:
        q: one query of `rank_lists`.
        query, gallery: (path, pid, camid) by query / gallery index.
        distractor_pid: the label of distractors (0 in the Market-1501 layout), None where a set has none.
    """
    _, pid, camid = query[q["query"]]
    tiles = [[person(pid, camid, distractor_pid), f"AP {q['ap']:.2f}" if q["ap"] is not None else "no match"]]
    for e in q["entries"]:
        _, pid, camid = gallery[e["gallery"]]
        where = f"{e['rank']}: {e['distance']:.2f}" if e["rank"] is not None else f"excl {e['distance']:.2f}"
        tiles.append([person(pid, camid, distractor_pid), where])
    return tiles


def _thumb(path: str, size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    img = read_image(path).resize((size[1], size[0]), Image.BICUBIC)
    framed = Image.new("RGB", (size[1] + 2 * BORDER, size[0] + 2 * BORDER), color)
    framed.paste(img, (BORDER, BORDER))
    return framed


def draw_ranks(
    lists: Sequence[dict],
    query: Records,
    gallery: Records,
    size: tuple[int, int] = (128, 64),
    distractor_pid: int | None = None,
) -> tuple[Image.Image, list[list[tuple | None]]]:
    """The colour legend on top, then one row per query: the query (grey border), a gap, then its ranked entries
    with green (true match), red (wrong) or blue (same camera, excluded) borders, each under its `tile_labels`.

    Args:
        lists: entries of `rank_lists`, in the order to draw.
        query, gallery: (path, pid, camid) by query / gallery index.
        size: (height, width) of each image, without border.
        distractor_pid: the label of distractors, named so on their tiles; None where a set has none.

    Returns:
        The picture and the boxes of its panels per query row (query, None for the gap, then the entries).
    """
    rows = []
    for q in lists:
        labels = tile_labels(q, query, gallery, distractor_pid)
        row = [labelled(_thumb(query[q["query"]][0], size, QUERY), labels[0]), None]
        for e, text in zip(q["entries"], labels[1:]):
            row.append(labelled(_thumb(gallery[e["gallery"]][0], size, STATUS_COLORS[e["status"]]), text))
        rows.append(row)
    # the legend wraps at the rows' width (as `grid` lays them out), so it never widens the picture if it can help it
    width = max((sum(p.width for p in row if p is not None) + GAP * (len(row) - 1) for row in rows), default=1)
    picture, boxes = grid([[legend(LEGEND, width)], *rows])
    return picture, boxes[1:]


def _records(dataset: ImageDataset | Records) -> list[tuple[str, int, int]]:
    items = dataset.items if isinstance(dataset, ImageDataset) else dataset
    return [(os.fspath(p), int(pid), int(cam)) for p, pid, cam in items]


def write_rank_lists(
    qf: torch.Tensor | np.ndarray,
    gf: torch.Tensor | np.ndarray,
    query: ImageDataset | Records,
    gallery: ImageDataset | Records,
    out_dir: str | os.PathLike,
    metric: str = "cosine",
    flip: bool = False,
    num_queries: int = 20,
    order: str = "worst",
    topk: int = 10,
    size: tuple[int, int] = (128, 64),
    distractor_pid: int | None = None,
) -> dict[str, Path]:
    """Rank the gallery for every query from features already extracted; write OUT/ranks.png and OUT/ranks.json.

    ranks.json lists all queries worst first, each with its ranked gallery files (the top `topk` counted ones and the
    excluded same-camera matches among them); ranks.png draws `num_queries` of them chosen by `order`.

    Args:
        qf, gf: (Q, D) and (G, D) features in query / gallery order.
        query, gallery: the images (an `ImageDataset` or its (path, pid, camid) items) the features belong to.
        flip: whether the features average the mirrored images (recorded in ranks.json).
        distractor_pid: the label of distractors (`ReIDData.distractor_pid`), named so on their tiles.

    Returns:
        {"png": path, "json": path}.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
    qrec, grec = _records(query), _records(gallery)
    if (len(qf), len(gf)) != (len(qrec), len(grec)):
        raise ValueError(f"{len(qf)} query and {len(gf)} gallery features for {len(qrec)} query and {len(grec)} "
                         "gallery images; expected one feature per image")  # fmt: skip
    qf = qf.numpy() if isinstance(qf, torch.Tensor) else np.asarray(qf)
    gf = gf.numpy() if isinstance(gf, torch.Tensor) else np.asarray(gf)
    q_pids, q_cams = np.array([r[1] for r in qrec]), np.array([r[2] for r in qrec])
    g_pids, g_cams = np.array([r[1] for r in grec]), np.array([r[2] for r in grec])
    lists = worst_first(rank_lists(pairwise_distance(qf, gf, metric), q_pids, g_pids, q_cams, g_cams, topk))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    valid = [q["ap"] for q in lists if q["ap"] is not None]
    report = {
        "metric": metric,
        "flip": flip,
        "topk": topk,
        "mAP": float(np.mean(valid)) if valid else None,
        "queries": [
            {"query": qrec[q["query"]][0], "pid": qrec[q["query"]][1], "camid": qrec[q["query"]][2], "ap": q["ap"],
             "first_match": q["first_match"], "num_matches": q["num_matches"],
             "ranked": [{"path": grec[e["gallery"]][0], "pid": grec[e["gallery"]][1], "camid": grec[e["gallery"]][2],
                         "distance": e["distance"], "rank": e["rank"], "status": e["status"]} for e in q["entries"]]}
            for q in lists
        ],
    }  # fmt: skip
    (out / "ranks.json").write_text(json.dumps(report, indent=1))
    picture, _ = draw_ranks(select(lists, num_queries, order), qrec, grec, size, distractor_pid)
    save_png(picture, out / "ranks.png")
    return {"png": out / "ranks.png", "json": out / "ranks.json"}


def save_rank_lists(
    model: nn.Module,
    query: ImageDataset,
    gallery: ImageDataset,
    device: torch.device,
    out_dir: str | os.PathLike,
    metric: str = "cosine",
    flip: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    num_queries: int = 20,
    order: str = "worst",
    topk: int = 10,
    size: tuple[int, int] = (128, 64),
    distractor_pid: int | None = None,
) -> dict[str, Path] | None:
    """Extract the query and gallery features once each, then `write_rank_lists`. A caller that already has the
    features (eval_reid.py) calls `write_rank_lists` with them instead.

    Every rank must call this under torchrun (features are extracted in shards); only rank 0 writes.

    Returns:
        {"png": path, "json": path} on rank 0, None elsewhere.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
    qf, _, _ = extract_features(model, query, device, batch_size, num_workers, flip)
    gf, _, _ = extract_features(model, gallery, device, batch_size, num_workers, flip)
    if not dist.is_main_process():
        return None
    return write_rank_lists(qf, gf, query, gallery, out_dir, metric, flip, num_queries, order, topk, size,
                            distractor_pid)  # fmt: skip
