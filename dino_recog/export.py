"""Export a stage-2 recognition model to ONNX.

    python -m dino_recog.export --checkpoint output/recog/model.pth --out model.onnx

The ONNX graph maps images (batch, 3, H, W), normalised as in training (`spec["mean"]`, `spec["std"]`), to the
embeddings (batch, D); the batch axis is dynamic, the image size the training size.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn as nn

from .atomic import atomic_write
from .checkpoint import load_reid_model
from .user_errors import check_output_paths, user_errors

__all__ = ["export_onnx", "main"]

log = logging.getLogger(__name__)


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: tuple[int, int], opset: int = 17) -> Path:
    """Write `model` (eval mode, embeddings out) as ONNX with a dynamic batch axis, atomically."""
    was_training = model.training
    model.eval()
    example = torch.zeros(2, 3, *img_size)

    def write(fh: BinaryIO) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for a fixed size
            torch.onnx.export(
                model, (example,), fh, input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
            )  # fmt: skip

    try:
        path = atomic_write(path, write, "ONNX model")
    finally:
        model.train(was_training)
    log.info("exported %s (input batch x 3 x %d x %d)", path, *img_size)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export a stage-2 model.pth to ONNX")
    parser.add_argument("--checkpoint", required=True, help="model.pth, best.pth or a stage-2 checkpoint")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    with user_errors():
        check_output_paths({"--out": args.out})
        model = load_reid_model(args.checkpoint)
        return export_onnx(model, args.out, tuple(model.spec["img_size"]), args.opset)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
