"""Re-identification evaluation: rank-1/5/10, mAP, mINP of a checkpoint on the configured query/gallery.

    python eval_reid.py --checkpoint output/recog/model.pth [--config FILE] [--rerank] [--aqe] \
        [--json out.json] [--save-ranks DIR] [--cache-dir DIR] [key=value ...]
    bash train.sh 0,1 2 eval_reid.py --checkpoint output/recog/best.pth data.test.name=msmt17 data.test.root=/d/msmt

The checkpoint may be a stage-2 model (model.pth, best.pth, checkpoint_NNNN.pth: its BN-neck embedding) or backbone
weights (stage-1 teacher_backbone.pth or checkpoint, official DINO, timm: the backbone's global feature). A file with
a BackboneSpec (all that dino_recog writes) brings its architecture, input size and normalisation; other weights are
built from `model.*` and `aug.*` of the config. The test set, distance (`eval.metric`) and flip averaging
(`eval.flip`) come from the config (without `--config`: the run's config.yaml beside the checkpoint when there is one,
else cfg_recog.yaml), as do k-reciprocal re-ranking (`--rerank` = `eval.rerank=true`, with
`eval.rerank_k1/k2/lambda`), query expansion (`--aqe` = `eval.aqe=true`) and the faiss top-k ranking for huge
galleries (`eval.topk=K`). A stage-2 model is tested with the embedding it was trained for (`model.test_feature`,
saved in it: the BN-neck output or the feature before it); `--test-feature` overrides it.
With `--cache-dir DIR` the query and gallery features are kept there and reused while the model, images and
preprocessing stay the same (see dino_recog/feature_cache.py).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.cli import eval_options, load_config, recog_eval_model
from dino_recog.evaluation import query_gallery_metrics
from dino_recog.feature_cache import cached_features
from dino_recog.models.heads import TEST_FEATURES
from dino_recog.models.reid import set_test_feature
from dino_recog.protocol_card import card_line, protocol_card
from dino_recog.user_errors import check_output_paths, user_errors

log = logging.getLogger("dino_recog.eval_reid")


def main(
    cfg: C.RecogConfig,
    checkpoint: str,
    json_path: str | None = None,
    save_ranks: str | None = None,
    cache_dir: str | None = None,
    allow_missing: bool = False,
    test_feature: str | None = None,
) -> dict[str, float]:
    with dist.session(cfg.run.device) as device:
        dist.setup_logging()
        model, backbone, data, query, gallery = recog_eval_model(cfg, checkpoint, device, allow_missing)
        if test_feature is not None:  # else the one saved in the model
            set_test_feature(model, test_feature, checkpoint)
        kw = dict(arch=backbone, flip=cfg.eval.flip, batch_size=cfg.data.test_batch_size,
                  num_workers=cfg.data.num_workers)  # fmt: skip
        qf, q_pids, q_cams = cached_features(model, query, device, cache_dir, **kw)
        gf, g_pids, g_cams = cached_features(model, gallery, device, cache_dir, **kw)
        e = cfg.eval
        results = query_gallery_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, e.metric, **eval_options(e))
        options = {"rerank": [e.rerank_k1, e.rerank_k2, e.rerank_lambda] if e.rerank else None,
                   "aqe": [e.aqe_k, e.aqe_alpha] if e.aqe else None}  # fmt: skip
        # a stage-2 model states its test feature; backbone weights give their global feature
        what = f"backbone {backbone['feature'] or 'global'}"
        card = protocol_card(cfg, getattr(model, "spec", None) or backbone, feature=what)
        results = {"checkpoint": str(checkpoint), "data": cfg.data.test.name, **data.info, "metric": cfg.eval.metric,
                   "flip": cfg.eval.flip, **options, **results, "protocol": card}  # fmt: skip
        if dist.is_main_process():
            rows = [f"{k:>8}: {100 * results[k]:6.2f}" for k in ("rank1", "rank5", "rank10", "mAP", "mINP")]
            print(f"{cfg.data.test.name} ({len(data.query)} queries, {len(data.gallery)} gallery), {checkpoint}")
            print("\n".join(rows))
            print(f"protocol: {card_line(card)}")
            if results["num_skipped"]:
                print(f"   ({results['num_skipped']} queries without a true match were skipped)")
            if json_path:
                Path(json_path).write_text(json.dumps(results, indent=2))
        if save_ranks and dist.is_main_process():  # from the features above: every rank already has all of them
            from dino_recog.visualize import write_rank_lists

            write_rank_lists(qf, gf, query, gallery, save_ranks, cfg.eval.metric, cfg.eval.flip,
                             distractor_pid=data.distractor_pid)  # fmt: skip
        return results


def _flags(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="stage-2 model or backbone weights")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--save-ranks", metavar="DIR", help="also draw the worst queries' ranked lists (ranks.png, .json)"
    )
    parser.add_argument("--cache-dir", help="keep query/gallery features here and reuse them while nothing changed")
    parser.add_argument("--test-feature", choices=TEST_FEATURES,
                        help="a stage-2 model's embedding: after_neck | before_neck (default: the one saved in it)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate backbone weights that lack some of the model's tensors (left random)")


# Flags for config keys, applied as overrides so that the config is validated once with them (`--rerank eval.topk=5`
# is refused like `eval.rerank=true eval.topk=5`).
ALIASES = {"--rerank": "eval.rerank=true", "--aqe": "eval.aqe=true"}


def parse_args(argv: list[str] | None = None) -> tuple[C.RecogConfig, argparse.Namespace]:
    """The validated config and the script's flags; a config error exits with its message."""
    return load_config(C.RecogConfig, "cfg_recog.yaml", __doc__.split("\n")[0], argv, _flags, ALIASES, True)


if __name__ == "__main__":
    cfg, args = parse_args()
    with user_errors():
        check_output_paths({"--json": args.json}, {"--save-ranks": args.save_ranks, "--cache-dir": args.cache_dir})
        main(cfg, args.checkpoint, args.json, save_ranks=args.save_ranks, cache_dir=args.cache_dir,
             allow_missing=args.allow_missing, test_feature=args.test_feature)
