import numpy as np
import pytest
import torch
from PIL import Image

from dino_recog.data.transforms import (
    BODY_REGIONS,
    MultiCropTransform,
    _RegionCrop,
    crop_ratio_range,
    reid_test_transform,
    reid_train_transform,
)


def person(h=128, w=64):
    """Top half red, bottom half blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, :, 0] = 255
    a[h // 2 :, :, 2] = 255
    return Image.fromarray(a)


def test_multicrop_sizes_and_count():
    t = MultiCropTransform((64, 32), (0.4, 1.0), 5, (32, 16), (0.05, 0.4))
    crops = t(person())
    assert [tuple(c.shape) for c in crops] == [(3, 64, 32)] * 2 + [(3, 32, 16)] * 5
    assert all(c.dtype == torch.float32 for c in crops)


def test_crop_ratio_follows_the_output_aspect():
    assert crop_ratio_range((256, 128)) == pytest.approx((0.375, 2 / 3))
    assert crop_ratio_range((224, 224)) == pytest.approx((0.75, 4 / 3))


def test_part_aware_local_crops_come_from_their_body_region():
    t = MultiCropTransform((64, 32), local_crops_number=6, local_crops_size=(32, 16), part_aware=True)
    regions = [(spec.region.top, spec.region.bottom) for spec in t.locals]
    assert regions == [r for r in BODY_REGIONS for _ in range(2)]
    img = person()
    top = np.asarray(_RegionCrop(0.0, 0.5)(img))
    bottom = np.asarray(_RegionCrop(0.5, 1.0)(img))
    assert top.shape == (64, 64, 3) and (top[..., 0] == 255).all() and (top[..., 2] == 0).all()
    assert (bottom[..., 2] == 255).all() and (bottom[..., 0] == 0).all()


def test_reid_transforms():
    torch.manual_seed(0)
    x = reid_train_transform((64, 32), (0.5,) * 3, (0.5,) * 3, padding=4, erasing_prob=1.0)(person())
    assert x.shape == (3, 64, 32)
    assert (x == 0).all(dim=0).any()  # random erasing filled a region with 0 (the mean after normalisation)
    y = reid_test_transform((64, 32), (0.5,) * 3, (0.5,) * 3)(person())
    assert y.shape == (3, 64, 32) and y[0, 0, 0] == pytest.approx(1.0) and y[2, -1, 0] == pytest.approx(1.0)
