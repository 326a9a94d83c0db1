import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter

from dino_recog.data.transforms import (
    BODY_REGIONS,
    MultiCropTransform,
    _RegionCrop,
    crop_ratio_range,
    random_resized_box,
    reid_test_transform,
    reid_train_transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def person(h=128, w=64):
    """Top half red, bottom half blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, :, 0] = 255
    a[h // 2 :, :, 2] = 255
    return Image.fromarray(a)


def natural(h=128, w=64, seed=0):
    """A photo-like picture: smooth random colours plus texture noise (so that blur and colour changes show)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.uniform(0, 255, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8))
    a = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), np.float32) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


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


def test_random_resized_box_makes_torchvision_draws():
    """Same torch RNG calls and results as RandomResizedCrop.make_params, including the central fallback."""
    for h, w, scale, ratio in [(128, 64, (0.4, 1.0), (0.375, 2 / 3)), (375, 500, (0.05, 0.4), (0.75, 4 / 3)),
                               (10, 200, (0.9, 1.0), (0.375, 0.5))]:  # fmt: skip
        rrc = T.RandomResizedCrop((32, 16), scale=scale, ratio=ratio)
        for seed in range(20):
            torch.manual_seed(seed)
            expected = rrc.make_params([torch.empty(3, h, w)])
            torch.manual_seed(seed)
            top, left, height, width = random_resized_box(h, w, scale, ratio)
            assert (top, left, height, width) == tuple(expected[k] for k in ("top", "left", "height", "width"))


def test_crops_are_pil_bicubic_up_to_rounding():
    """The crops are resized by torchvision's uint8 antialiased bicubic kernel, which is PIL's (a = -0.5): the
    official crop-then-resize in PIL up to rounding (at most 4 of 255, about 0.25 on average on this picture)."""
    img = natural(120, 90, seed=1)
    t = MultiCropTransform((64, 32), local_crops_number=0, gpu_augment=True)
    spec = t.globals[0]
    for seed in range(20):
        torch.manual_seed(seed)
        ours = t.crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), spec).int()
        torch.manual_seed(seed)
        i, j, h, w = random_resized_box(img.height, img.width, spec.scale, spec.ratio)
        pil = img.crop((j, i, j + w, i + h)).resize((32, 64), Image.Resampling.BICUBIC)  # as RandomResizedCrop
        flipped = torch.rand(1).item() < 0.5
        pil = torch.from_numpy(np.array(pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else pil))
        diff = (ours - pil.permute(2, 0, 1).int()).abs()
        assert diff.max() <= 4 and diff.float().mean() < 0.3  # fixed-point rounding of the uint8 kernel


def test_gpu_augment_workers_return_uint8_crops():
    t = MultiCropTransform((64, 32), (0.4, 1.0), 4, (32, 16), (0.05, 0.4), gpu_augment=True)
    crops = t(natural())
    assert [tuple(c.shape) for c in crops] == [(3, 64, 32)] * 2 + [(3, 32, 16)] * 4
    assert all(c.dtype == torch.uint8 and c.is_contiguous() for c in crops)


def official_multicrop(gsize, lsize, n_local):
    """The official DataAugmentationDINO at our sizes: torchvision + PIL, one image and one crop at a time."""

    def blur(p):
        def f(img):
            if p < 1 and random.random() >= p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

        return f

    fc = [
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
    ]
    norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]

    def rrc(size, scale):
        return T.RandomResizedCrop(
            size, scale=scale, ratio=crop_ratio_range(size), interpolation=T.InterpolationMode.BICUBIC
        )

    g1 = T.Compose([rrc(gsize, (0.4, 1.0)), *fc, blur(1.0), *norm])
    g2 = T.Compose([rrc(gsize, (0.4, 1.0)), *fc, blur(0.1), T.RandomSolarize(128, p=0.2), *norm])
    local = T.Compose([rrc(lsize, (0.05, 0.4)), *fc, blur(0.5), *norm])
    return lambda img: [g1(img), g2(img)] + [local(img) for _ in range(n_local)]


def crop_statistics(transform, images):
    """(images, crops, 4): grayscale flag, sharpness (mean |horizontal luma step|), mean and std of the pixels."""
    rows = []
    for img in images:
        row = []
        for c in transform(img):
            v = c * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
            luma = v.mean(0)
            gray = (v - luma).abs().max() < 1e-3
            row.append([float(gray), float((luma[:, 1:] - luma[:, :-1]).abs().mean()), float(v.mean()), float(v.std())])
        rows.append(row)
    return np.array(rows)


def test_fast_multicrop_has_the_distribution_of_the_official_pipeline():
    """Per crop (global 1 always blurred, global 2 solarised at 0.2, locals blurred at 0.5, ...), sharpness, mean and
    contrast agree with the official PIL pipeline within 4 standard errors, and a fifth of each crop is grayscale."""
    n = 200
    images = [natural(96, 48, seed=s) for s in range(n)]
    torch.manual_seed(0)
    random.seed(0)
    ref = crop_statistics(official_multicrop((64, 32), (32, 16), 2), images)
    torch.manual_seed(0)
    ours = crop_statistics(MultiCropTransform((64, 32), (0.4, 1.0), 2, (32, 16), (0.05, 0.4)), images)
    for k, name in [(1, "sharpness"), (2, "mean"), (3, "std")]:
        se = np.sqrt(ref[..., k].var(0) / n + ours[..., k].var(0) / n)
        gap = np.abs(ref[..., k].mean(0) - ours[..., k].mean(0))
        assert (gap < 4 * se).all(), (name, ref[..., k].mean(0), ours[..., k].mean(0), se)
    gray = ours[..., 0].sum(0)
    assert (np.abs(gray - 0.2 * n) <= 4 * np.sqrt(n * 0.2 * 0.8)).all(), gray / n
    sharp = ours[..., 1].mean(0)
    assert sharp[0] < 0.8 * sharp[1]  # global 1 is always blurred, global 2 rarely


def test_part_aware_crops_stay_in_their_band():
    t = MultiCropTransform((64, 32), local_crops_number=6, local_crops_size=(32, 16), part_aware=True, gpu_augment=True)
    for seed in range(10):
        torch.manual_seed(seed)
        locals_ = t(person())[2:]
        top, bottom = locals_[:2], locals_[4:]  # 2 per region: top, middle, bottom
        assert all(c[2].max() < 20 and c[0].min() > 235 for c in top)  # red only (bicubic rounding aside)
        assert all(c[0].max() < 20 and c[2].min() > 235 for c in bottom)  # blue only
