"""Image transforms: DINO multi-crop augmentation (stage 1) and re-identification train/test transforms (stage 2)."""

from __future__ import annotations

import ctypes
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter

from .batch_augment import BatchAugment

__all__ = [
    "MultiCropTransform",
    "RandomGaussianBlur",
    "crop_ratio_range",
    "keep_freed_memory",
    "random_resized_box",
    "reid_test_transform",
    "reid_train_transform",
]

BICUBIC = T.InterpolationMode.BICUBIC
# Body regions of the PASS part-aware local crops (Zhu et al. 2022): top, middle, bottom, as fractions of the height.
BODY_REGIONS = ((0.0, 0.5), (0.25, 0.75), (0.5, 1.0))


class RandomGaussianBlur:
    """PIL Gaussian blur, random radius in `sigma`, applied with probability `p` (official DINO `GaussianBlur`)."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < 1 and random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def crop_ratio_range(size: Sequence[int], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float]:
    """Aspect-ratio (w/h) range of a random crop, relative to the output's aspect.

    torchvision's default (3/4, 4/3) is made for square outputs; for a 256x128 output it would stretch person crops
    two-fold on average. Scaling the range by the output aspect keeps the same relative jitter without that bias.
    """
    aspect = size[1] / size[0]
    return ratio[0] * aspect, ratio[1] * aspect


class _RegionCrop:
    """Restrict the following random crop to a horizontal band of the image (PASS part-aware local crops)."""

    def __init__(self, top: float, bottom: float) -> None:
        self.top, self.bottom = top, bottom

    def rows(self, height: int) -> tuple[int, int]:
        """First and end row of the band in an image of `height` rows (at least one row)."""
        top = int(round(self.top * height))
        return top, max(int(round(self.bottom * height)), top + 1)

    def __call__(self, img: Image.Image) -> Image.Image:
        top, bottom = self.rows(img.height)
        return img.crop((0, top, img.width, bottom))


def random_resized_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's ``RandomResizedCrop`` draw, call for call.

    Area uniform in `scale` x the image area, log aspect ratio (w/h) uniform in log `ratio`; 10 tries, then the
    central crop with the closest allowed aspect. Same torch RNG calls as ``RandomResizedCrop.make_params``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_malloc_tuned_in: int | None = None  # the process id in which keep_freed_memory last ran


def keep_freed_memory() -> None:
    """Keep freed heap memory in this process instead of giving it back to the OS (glibc only; once per process).

    The colour operations of one image allocate float buffers of a few hundred KB to a few MB. glibc serves them
    with mmap, or trims the top of the heap when they are freed, so every image faults all their pages in again: on
    the 2-core VM of docs/benchmarks.md that was a large share of the transform's time. Fixed thresholds (mmap above
    16 MiB, trim above 32 MiB of free heap) keep the pages; the cost is at most that much resident memory per
    worker. Does nothing where there is no ``mallopt`` (other C libraries, macOS, Windows).
    """
    global _malloc_tuned_in
    if _malloc_tuned_in == os.getpid():
        return
    _malloc_tuned_in = os.getpid()
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if os.name == "posix" else None
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        mallopt(m_mmap_threshold, 16 << 20)
        mallopt(m_trim_threshold, 32 << 20)


@dataclass(frozen=True)
class _CropSpec:
    size: tuple[int, int]  # (height, width) of the output
    scale: tuple[float, float]
    ratio: tuple[float, float]
    region: _RegionCrop | None = None  # part-aware: the band the crop is drawn from


class MultiCropTransform:
    """DINO's multi-crop augmentation (official `DataAugmentationDINO`), for rectangular crops.

    2 global crops (scale `global_crops_scale`) and `local_crops_number` local crops (scale `local_crops_scale`), each
    with horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale with p 0.2, Gaussian blur with
    p 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) and sigma in (0.1, 2), solarisation with p 0.2 on global 2, bicubic
    resizing and normalisation. Sizes are (height, width). With `part_aware`, the local crops are drawn 1/3 each from
    the top, middle and bottom body regions (PASS).

    How it is fast (about 2x lightly's ``DINOTransform`` per CPU core, see docs/benchmarks.md) with the same
    distribution: the decoded pixels become one uint8 tensor, and each crop is one antialiased bicubic resize of its
    random box on uint8 (PIL's kernel, PyTorch's vectorised implementation, within rounding of the official PIL crop
    and resize); the colour operations then run on all crops of one size at once as float tensors
    (:class:`BatchAugment`, per-crop random parameters) instead of ten PIL pipelines that convert to uint8 after every
    operation. The random draws of the crop boxes and flips are torchvision's.

    The image is decoded in full once per image, by the data set. A JPEG ``draft`` (DCT-domain downscaling) is not
    used: a local crop may cover 5% of the image area, and at person-crop and ImageNet sizes its box is then no larger
    than its output, so any reduction before the crop would lower the resolution of such crops (it pays only for
    sources above about 4 x local crop area / min local scale, 650k pixels with the defaults).

    Args:
        gpu_augment: return uint8 crops after crop, resize and flip only; colour jitter, grayscale, blur,
            solarisation and normalisation are then left to a :class:`BatchAugment` on the training device.

    Returns:
        A list of (3, H, W) tensors, float32 and normalised (uint8 with `gpu_augment`): global 1, global 2, then the
        local crops.
    """

    def __init__(
        self,
        global_crops_size: Sequence[int] = (256, 128),
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_number: int = 8,
        local_crops_size: Sequence[int] = (128, 64),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        part_aware: bool = False,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        gpu_augment: bool = False,
    ) -> None:
        def spec(size: Sequence[int], scale: Sequence[float], region: _RegionCrop | None = None) -> _CropSpec:
            size = (int(size[0]), int(size[1]))
            return _CropSpec(size, (float(scale[0]), float(scale[1])), crop_ratio_range(size), region)

        self.globals = [spec(global_crops_size, global_crops_scale)] * 2
        if part_aware:
            per_region = local_crops_number // len(BODY_REGIONS)
            self.locals = [
                spec(local_crops_size, local_crops_scale, _RegionCrop(*r))
                for r in BODY_REGIONS
                for _ in range(per_region)
            ]
        else:
            self.locals = [spec(local_crops_size, local_crops_scale)] * local_crops_number
        self.gpu_augment = gpu_augment
        self.augment = BatchAugment(mean, std, n_global=len(self.globals))

    @property
    def specs(self) -> list[_CropSpec]:
        """Every crop's specification, in output order: the global crops, then the local crops."""
        return self.globals + self.locals

    @staticmethod
    def draw(spec: _CropSpec, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one random crop of a `height` x `width` image, in image pixels: the
        box (torchvision's draw, inside the spec's body region if any), then the horizontal flip with p 0.5.

        The only random draws of a crop; `crops.decode: gpu` makes them in the worker with this same function, so
        both decode paths cut the same boxes for the same seed."""
        top, bottom = spec.region.rows(height) if spec.region is not None else (0, height)
        i, j, h, w = random_resized_box(bottom - top, width, spec.scale, spec.ratio)
        return top + i, j, h, w, torch.rand(1).item() < 0.5

    def crop(self, img: torch.Tensor, spec: _CropSpec) -> torch.Tensor:
        """Random resized crop (bicubic, antialiased) of a (3, H, W) uint8 image, then horizontal flip with p 0.5."""
        i, j, h, w, flip = self.draw(spec, img.shape[1], img.shape[2])
        # uint8 in and out: PyTorch's native antialiased bicubic kernel for uint8 (torchvision's resize on uint8
        # tensors, without its per-call checks) is PIL's, about 2.5x faster than PIL itself
        out = F.interpolate(img[None, :, i : i + h, j : j + w], spec.size, mode="bicubic", antialias=True)
        return out[0].flip(-1) if flip else out[0]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        keep_freed_memory()  # here rather than at construction: DataLoader workers are other processes
        with warnings.catch_warnings():  # a read-only view of the decoded pixels: it is only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            pixels = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)  # (3, H, W) uint8, channels-last memory
        crops = []
        for specs, first in ((self.globals, 0), (self.locals, len(self.globals))):
            if not specs:
                continue
            stack = torch.empty(len(specs), 3, *specs[0].size, dtype=torch.uint8)
            for out, spec in zip(stack, specs):  # contiguous channel planes: the colour operations read them
                out.copy_(self.crop(pixels, spec))
            if not self.gpu_augment:
                stack = self.augment.augment(stack, list(range(first, first + len(specs))))
            crops += stack.unbind(0)
        return crops


def reid_test_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize to (height, width) and normalise: the evaluation transform of both stages."""
    return T.Compose([
        T.Resize(tuple(size), interpolation=BICUBIC), T.ToImage(), T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])  # fmt: skip


def reid_train_transform(
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    flip_prob: float = 0.5,
    padding: int = 10,
    erasing_prob: float = 0.5,
    color_jitter: bool = False,
) -> T.Compose:
    """The "Bag of Tricks" training augmentation (Luo et al. 2019).

    Resize to (height, width), horizontal flip, pad `padding` pixels and random-crop back, optional colour jitter,
    normalise, then random erasing (Zhong et al. 2020) filled with 0, i.e. the mean colour after normalisation.
    """
    ops = [T.Resize(tuple(size), interpolation=BICUBIC), T.RandomHorizontalFlip(flip_prob)]
    if padding:
        ops += [T.Pad(padding), T.RandomCrop(tuple(size))]
    if color_jitter:
        ops.append(T.ColorJitter(brightness=0.2, contrast=0.15, saturation=0.1, hue=0.0))
    ops += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if erasing_prob:
        ops.append(T.RandomErasing(p=erasing_prob, value=0))
    return T.Compose(ops)
