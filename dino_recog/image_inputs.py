"""Images given to `FeatureExtractor` in memory or by name: checked up front, converted to RGB PIL images.

`as_items` splits one input or a list of them into one checked entry per image, so a bad item fails before any
compute; `to_pil` converts one entry to the RGB image `read_image` would make of the same picture in a file
(`FeatureExtractor` calls it batch by batch, so memory does not grow with the number of images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.datasets import _to_rgb, read_image

__all__ = ["ImageInput", "as_items", "to_pil"]

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
"""One image or a batch: a path, encoded bytes, a PIL image, an array (channels last) or a tensor (channels first)."""


def _check_float_range(x: np.ndarray | torch.Tensor, what: str) -> None:
    empty = (x.numel() if isinstance(x, torch.Tensor) else x.size) == 0
    lo, hi = (0.0, 0.0) if empty else (float(x.min()), float(x.max()))
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"{what} with values in [{lo:.4g}, {hi:.4g}]: expected floats in [0, 1] (not normalised: "
            "FeatureExtractor normalises with the model's mean and std) or uint8 in 0-255"
        )


def _split_array(x: np.ndarray, where: str) -> list[np.ndarray]:
    """One (H, W) or (H, W, C) array per image of a numpy input (channels last, as PIL and OpenCV have them)."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: array of dtype {x.dtype}: expected uint8 (0-255) or a floating dtype (0-1)")
    ok_hwc = x.ndim in (3, 4) and x.shape[-1] in (1, 3, 4)
    height_width = x.shape[-3:-1] if ok_hwc else x.shape if x.ndim == 2 else ()
    if not height_width or 0 in height_width:
        hint = "; it looks channels-first: use .transpose(1, 2, 0)" if x.ndim == 3 and x.shape[0] in (1, 3) else ""
        raise ValueError(
            f"{where}: array of shape {x.shape}: expected (H, W), (H, W, C) or (B, H, W, C) with C = 1, 3 or 4 "
            f"(channels last, RGB){hint}"
        )
    if x.dtype != np.uint8:
        _check_float_range(x, f"{where}: float array")
    return list(x) if x.ndim == 4 else [x]


def _split_tensor(x: torch.Tensor, where: str) -> list[torch.Tensor]:
    """One (C, H, W) tensor per image of a tensor input (channels first, as torchvision has them)."""
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{where}: tensor of dtype {x.dtype}: expected torch.uint8 (0-255) or a floating dtype (0-1)")
    shape = tuple(x.shape)
    ok = (x.ndim in (3, 4) and shape[-3] in (1, 3)) or x.ndim == 2
    if not ok or 0 in shape[-2:]:
        hint = ""
        if x.ndim in (3, 4) and shape[-1] in (1, 3):
            hint = f"; it looks channels-last: use .permute({'2, 0, 1' if x.ndim == 3 else '0, 3, 1, 2'})"
        raise ValueError(
            f"{where}: tensor of shape {shape}: expected (3, H, W) or (1, H, W) for one image, (B, 3, H, W) or "
            f"(B, 1, H, W) for a batch, or (H, W) (channels first, RGB){hint}"
        )
    x = x.detach()
    if x.is_floating_point():
        _check_float_range(x, f"{where}: float tensor")
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return list(x) if x.ndim == 4 else [x]


def _split(x: Any, where: str) -> list[Any]:
    if isinstance(x, str | os.PathLike):
        return [os.fspath(x)]
    if isinstance(x, bytes | Image.Image):
        return [x]
    if isinstance(x, np.ndarray):
        return _split_array(x, where)
    if isinstance(x, torch.Tensor):
        return _split_tensor(x, where)
    raise TypeError(
        f"{where}: cannot use {type(x).__name__} as an image: expected a file path, encoded bytes, a PIL image, "
        "a numpy array or a torch tensor"
    )


def as_items(inputs: ImageInput | Sequence[ImageInput]) -> list[Any]:
    """One entry per image: a path, bytes, a PIL image, an (H, W[, C]) array or a (C, H, W) tensor, all checked."""
    if isinstance(inputs, list | tuple):
        return [item for i, x in enumerate(inputs) for item in _split(x, f"inputs[{i}]")]
    return _split(inputs, "input")


def to_pil(item: Any) -> Image.Image:
    """An RGB image, as `read_image` makes it from a file (alpha dropped, grayscale replicated, 16-bit scaled)."""
    if isinstance(item, str | bytes):
        return read_image(item)
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if isinstance(item, torch.Tensor):
        if item.is_floating_point():  # quantised like a file so every kind of input is resized the same way
            item = (item.float() * 255).round().clamp(0, 255).to(torch.uint8)
        item = item.cpu().permute(1, 2, 0).numpy()  # (H, W, C)
    elif item.dtype != np.uint8:
        item = np.clip(np.rint(item.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[:, :, 0]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(item)))
