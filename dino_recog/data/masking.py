"""Block-wise masks over a ViT's patch grid, for the iBOT masked-patch loss of DINOv2."""

from __future__ import annotations

import math
import random

import torch

__all__ = ["BlockMaskGenerator", "sample_batch_masks"]


class BlockMaskGenerator:
    """Masks of an (h, w) patch grid made of random rectangles: BEiT's block-wise masking (Bao et al. 2022,
    Algorithm 1), as iBOT and DINOv2 (`MaskingGenerator`) use it, for rectangular grids such as 16x8 (256x128
    images, patch 16).

    Rectangles are drawn one after another: area uniform in [min_block_patches, budget], aspect ratio (height / width)
    log-uniform in [min_aspect, 1 / min_aspect], position uniform. One is kept when it masks at least one new patch
    and no more than the budget: the patches still to mask, capped at `max_block_patches`. After `attempts` rejected
    draws in a row the mask stays short of its target, so a mask never exceeds the number of patches asked for.

    Args:
        grid: (h, w) patches.
        min_block_patches: smallest rectangle area (BEiT and DINOv2: 4).
        max_block_patches: largest area of one rectangle; None = half the grid (DINOv2).
        min_aspect: smallest height / width of a rectangle (BEiT and DINOv2: 0.3).
        attempts: rejected draws in a row before giving up on the target.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_block_patches: int = 4,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        attempts: int = 10,
    ) -> None:
        self.height, self.width = (int(g) for g in grid)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid {grid}: expected at least one patch in each direction")
        self.num_patches = self.height * self.width
        self.min_block_patches = min_block_patches
        self.max_block_patches = self.num_patches // 2 if max_block_patches is None else max_block_patches
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.attempts = attempts

    def rectangles(self, n_patches: int, rng: random.Random) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """An (h, w) bool mask of at most `n_patches` patches and the (top, left, height, width) rectangles it is
        the union of, in the order they were drawn."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        kept: list[tuple[int, int, int, int]] = []
        count = 0
        while count < n_patches:
            budget = min(n_patches - count, self.max_block_patches)
            for _ in range(self.attempts):
                area = rng.uniform(self.min_block_patches, budget)
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (1 <= h <= self.height and 1 <= w <= self.width):
                    continue
                top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    kept.append((top, left, h, w))
                    count += new
                    break
            else:  # no rectangle fits the remaining budget: stop short rather than overshoot
                break
        return mask, kept

    def __call__(self, n_patches: int, rng: random.Random) -> torch.Tensor:
        """An (h, w) bool mask of at most `n_patches` patches (none for 0)."""
        return self.rectangles(n_patches, rng)[0]


def sample_batch_masks(
    generator: BlockMaskGenerator,
    n_images: int,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """The masks of one batch of global crops, as DINOv2's `collate_data_and_cast` draws them.

    int(n_images x probability) images are masked. The range [low, high] is cut into that many equal intervals and
    the i-th masked image targets int(N x ratio) patches, ratio uniform in the i-th interval, so every batch covers
    the whole range of ratios. The other images are not masked; the order of the images is shuffled.

    Args:
        generator: the block mask generator of the patch grid (N = h x w patches).
        n_images: masks to draw (all global crops of the batch: n_global x B).
        ratio_min_max: (low, high) fraction of the patches masked (DINOv2: (0.1, 0.5)).
        probability: fraction of the images that are masked (DINOv2: 0.5).
        rng: the random source (a new unseeded one if None).

    Returns:
        (n_images, N) bool, True where the student sees the mask token instead of the patch.
    """
    rng = rng if rng is not None else random.Random()
    low, high = ratio_min_max
    n_masked = int(n_images * probability)
    n = generator.num_patches
    masks = []
    for i in range(n_masked):
        lo, hi = low + (high - low) * i / n_masked, low + (high - low) * (i + 1) / n_masked
        masks.append(generator(int(n * rng.uniform(lo, hi)), rng))
    masks += [generator(0, rng) for _ in range(n_images - n_masked)]
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, n, dtype=torch.bool)
    return torch.stack(masks).flatten(1)  # (n_images, N)
