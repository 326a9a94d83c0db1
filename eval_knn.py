"""Weighted kNN accuracy of a backbone's features (DINO's eval_knn protocol) on a labeled query/gallery set.

    python eval_knn.py --checkpoint output/dino/teacher_backbone.pth [--config cfg_dino.yaml] [--k 10 20 100 200]
        [--temperature 0.07] [--json out.json] data.eval_set.name=market1501 data.eval_set.root=/data/market

Each query is classified by its gallery neighbours (cosine similarity, votes weighted by exp(sim / T); distractors
are no class); top-1 and top-5 accuracy are reported for every k from one nearest-neighbour search (faiss).
The backbone is built from `model.*` of the config; the checkpoint may be any backbone weights or a stage-2 model.
With `--cache-dir DIR` the features are kept there and reused while model, images and preprocessing are unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.cli import load_config
from dino_recog.data.build import query_gallery
from dino_recog.evaluation import knn_votes
from dino_recog.feature_cache import cached_features

log = logging.getLogger("dino_recog.eval_knn")


def main(
    cfg: C.DinoConfig,
    checkpoint: str,
    ks: list[int],
    temperature: float,
    json_path: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    if cfg.data.eval_set is None:
        raise SystemExit("data.eval_set is not set; name a labeled set, e.g. data.eval_set.name=market1501 "
                         "data.eval_set.root=/data/Market-1501-v15.09.15")  # fmt: skip
    with dist.session(cfg.run.device) as device:
        dist.setup_logging()
        m, crops = cfg.model, cfg.crops
        backbone = dict(
            name=m.arch,
            img_size=tuple(crops.global_crops_size),
            patch_size=m.patch_size,
            depth=m.depth or None,
            embed_dim=m.embed_dim or None,
            num_heads=m.num_heads or None,
        )
        model = ckpt.load_feature_model(checkpoint, backbone).to(device)
        _, query, gallery = query_gallery(cfg.data.eval_set, crops.global_crops_size, crops.mean, crops.std)
        kw = dict(arch=backbone, num_workers=cfg.data.num_workers)
        qf, q_pids, _ = cached_features(model, query, device, cache_dir, **kw)
        gf, g_pids, _ = cached_features(model, gallery, device, cache_dir, **kw)
        bank = g_pids > 0
        votes = knn_votes(gf[bank], g_pids[bank], qf, tuple(ks), temperature)
        results = {"checkpoint": str(checkpoint), "data": cfg.data.eval_set.name, "temperature": temperature}
        for k, v in votes.items():
            top5 = np.argsort(-v, axis=1, kind="stable")[:, :5]
            results[f"k{k}_top1"] = float((top5[:, 0] == q_pids).mean())
            results[f"k{k}_top5"] = float((top5 == q_pids[:, None]).any(1).mean())
        if dist.is_main_process():
            print(f"weighted kNN (T={temperature}) on {cfg.data.eval_set.name}, {checkpoint}")
            for k in votes:
                print(f"  k={k:<4} top-1 {100 * results[f'k{k}_top1']:6.2f}  top-5 {100 * results[f'k{k}_top5']:6.2f}")
            if json_path:
                Path(json_path).write_text(json.dumps(results, indent=2))
        return results


def _flags(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="backbone weights (stage 1, DINO, timm) or a stage-2 model")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours (DINO: 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (DINO: 0.07)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--cache-dir", help="keep query/gallery features here and reuse them while nothing changed")


if __name__ == "__main__":
    cfg, args = load_config(C.DinoConfig, "cfg_dino.yaml", __doc__.split("\n")[0], add_arguments=_flags)
    main(cfg, args.checkpoint, args.k, args.temperature, args.json, args.cache_dir)
