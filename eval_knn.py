"""Weighted kNN accuracy of a backbone's features (DINO's eval_knn protocol) on a labeled query/gallery set.

    python eval_knn.py --checkpoint output/dino/teacher_backbone.pth [--config cfg_dino.yaml] [--k 10 20 100 200]
        [--temperature 0.07] [--json out.json] data.eval_set.name=market1501 data.eval_set.root=/data/market

Each query is classified by its gallery neighbours (cosine similarity, votes weighted by exp(sim / T); distractors
are no class); top-1 and top-5 accuracy are reported for every k from one nearest-neighbour search (faiss).
The checkpoint may be any backbone weights or a stage-2 model; one that carries its BackboneSpec (a stage-1 export or
checkpoint, a stage-2 model) brings its architecture, input size and normalisation, other weights (official DINO, timm)
are built from `model.*` and `crops.*` of the config. Without `--config`, the config is the run's config.yaml beside
the checkpoint when there is one (a stage-1 run's), else cfg_dino.yaml.
With `--cache-dir DIR` the features are kept there and reused while model, images and preprocessing are unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.cli import load_config
from dino_recog.data.build import query_gallery
from dino_recog.evaluation import knn_votes
from dino_recog.feature_cache import cached_features
from dino_recog.models.spec import BackboneSpec
from dino_recog.user_errors import check_output_paths, positive_float, positive_int, user_errors
from dino_recog.weights import open_feature_model

log = logging.getLogger("dino_recog.eval_knn")


def main(
    cfg: C.DinoConfig,
    checkpoint: str,
    ks: list[int],
    temperature: float,
    json_path: str | None = None,
    cache_dir: str | None = None,
    allow_missing: bool = False,
) -> dict:
    if cfg.data.eval_set is None:
        raise SystemExit("data.eval_set is not set; name a labeled set, e.g. data.eval_set.name=market1501 "
                         "data.eval_set.root=/data/Market-1501-v15.09.15")  # fmt: skip
    with dist.session(cfg.run.device) as device:
        dist.setup_logging()
        # A file with a BackboneSpec brings its architecture, input size and normalisation; others take the config's.
        # Weights that lack some of the model's tensors are refused unless --allow-missing (they would stay random).
        model, spec = open_feature_model(checkpoint, BackboneSpec.from_dino_config(cfg), allow_missing=allow_missing)
        model = model.to(device)
        _, query, gallery = query_gallery(cfg.data.eval_set, spec.img_size, spec.mean, spec.std)
        kw = dict(arch=spec.to_dict(), num_workers=cfg.data.num_workers)
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
    parser.add_argument(
        "--k", type=positive_int, nargs="+", default=[10, 20, 100, 200], help="neighbours (DINO: 10 20 100 200)"
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=0.07, help="vote weight exp(sim / T) (DINO: 0.07)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--cache-dir", help="keep query/gallery features here and reuse them while nothing changed")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate backbone weights that lack some of the model's tensors (left random)")


if __name__ == "__main__":
    cfg, args = load_config(
        C.DinoConfig, "cfg_dino.yaml", __doc__.split("\n")[0], add_arguments=_flags, config_beside_checkpoint=True
    )
    with user_errors():
        check_output_paths({"--json": args.json}, {"--cache-dir": args.cache_dir})
        main(cfg, args.checkpoint, args.k, args.temperature, args.json, args.cache_dir, args.allow_missing)
