"""Pictures of models and runs: ViT attention maps, ranked lists, training curves.

    python -m dino_recog.visualize attention --checkpoint PATH --images IMG... --out DIR [--threshold 0.6]
    python -m dino_recog.visualize ranks --checkpoint PATH [--config cfg_recog.yaml] [--num-queries N] --out DIR \
        [key=value ...]
    python -m dino_recog.visualize curves RUN_DIR... --out FILE.png

Everything is drawn off-screen (Pillow, matplotlib's Agg canvas); no display is needed.
"""

from __future__ import annotations

import argparse
import sys

from .. import config as C
from .. import distributed as dist
from .attention import AttentionError, cls_attention_maps, last_self_attention, save_attention_maps, threshold_mass
from .curves import plot_curves
from .ranks import ORDERS, rank_lists, save_rank_lists, worst_first, write_rank_lists

__all__ = [
    "AttentionError",
    "cls_attention_maps",
    "last_self_attention",
    "threshold_mass",
    "save_attention_maps",
    "rank_lists",
    "worst_first",
    "save_rank_lists",
    "write_rank_lists",
    "ranks_from_config",
    "plot_curves",
    "main",
]


def _attention(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dino_recog.visualize attention",
        description="Last-block CLS self-attention of a ViT, per head and mean, on images.",
    )
    p.add_argument("--checkpoint", required=True, help="stage-1 checkpoint or export, stage-2 model, DINO or timm ViT")
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--out", required=True, help="folder: one PNG per image and attention.png with all of them")
    p.add_argument("--threshold", type=float, metavar="FRACTION",
                   help="also draw a row masking the patches that hold this fraction of the attention mass "
                        "(DINO's figures use 0.6; default: no mask row)")  # fmt: skip
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the training size)")
    p.add_argument("--key", default="teacher", help="network of a student/teacher checkpoint (default: teacher)")
    p.add_argument("--num-heads", type=int, default=0, help="heads of the ViT, where the file cannot tell")
    p.add_argument("--scale", type=int, default=0, help="display magnification (default: panels >= 192 px high)")
    args = p.parse_args(argv)
    try:
        files = save_attention_maps(
            args.checkpoint, args.images, args.out, args.threshold, args.size, args.key, args.num_heads, args.scale
        )
    except (AttentionError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(files)} pictures to {args.out} (all images: {files[-1]})")


def ranks_from_config(
    cfg: C.RecogConfig, checkpoint: str, out: str, num_queries: int = 20, order: str = "worst", topk: int = 10
) -> None:
    """Rank lists of a checkpoint on the configured query/gallery, the model built as eval_reid.py builds it."""
    from ..cli import recog_eval_model

    with dist.session(cfg.run.device) as device:
        dist.setup_logging()
        model, _, data, query, gallery = recog_eval_model(cfg, checkpoint, device)
        files = save_rank_lists(
            model,
            query,
            gallery,
            device,
            out,
            cfg.eval.metric,
            cfg.eval.flip,
            cfg.data.test_batch_size,
            cfg.data.num_workers,
            num_queries,
            order,
            topk,
            distractor_pid=data.distractor_pid,
        )
        if files:
            print(f"wrote {files['png']} and {files['json']}")


def _ranks(argv: list[str]) -> None:
    from ..cli import load_config

    def flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="stage-2 model or backbone weights")
        p.add_argument("--out", required=True, help="folder for ranks.png and ranks.json")
        p.add_argument("--num-queries", type=int, default=20, help="queries drawn (default 20)")
        p.add_argument(
            "--order",
            choices=ORDERS,
            default="worst",
            help="which queries: the worst (default), the best, or spread evenly from worst to best",
        )
        p.add_argument("--topk", type=int, default=10, help="ranked gallery images per query (default 10)")

    cfg, args = load_config(
        C.RecogConfig, "cfg_recog.yaml", "Ranked gallery lists of a re-identification model.", argv, flags,
        config_beside_checkpoint=True,
    )
    ranks_from_config(cfg, args.checkpoint, args.out, args.num_queries, args.order, args.topk)


def _curves(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dino_recog.visualize curves",
        description="Loss, lr, kNN / rank-1 / mAP over epochs of one or several runs.",
    )
    p.add_argument("runs", nargs="+", help="run directories holding log.jsonl")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    try:
        print(f"wrote {plot_curves(args.runs, args.out, args.title)}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


COMMANDS = {"attention": _attention, "ranks": _ranks, "curves": _curves}


def main(argv: list[str] | None = None) -> None:
    """`python -m dino_recog.visualize COMMAND ...`; COMMAND -h for its options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])
