"""Block-wise masks (data/masking.py): unions of rectangles, never above the target, DINOv2's per-batch ratios."""

import random

import pytest
import torch

from dino_recog.data.masking import BlockMaskGenerator, sample_batch_masks


def components(mask):
    """4-connected components of a 2-D bool mask, as lists of (row, col)."""
    seen, out = set(), []
    h, w = mask.shape
    for start in zip(*torch.nonzero(mask, as_tuple=True)):
        start = (int(start[0]), int(start[1]))
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < h and 0 <= nc < w and mask[nr, nc] and (nr, nc) not in seen:
                    seen.add((nr, nc))
                    stack.append((nr, nc))
        out.append(comp)
    return out


def box_fill(mask):
    """Mean over the connected components of (patches / area of the bounding box): 1 for solid rectangles."""
    fills = []
    for comp in components(mask):
        rows, cols = [r for r, _ in comp], [c for _, c in comp]
        fills.append(len(comp) / ((max(rows) - min(rows) + 1) * (max(cols) - min(cols) + 1)))
    return sum(fills) / len(fills)


def test_mask_is_the_union_of_its_rectangles_and_never_exceeds_the_target():
    gen = BlockMaskGenerator((16, 8))  # 256x128 crops, patch 16
    rng = random.Random(0)
    achieved = []
    for target in range(0, 65):
        for _ in range(5):
            mask, rects = gen.rectangles(target, rng)
            painted = torch.zeros(16, 8, dtype=torch.bool)
            for top, left, h, w in rects:
                assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 8
                assert h * w <= gen.max_block_patches == 64  # half the grid at most
                painted[top : top + h, left : left + w] = True
            assert torch.equal(mask, painted)
            assert int(mask.sum()) <= target
            if target:
                achieved.append(int(mask.sum()) / target)
    assert not gen.rectangles(0, rng)[1]
    assert sum(achieved) / len(achieved) > 0.95  # falling short of the target is rare


def test_masks_are_blocks_not_scattered_patches():
    gen = BlockMaskGenerator((16, 8))
    rng = random.Random(1)
    block_size, scattered_size, fill = [], [], []
    for i in range(50):
        mask = gen(38, rng)  # 30% of the patches
        parts = components(mask)
        assert len(parts) <= 6  # a few blocks
        block_size.append(int(mask.sum()) / len(parts))
        fill.append(box_fill(mask))
        scattered = torch.zeros(128, dtype=torch.bool)
        scattered[torch.randperm(128, generator=torch.Generator().manual_seed(i))[: int(mask.sum())]] = True
        scattered_size.append(int(mask.sum()) / len(components(scattered.view(16, 8))))
    # As many patches scattered at random make islands of about 2 patches; the blocks are ten times larger and
    # mostly fill their bounding boxes (overlapping rectangles make L shapes, so not always 1).
    assert sum(block_size) / 50 > 15 and sum(scattered_size) / 50 < 3
    assert sum(fill) / 50 > 0.75


def test_batch_masks_have_dinov2_ratios():
    gen = BlockMaskGenerator((16, 8))
    rng = random.Random(2)
    n, low, high = 16, 0.1, 0.5
    in_interval = total = 0
    for _ in range(100):
        masks = sample_batch_masks(gen, n, (low, high), 0.5, rng)
        assert masks.shape == (n, 128) and masks.dtype == torch.bool
        ratios = sorted((masks.sum(1) / 128).tolist())
        assert ratios[: n // 2] == [0.0] * (n // 2)  # int(16 x 0.5) = 8 images unmasked
        # The i-th masked image targets a ratio in the i-th eighth of [0.1, 0.5]: sorted, each sits in its own.
        for i, r in enumerate(ratios[n // 2 :]):
            assert 0 < r <= low + (high - low) * (i + 1) / 8
            in_interval += r >= low + (high - low) * i / 8 - 1 / 128
            total += 1
    assert in_interval / total > 0.97  # the rest fell a little short of the target
    shuffled = sample_batch_masks(gen, n, (low, high), 0.5, random.Random(3)).any(1)
    assert 0 < int(shuffled[: n // 2].sum()) < n // 2  # masked images are spread over the batch, not first


def test_batch_masks_probability_extremes_and_determinism():
    gen = BlockMaskGenerator((4, 6))
    assert not sample_batch_masks(gen, 8, (0.1, 0.5), 0.0, random.Random(0)).any()
    assert sample_batch_masks(gen, 8, (0.2, 0.5), 1.0, random.Random(0)).any(1).all()
    a = sample_batch_masks(gen, 8, rng=random.Random(5))
    assert torch.equal(a, sample_batch_masks(gen, 8, rng=random.Random(5)))
    assert sample_batch_masks(gen, 0).shape == (0, 24)
    with pytest.raises(ValueError, match="at least one patch"):
        BlockMaskGenerator((0, 8))
