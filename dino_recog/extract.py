"""Features for your own images: `FeatureExtractor` and the `python -m dino_recog.extract` command.

    python -m dino_recog.extract --checkpoint output/recog/model.pth --images photos/ --out feats.npy [--flip]
    python -m dino_recog.extract --checkpoint output/dino/teacher_backbone.pth --images photos/ --out feats.npy
    python -m dino_recog.extract --checkpoint dino_vits16.pth --images photos/ --out feats.npy \\
        --backbone name=vit_small img_size=[256,128] patch_size=16

Every file dino_recog writes carries its `BackboneSpec` (architecture, input size, normalisation); `--backbone` is
only needed for weights without one (official DINO, timm, exports written before the spec existed).

The command writes `feats.npy` ((N, D) float32, L2-normalised rows) and `feats.txt` (the image paths relative to
`--images`, one per line, in the same order; names that are not UTF-8 keep their bytes: read the list with
`errors="surrogateescape"`), atomically and together: a `feats.npy` is always that of the `feats.txt` beside it.
Every input goes through the evaluation transform (`reid_test_transform`: bicubic resize of the RGB image,
normalisation), so the features equal those of `evaluation.extract_features` for the same images.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from . import weights
from .atomic import atomic_write_together
from .config import IMAGENET_MEAN, IMAGENET_STD
from .data.datasets import IMAGE_EXTENSIONS, CorruptImageError
from .data.transforms import reid_test_transform
from .embedding import embed
from .image_inputs import ImageInput, as_items, to_pil
from .models.heads import TEST_FEATURES
from .models.reid import set_test_feature
from .models.spec import BackboneSpec
from .user_errors import finite_float, positive_float, positive_int

__all__ = ["DEFAULT_IMAGE_SIZE", "FeatureExtractor", "ImageInput", "list_images", "load_model", "main"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (256, 128)  # (height, width) of a backbone checkpoint that does not say otherwise
_ARCH_HELP = weights._ARCH_HELP


# ---------------------------------------------------------------------------------------------------------------------
# Models: any checkpoint, with the preprocessing it was trained with


def load_model(
    model_path: str | os.PathLike | nn.Module,
    backbone: BackboneSpec | Mapping[str, Any] | None = None,
    key: str = "teacher",
    allow_missing: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The feature model of any checkpoint and the preprocessing it was trained with.

    Args:
        model_path: a checkpoint (see `FeatureExtractor`) or a built model.
        backbone: for backbone weights, a BackboneSpec or `build_backbone` keyword arguments (`name`, `img_size`, ...;
            input 256x128 and ImageNet normalisation unless given); it replaces the file's own description. Ignored,
            with a warning, for a stage-2 model.
        key: which network of a student/teacher checkpoint.
        allow_missing: accept backbone weights that lack some of the model's tensors (left as initialised).

    Returns:
        (model, {"img_size": (H, W), "mean": ..., "std": ...}): the BackboneSpec's of a stage-2 model, a backbone
        export or a stage-1 training checkpoint (its config), else those of `backbone`.

    Raises:
        CheckpointError: an unreadable file, backbone weights without a spec and without `backbone`, or backbone
            weights that lack some of the model's tensors (unless `allow_missing`).
        ValueError: `backbone` with an unknown key or no name.
    """
    if isinstance(model_path, nn.Module):
        spec = getattr(model_path, "spec", None) or {}
        prep = {k: spec.get(k, d) for k, d in (("img_size", DEFAULT_IMAGE_SIZE), ("mean", IMAGENET_MEAN),
                                               ("std", IMAGENET_STD))}  # fmt: skip
        return model_path, prep
    if isinstance(backbone, Mapping):
        backbone = BackboneSpec.from_kwargs(backbone)
    if backbone is not None and weights._is_reid_model(weights.peek_checkpoint(model_path)):
        log.warning("%s is a stage-2 model and carries its architecture; backbone=%s is ignored", model_path,
                    backbone.to_dict())  # fmt: skip
        backbone = None
    model, spec = weights.open_feature_model(model_path, key=key, override=backbone, allow_missing=allow_missing)
    return model, {"img_size": spec.img_size, "mean": spec.mean, "std": spec.std}


class FeatureExtractor:
    """L2-normalised features of images, from any checkpoint, with the evaluation preprocessing.

    Example:
        >>> extractor = FeatureExtractor("output/recog/model.pth")
        >>> feats = extractor(["a.jpg", "b.jpg"])  # (2, D) float32, rows of unit length

    Accepted inputs, one or a list of (kinds may be mixed):
        - a file path (str or Path) or encoded image bytes;
        - a PIL image of any mode (converted to RGB as files are: alpha dropped, grayscale replicated);
        - a numpy array, channels last: (H, W) grayscale, (H, W, C) or a batch (B, H, W, C), C = 1, 3 or 4;
        - a torch tensor, channels first: (3, H, W) or (1, H, W), a batch (B, 3, H, W) or (B, 1, H, W), or (H, W).
    Arrays and tensors are RGB (convert OpenCV's BGR first) and either uint8 in 0-255 or floating in [0, 1]
    (unnormalised); floats are rounded to 8 bits so that every kind of input goes through the same resize as a file.

    Args:
        model_path: a stage-2 model (model.pth, best.pth, a stage-2 checkpoint: architecture and preprocessing from
            its `spec`), a backbone export (teacher_backbone.pth: from its `spec`), a stage-1 training checkpoint
            (from its config), other backbone weights (official DINO, timm, older exports: need `backbone`), or an
            already built `nn.Module` (moved to `device`, put in eval mode; preprocessing from its `spec` if any).
        device: "cpu", "cuda", a torch.device; None picks CUDA when available.
        batch_size: images per forward pass.
        flip: average with the features of the horizontally mirrored images (as `eval.flip`).
        image_size, mean, std: override the (height, width) and normalisation the checkpoint gives.
        backbone: for backbone weights, a `BackboneSpec` or `build_backbone` keyword arguments, e.g.
            `dict(name="vit_small", img_size=(256, 128), patch_size=16)`; img_size defaults to 256x128, mean and std
            to ImageNet's. It replaces the file's own description.
        key: which network of a student/teacher checkpoint to take.
        num_workers: threads that decode and resize the next batch while the model runs (0: in the caller's thread).
        allow_missing: accept backbone weights that lack some of the model's tensors (they stay as initialised,
            random); without it such weights are refused, listing the missing tensors.
        test_feature: a stage-2 model's embedding, "after_neck" or "before_neck" (the BN neck's input); default the
            one the model was trained to be tested with (its spec's `test_feature`).

    Raises:
        CheckpointError: an unreadable checkpoint, backbone weights without a spec and without `backbone`, or
            weights that lack some of the model's tensors.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | nn.Module,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 64,
        flip: bool = False,
        image_size: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        backbone: BackboneSpec | Mapping[str, Any] | None = None,
        key: str = "teacher",
        num_workers: int = 0,
        allow_missing: bool = False,
        test_feature: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        model, prep = load_model(model_path, backbone, key, allow_missing)
        if test_feature is not None:
            set_test_feature(model, test_feature, str(model_path))
        self.model = model.to(self.device).eval()
        self.image_size = tuple(int(s) for s in (image_size if image_size is not None else prep["img_size"]))
        self.mean = tuple(float(v) for v in (mean if mean is not None else prep["mean"]))
        self.std = tuple(float(v) for v in (std if std is not None else prep["std"]))
        if len(self.mean) != 3 or not all(math.isfinite(v) for v in self.mean):
            raise ValueError(f"mean {list(self.mean)}: expected 3 finite values (RGB)")
        if len(self.std) != 3 or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"std {list(self.std)}: expected 3 finite values > 0 (RGB)")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size {list(self.image_size)}: expected (height, width) in pixels")
        self.transform = reid_test_transform(self.image_size, self.mean, self.std)
        self.batch_size, self.flip, self.num_workers = batch_size, flip, num_workers
        try:  # one forward now: the feature size, and a wrong image size fails here, not later
            with torch.no_grad():
                self.dim = int(self.model(torch.zeros(1, 3, *self.image_size, device=self.device)).shape[1])
        except (AssertionError, RuntimeError) as e:  # timm asserts on the patch grid, a conv on a too-small input
            trained = list(prep["img_size"])
            raise ValueError(f"image_size {list(self.image_size)}: the model cannot take it ({str(e).strip()[:160]}); "
                             f"it was trained at {trained}: use that, or sides that are multiples of its patch "
                             "size") from None  # fmt: skip

    def __repr__(self) -> str:
        return (f"FeatureExtractor({type(self.model).__name__}, dim={self.dim}, image_size={self.image_size}, "
                f"flip={self.flip}, device={self.device})")  # fmt: skip

    def _prepare(self, item: Any) -> torch.Tensor:
        return self.transform(to_pil(item))  # (3, H, W)

    def _batches(self, items: list[Any]) -> Iterator[torch.Tensor]:
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if self.num_workers <= 0:
            for chunk in chunks:
                yield torch.stack([self._prepare(x) for x in chunk])
            return
        # Decoding (PIL releases the GIL) of the next batch overlaps the model's forward pass on the current one;
        # at most two batches are in flight, so memory does not grow with the number of images.
        with ThreadPoolExecutor(self.num_workers) as pool:
            queued: deque[list] = deque()
            for chunk in chunks:
                queued.append([pool.submit(self._prepare, x) for x in chunk])
                if len(queued) == 2:
                    yield torch.stack([f.result() for f in queued.popleft()])
            while queued:
                yield torch.stack([f.result() for f in queued.popleft()])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed(self.model, images.to(self.device, non_blocking=True), self.flip).cpu()  # (B, D)

    def __call__(self, inputs: ImageInput | Sequence[ImageInput], *, progress: bool = False) -> torch.Tensor:
        """Features of one image or a list of images (see the class docstring for the kinds accepted).

        Args:
            progress: show a tqdm bar over the batches.

        Returns:
            (B, D) float32 CPU tensor, L2-normalised rows, in input order (a batch input counts its B images).

        Raises:
            TypeError: an input that is no kind of image.
            ValueError: an array or tensor of the wrong shape, dtype or value range (the message says which).
            CorruptImageError: a file or bytes that do not decode (the message names the file).
        """
        items = as_items(inputs)
        total = -(-len(items) // self.batch_size)
        batches = tqdm(self._batches(items), total=total, desc="features", unit="batch", disable=not progress)
        feats = [self._forward(b) for b in batches]
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def list_images(root: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Image files (IMAGE_EXTENSIONS, any case) in `root`, as sorted POSIX paths relative to it; hidden files and
    folders are skipped. With `recursive`, subfolders at any depth are searched too.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: no image found (the message names the folder and the extensions).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such folder")
    found, has_subfolders = [], False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        has_subfolders |= bool(dirnames)
        rel = Path(dirpath).relative_to(root)
        images = [f for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        found += [(rel / f).as_posix() for f in images]
        if not recursive:
            break
    if not found:
        where = "at any depth under" if recursive else "in"
        hint = "; it has subfolders: add --recursive to search them" if has_subfolders and not recursive else ""
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) {where} {root}{hint}")
    return sorted(found)


def _parse_backbone(pairs: list[str] | None) -> dict[str, Any] | None:
    """`name=vit_small img_size=[256,128]` -> {"name": "vit_small", "img_size": [256, 128]} (values are YAML)."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ValueError(f"--backbone {pair!r}: expected KEY=VALUE, e.g. name=vit_small")
        out[k] = yaml.safe_load(v)
    if isinstance(out.get("img_size"), list):
        out["img_size"] = tuple(out["img_size"])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dino_recog.extract",
        description="L2-normalised features of a folder of images (.npy) and their file list (.txt, same order).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="stage-2 model.pth / best.pth, or backbone weights")
    p.add_argument("--images", required=True, help="folder of images (" + ", ".join(IMAGE_EXTENSIONS) + ")")
    p.add_argument("--out", required=True, help="features file, must end in .npy; the file list goes beside it (.txt)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--flip", action="store_true", help="average with the features of the mirrored images")
    p.add_argument("--recursive", action="store_true", help="also take the images of subfolders, at any depth")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding threads (default 4; 0: none)")
    p.add_argument("--backbone", nargs="+", metavar="KEY=VALUE",
                   help=f"for backbone weights without a spec of their own (official DINO, timm): build_backbone "
                        f"arguments or BackboneSpec fields, e.g. name=vit_small img_size=[256,128] patch_size=16 "
                        f"(name: {_ARCH_HELP})")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"), help="override the input size")
    p.add_argument("--mean", type=finite_float, nargs=3, help="override the normalisation mean (RGB)")
    p.add_argument("--std", type=positive_float, nargs=3, help="override the normalisation std (RGB)")
    p.add_argument("--test-feature", choices=TEST_FEATURES,
                   help="a stage-2 model's embedding: after_neck | before_neck (default: the one saved in the model)")
    p.add_argument("--allow-missing", action="store_true",
                   help="use backbone weights that lack some of the model's tensors (left random)")
    return p


def _check_writable(out: Path) -> None:
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: expected a .npy file name (the file list is written beside it as .txt)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output folder {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to the output folder {out.parent}: permission denied")


def main(argv: list[str] | None = None) -> int:
    """`python -m dino_recog.extract ...`; returns the exit status: 0, or 2 after one line on stderr."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        _check_writable(out)  # before the model runs, not after
        names = list_images(args.images, args.recursive)
        extractor = FeatureExtractor(
            args.checkpoint, None if args.device == "auto" else args.device, batch_size=args.batch_size,
            flip=args.flip, image_size=args.image_size, mean=args.mean, std=args.std,
            backbone=_parse_backbone(args.backbone), num_workers=args.num_workers, allow_missing=args.allow_missing,
            test_feature=args.test_feature,
        )  # fmt: skip
        feats = extractor([os.path.join(args.images, n) for n in names], progress=True).numpy()  # (N, D)
        listing = out.with_suffix(".txt")
        # A name that is not UTF-8 on disk reaches Python surrogate-escaped (os.fsdecode); surrogateescape writes its
        # original bytes back, and reading the list with errors="surrogateescape" gives the same str, hence the file.
        text = "".join(n + "\n" for n in names).encode("utf-8", "surrogateescape")
        try:  # the features appear only beside their own file list (a crash in between leaves no .npy)
            atomic_write_together([(listing, lambda fh: fh.write(text), "file list"),
                                   (out, lambda fh: np.save(fh, feats), "features")])  # fmt: skip
        except OSError as e:  # its message names the file; printed without the "[Errno N]" prefix
            raise OSError(e.strerror or str(e)) from None
    except (ckpt.CheckpointError, CorruptImageError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]} float32) and {listing}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
