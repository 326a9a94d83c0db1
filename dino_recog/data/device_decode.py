"""`crops.decode: gpu`: the workers send encoded JPEG bytes and crop boxes, the training process makes the pixels.

A DataLoader worker reads the file (or LMDB value), parses only its header, and draws every crop's box and flip with
:meth:`MultiCropTransform.draw` under the item's seed, exactly as the CPU path does (:class:`EncodedMultiCrop`): no
pixel is decoded there. The training process then decodes the batch's JPEGs in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on a GPU) and cuts and resizes all crops of one output
size in two batched matrix products (:func:`resize_boxes`), ready for :class:`BatchAugment` (:class:`DeviceCrops`).

The resize is the CPU path's filter, not an approximation of it: an antialiased bicubic resize (PIL's kernel, which
``F.interpolate(antialias=True)`` implements) is separable, out = Wy @ crop @ Wx^T, with Wy and Wx the filter
weights of the rows and columns. Writing Wy and Wx over the whole (padded) image, zero outside the crop's box, turns
every crop of one output size into the same two batched ``matmul`` calls, whatever its box, and a flip is the
column weights in reverse order. One ``F.interpolate`` per crop would be the same filter at 10 x batch kernel
launches; ``torchvision.ops.roi_align`` would be one kernel too but samples bilinearly (box-averaged when
shrinking), a different and blurrier filter than the CPU path's bicubic when a local crop is enlarged.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .datasets import CorruptImageError, collate_skip_none, read_image
from .transforms import MultiCropTransform, keep_freed_memory

__all__ = ["DeviceCrops", "EncodedBatch", "EncodedCrops", "EncodedMultiCrop", "collate_encoded", "read_encoded",
           "resize_boxes"]  # fmt: skip

log = logging.getLogger(__name__)
JPEG_END = b"\xff\xd9"  # EOI marker: a JPEG cut short (the usual corrupt file) lacks it and is decoded by the worker


@dataclass(frozen=True)
class EncodedJPEG:
    """A JPEG the device may decode: its bytes and the size its header states."""

    data: torch.Tensor  # (n,) uint8
    height: int
    width: int
    name: str  # the file (or LMDB key), for messages


@dataclass
class EncodedCrops:
    """One image as a worker sends it with `crops.decode: gpu`.

    Attributes:
        data: (n,) uint8 encoded JPEG, or (3, H, W) uint8 pixels a worker decoded (not a JPEG the device can read).
        boxes: (n_crops, 4) int64 (top, left, height, width) in image pixels, crop by crop in output order.
        flips: (n_crops,) bool, the crop is mirrored.
        sizes: (height, width) of each crop's output.
        name: the file (or LMDB key) in messages.
    """

    data: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    sizes: tuple[tuple[int, int], ...]
    name: str


class EncodedBatch:
    """The images of a batch (a DataLoader's first field with `crops.decode: gpu`).

    The bytes stay in CPU memory: ``decode_jpeg`` reads its input from there even when it decodes on a GPU.
    """

    def __init__(self, items: list[EncodedCrops]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int]:
        """(number of images,), as a tensor's first dimension: what the training loop counts images with."""
        return (len(self.items),)

    def pin_memory(self) -> EncodedBatch:  # the DataLoader's pin_memory hook for custom types: nothing to pin
        return self


def read_encoded(source: str | os.PathLike | bytes, name: str | None = None) -> EncodedJPEG | Image.Image:
    """The encoded bytes of a JPEG the device can decode, or else the decoded image (:func:`read_image`).

    Only the header is parsed: a baseline or progressive JPEG in RGB or grayscale that ends with its EOI marker goes
    to the device; anything else (PNG, CMYK, a truncated file, ...) is decoded here by PIL, and raises
    :class:`CorruptImageError` as :func:`read_image` does (so a training run skips it as today).
    """
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    label = name or ("<bytes>" if is_bytes else os.fspath(source))
    try:
        if is_bytes:
            data = bytes(source)
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read image {label}: {type(e).__name__}: {e}") from e
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
    except Exception:  # not an image PIL knows: read_image raises the usual message
        return read_image(data, label)
    limit = Image.MAX_IMAGE_PIXELS
    if fmt != "JPEG" or mode not in ("RGB", "L") or not data.endswith(JPEG_END) or (limit and width * height > limit):
        return read_image(data, label)
    return EncodedJPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width, label)


class EncodedMultiCrop(MultiCropTransform):
    """The worker's half of :class:`MultiCropTransform` with `crops.decode: gpu`: crop boxes and flips, no pixels.

    :class:`ImageDataset` reads images with its :meth:`read` (:func:`read_encoded`) instead of decoding them. The
    boxes are drawn with the same calls, in the same order, as the CPU path's, so a seeded item gets the same crops
    on either path (and a resumed run the same as the first).
    """

    read = staticmethod(read_encoded)

    def __call__(self, img: EncodedJPEG | Image.Image) -> EncodedCrops:
        name = ""  # only a JPEG left to the device needs its name (in the warning if it cannot be decoded there)
        if isinstance(img, EncodedJPEG):
            data, height, width, name = img.data, img.height, img.width, img.name
        else:  # decoded by the worker: its pixels travel instead of its bytes
            keep_freed_memory()
            data = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
            height, width = data.shape[1:]
        specs = self.specs
        drawn = [self.draw(spec, height, width) for spec in specs]
        return EncodedCrops(data, torch.tensor([d[:4] for d in drawn], dtype=torch.int64).view(-1, 4),
                            torch.tensor([d[4] for d in drawn], dtype=torch.bool), tuple(s.size for s in specs),
                            name)  # fmt: skip


def collate_encoded(batch: list[Any]) -> tuple[Any, int]:
    """:func:`collate_skip_none` for `crops.decode: gpu` items: the images become one :class:`EncodedBatch`."""
    kept = [item for item in batch if item is not None]
    collated, skipped = collate_skip_none([None if item is None else (0, *item[1:]) for item in batch])
    if collated is None:
        return None, skipped
    return (EncodedBatch([item[0] for item in kept]), *collated[1:]), skipped


# ---------------------------------------------------------------------------------------------------------------------
# The device's half


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and PyTorch's antialiased bicubic filter)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _filter_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(..., out_size, in_size) weights of an antialiased bicubic resize of [start, start + length) to out_size.

    PyTorch's ``_compute_indices_weights_aa`` (upsample.h) for every box at once: output pixel i has centre
    scale (i + 0.5) in box coordinates; shrinking (scale > 1) widens the filter by `scale` (the antialiasing);
    the taps are cut at the box's edges and the weights renormalised, as when the box is cut out first.
    """
    dev = start.device
    scale = (length.double() / out_size)[..., None, None]  # (..., 1, 1)
    support = 2.0 * scale.clamp(min=1.0)  # the bicubic filter's half-width (2) at the output's scale
    inv = 1.0 / scale.clamp(min=1.0)
    center = scale * (torch.arange(out_size, device=dev, dtype=torch.float64)[:, None] + 0.5)  # (..., out, 1)
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), length.double()[..., None, None])
    j = torch.arange(in_size, device=dev, dtype=torch.float64) - start.double()[..., None, None]  # box coordinates
    w = _bicubic((j - center + 0.5) * inv) * ((j >= xmin) & (j < xmax))
    return (w / w.sum(-1, keepdim=True)).float()


def resize_boxes(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut boxes out of images and resize them to `size` (antialiased bicubic), mirroring where `flips`.

    The CPU path's ``F.interpolate(crop, size, mode="bicubic", antialias=True)`` on uint8, as two batched matrix
    products for all boxes (module docstring); equal to it within its fixed-point rounding (2 of 255 at most in
    tests/test_device_decode.py; TF32 matmuls, where enabled, may add 1).

    Args:
        images: (B, 3, H, W) float images (zero-padded to a common size; padding is never read).
        boxes: (B, K, 4) int (top, left, height, width): K crops per image, inside its unpadded size.
        flips: (B, K) bool.
        size: (height, width) of the output.

    Returns:
        (B, K, 3, height, width) uint8.
    """
    n, k = boxes.shape[:2]
    h_in, w_in = images.shape[-2:]
    (oh, ow), boxes = size, boxes.to(images.device)
    wy = _filter_weights(boxes[..., 0], boxes[..., 2], oh, h_in)  # (B, K, oh, H)
    wx = _filter_weights(boxes[..., 1], boxes[..., 3], ow, w_in)  # (B, K, ow, W)
    wx = torch.where(flips.to(images.device)[..., None, None], wx.flip(-2), wx)
    # columns first, rounded to 0..255 in between: the two passes of PIL's (and PyTorch's uint8) kernel, whose
    # intermediate image is uint8 (it clips a bicubic overshoot before the second pass)
    cols = images.reshape(n, 3 * h_in, w_in) @ wx.permute(0, 3, 1, 2).reshape(n, w_in, k * ow)  # (B, 3 H, K ow)
    cols = cols.round_().clamp_(0, 255).view(n, 3, h_in, k, ow).permute(0, 3, 2, 1, 4).reshape(n * k, h_in, 3 * ow)
    out = (wy.view(n * k, oh, h_in) @ cols).view(n, k, oh, 3, ow).permute(0, 1, 3, 2, 4)  # (B, K, 3, oh, ow)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class DeviceCrops:
    """The training process's half of `crops.decode: gpu`: an :class:`EncodedBatch` -> the multi-crop batch.

    Attributes:
        skipped: images that passed the worker's header check but that neither the device's decoder nor PIL could
            decode; they are left out of their batch with a warning naming them (reported per epoch by the task).
    """

    def __init__(self) -> None:
        self.skipped = 0

    def decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        """Every image as (3, H, W) uint8 on `device`: the JPEGs in one batched call; None where undecodable."""
        from torchvision.io import ImageReadMode, decode_jpeg

        items = batch.items
        images: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [k for k, item in enumerate(items) if item.data.dim() == 1]
        decoded = []
        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec; decode_jpeg works as documented
            warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
            try:
                if jpegs:
                    decoded = decode_jpeg([items[k].data for k in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the whole call: decode them one by one
                decoded = [self._one(items[k], device, decode_jpeg, ImageReadMode.RGB) for k in jpegs]
        for k, img in zip(jpegs, decoded):
            images[k] = img
        for k, item in enumerate(items):
            if item.data.dim() == 3:
                images[k] = item.data.to(device, non_blocking=True)
        return images

    def _one(self, item: EncodedCrops, device: torch.device, decode_jpeg, rgb) -> torch.Tensor | None:
        try:
            return decode_jpeg(item.data, mode=rgb, device=device)
        except RuntimeError:
            pass
        try:  # a JPEG the device's decoder refuses may still be one PIL reads
            img = read_image(item.data.numpy().tobytes(), item.name)
        except CorruptImageError as e:
            log.warning("skipping a training image: %s", e)
            self.skipped += 1
            return None
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device)

    def __call__(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
        """The crops of the batch on `device`, as the CPU path's loader gives them: one (B, 3, h, w) uint8 tensor
        per crop, global crops first; images that cannot be decoded are left out."""
        images = self.decode(batch, device)
        kept = [k for k, img in enumerate(images) if img is not None]
        if not kept:
            raise CorruptImageError(f"none of the {len(images)} images of a batch could be decoded (each named in a "
                                    "warning above); check the files of data.train")  # fmt: skip
        items = [batch.items[k] for k in kept]
        h = max(images[k].shape[1] for k in kept)
        w = max(images[k].shape[2] for k in kept)
        canvas = torch.zeros(len(kept), 3, h, w, device=device)
        for out, k in zip(canvas, kept):
            img = images[k]
            out[:, : img.shape[1], : img.shape[2]] = img
        boxes = torch.stack([item.boxes for item in items])  # (B, n_crops, 4)
        flips = torch.stack([item.flips for item in items])
        sizes = items[0].sizes
        crops: list[torch.Tensor | None] = [None] * len(sizes)
        for size in dict.fromkeys(sizes):  # each output size once, all its crops together
            which = [c for c, s in enumerate(sizes) if s == size]
            out = resize_boxes(canvas, boxes[:, which], flips[:, which], size)  # (B, len(which), 3, h, w)
            for j, c in enumerate(which):
                crops[c] = out[:, j]
        return crops
