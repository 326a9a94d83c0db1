"""Image transforms: DINO multi-crop augmentation (stage 1) and re-identification train/test transforms (stage 2)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter

__all__ = [
    "MultiCropTransform",
    "RandomGaussianBlur",
    "crop_ratio_range",
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

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.crop(
            (0, int(round(self.top * h)), w, max(int(round(self.bottom * h)), int(round(self.top * h)) + 1))
        )


class MultiCropTransform:
    """DINO's multi-crop augmentation (official `DataAugmentationDINO`), for rectangular crops.

    2 global crops (scale `global_crops_scale`) and `local_crops_number` local crops (scale `local_crops_scale`), each
    with horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale with p 0.2, Gaussian blur with
    p 1.0 / 0.1 / 0.5 (global 1 / global 2 / local) and sigma in (0.1, 2), solarisation with p 0.2 on global 2, bicubic
    resizing and normalisation. Sizes are (height, width). With `part_aware`, the local crops are drawn 1/3 each from
    the top, middle and bottom body regions (PASS).

    Returns a list of (3, H, W) float tensors: global 1, global 2, then the local crops.
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
    ) -> None:
        flip_and_color = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        normalize = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]

        def crop(size: Sequence[int], scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(tuple(size), scale=scale, ratio=crop_ratio_range(size), interpolation=BICUBIC)

        gsize, gscale = tuple(global_crops_size), tuple(global_crops_scale)
        self.global_1 = T.Compose([crop(gsize, gscale), *flip_and_color, RandomGaussianBlur(1.0), *normalize])
        self.global_2 = T.Compose(
            [crop(gsize, gscale), *flip_and_color, RandomGaussianBlur(0.1), T.RandomSolarize(128, p=0.2), *normalize]
        )
        local_tail = [
            crop(local_crops_size, tuple(local_crops_scale)),
            *flip_and_color,
            RandomGaussianBlur(0.5),
            *normalize,
        ]
        if part_aware:
            per_region = local_crops_number // len(BODY_REGIONS)
            self.locals = [T.Compose([_RegionCrop(*r), *local_tail]) for r in BODY_REGIONS for _ in range(per_region)]
        else:
            self.locals = [T.Compose(local_tail)] * local_crops_number

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global_1(img), self.global_2(img)] + [t(img) for t in self.locals]


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
