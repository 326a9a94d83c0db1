"""BatchAugment: the photometric half of DINO's multi-crop augmentation, batched, on CPU tensors."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dino_recog.data.batch_augment import JITTER_OPS, BatchAugment, adjust_hue, gaussian_blur

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = dict(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))  # every operation off


def images(n, h=32, w=16, seed=0):
    """Smooth, colourful uint8 images (random low-resolution colours upsampled), so every operation shows."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, h // 4, w // 4), generator=g).float()
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear").round().to(torch.uint8)


def unnormalise(y):
    return y * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def binomial_ok(count, n, p, sigmas=5.0):
    """count of n Bernoulli(p) draws within `sigmas` standard deviations of n p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def reference(x, p, i, radius):
    """Sample i through torchvision's functional ops, one by one, with the drawn parameters."""
    v = x[i].float() / 255
    if p.jitter[i]:
        for op in p.order[i]:
            factor = float(p.factors[i, op])
            fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
            v = fn(v, factor)
    if p.gray[i]:
        v = TF.rgb_to_grayscale(v, num_output_channels=3)
    if p.blur[i]:
        v = TF.gaussian_blur(v, [2 * radius + 1] * 2, [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        v = TF.solarize(v, 128 / 255)
    return TF.normalize(v, MEAN, STD)


def test_each_sample_equals_torchvision_functional_with_its_parameters():
    aug = BatchAugment(MEAN, STD, jitter_p=0.9, gray_p=0.3, blur_p=(0.5, 0.5, 0.5), solarize_p=(0.5, 0.5, 0.5))
    x = images(24)
    p = aug.sample([0, 1, 2] * 8, torch.Generator().manual_seed(1))
    assert p.jitter.any() and p.gray.any() and p.blur.any() and p.solarize.any() and (~p.blur).any()
    out = aug.apply(x, p)
    radius = math.ceil(3 * p.sigma[p.blur].max())  # the batch's kernel: out to 3 sigma of its widest blur
    for i in range(len(x)):
        torch.testing.assert_close(out[i], reference(x, p, i, radius), atol=2e-5, rtol=0, msg=f"sample {i}")


def test_a_single_blurred_sample_gets_torchvision_kernel_size_for_its_sigma():
    aug = BatchAugment(MEAN, STD, **{**OFF, "blur_p": (1.0, 1.0, 1.0)})
    x = images(1)
    for seed in range(5):
        p = aug.sample([0], torch.Generator().manual_seed(seed))
        k = 2 * math.ceil(3 * float(p.sigma[0])) + 1
        expected = TF.normalize(TF.gaussian_blur(x[0].float() / 255, [k, k], [float(p.sigma[0])] * 2), MEAN, STD)
        torch.testing.assert_close(aug.apply(x, p)[0], expected, atol=1e-5, rtol=0)


def test_hue_rotation_equals_torchvision_on_edge_cases():
    x = torch.rand(8, 3, 12, 6, generator=torch.Generator().manual_seed(0))
    x[:, :, :2] = 0.5  # grey: no hue
    x[:, 1, 2:4] = x[:, 0, 2:4]  # R = G ties
    x[:, 2, 4:6] = x[:, 1, 4:6]  # G = B ties
    x[:, :, 6:8] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)  # saturated cyan
    shifts = torch.tensor([-0.5, -0.3, -0.1, 0.0, 0.05, 0.1, 0.3, 0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(s)) for i, s in enumerate(shifts)])
    torch.testing.assert_close(adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)


def test_gaussian_blur_equals_torchvision_per_sample():
    x = torch.rand(3, 3, 20, 14, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma, 6), expected, atol=1e-6, rtol=0)


def test_jitter_of_strength_zero_is_the_identity():
    aug = BatchAugment(MEAN, STD, **{**OFF, "jitter": (0.0, 0.0, 0.0, 0.0), "jitter_p": 1.0})
    x = images(6)
    expected = TF.normalize(x.float() / 255, MEAN, STD)
    torch.testing.assert_close(aug.augment(x, [2] * 6), expected, atol=0, rtol=0)


def test_blur_with_sigma_near_zero_is_close_to_the_identity():
    aug = BatchAugment(MEAN, STD, **{**OFF, "blur_p": (1.0, 1.0, 1.0), "sigma": (1e-3, 1e-3)})
    x = images(4)
    torch.testing.assert_close(
        aug.augment(x, [0, 1, 2, 2]), TF.normalize(x.float() / 255, MEAN, STD), atol=1e-6, rtol=0
    )


def test_multicrop_batch_keeps_shapes_order_and_value_range():
    aug = BatchAugment(MEAN, STD)
    crops = [images(5, 32, 16, seed=i) for i in range(2)] + [images(5, 16, 8, seed=10 + i) for i in range(4)]
    out = aug(crops)
    assert [tuple(c.shape) for c in out] == [(5, 3, 32, 16)] * 2 + [(5, 3, 16, 8)] * 4
    assert all(c.dtype == torch.float32 for c in out)
    for c in out:
        v = unnormalise(c)
        assert v.min() >= -1e-5 and v.max() <= 1 + 1e-5
    float_in = aug([c.float() / 255 for c in crops], step=3)  # float input in [0, 1] is accepted too
    assert [c.shape for c in float_in] == [c.shape for c in out]


def test_drawn_parameters_follow_the_official_probabilities_per_crop():
    aug = BatchAugment(MEAN, STD)
    n = 20000
    p = aug.sample([0] * n + [1] * n + [2] * n + [5] * n, torch.Generator().manual_seed(0))
    crop = np.repeat([0, 1, 2, 3], n)
    for name, probs in (
        ("jitter", (0.8, 0.8, 0.8, 0.8)),
        ("gray", (0.2, 0.2, 0.2, 0.2)),
        ("blur", (1.0, 0.1, 0.5, 0.5)),
        ("solarize", (0.0, 0.2, 0.0, 0.0)),
    ):
        flags = getattr(p, name)
        for c, prob in enumerate(probs):
            assert binomial_ok(flags[crop == c].sum(), n, prob), (name, c, flags[crop == c].mean())
    jittered = p.factors[p.jitter]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= jittered[:, j].min() and jittered[:, j].max() <= hi
        assert abs(jittered[:, j].mean() - (lo + hi) / 2) < 0.01 * (hi - lo)  # uniform: mean in the middle
    assert (p.factors[~p.jitter] == np.array([1, 1, 1, 0], np.float32)).all()
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    # a uniform random order: each operation at each position a quarter of the time
    for k in range(4):
        for op in range(len(JITTER_OPS)):
            assert binomial_ok((p.order[:, k] == op).sum(), 4 * n, 0.25)
    assert (np.sort(p.order, 1) == np.arange(4)).all()


def test_operation_frequencies_measured_on_the_outputs():
    """Each operation alone, on a large batch: the share of crops it changed matches its probability per crop."""
    n = 3000
    crop_index = [0] * n + [1] * n + [2] * n
    x = images(3 * n, 16, 8)
    base = TF.normalize(x.float() / 255, MEAN, STD)
    changed = lambda out: ((out - base).abs().amax((1, 2, 3)) > 1e-4).numpy()  # noqa: E731
    crop = np.repeat([0, 1, 2], n)
    cases = [
        (dict(OFF, gray_p=0.2), (0.2, 0.2, 0.2)),
        (dict(OFF, blur_p=(1.0, 0.1, 0.5), sigma=(1.0, 2.0)), (1.0, 0.1, 0.5)),  # sigma 0.1 changes nothing
        (dict(OFF, solarize_p=(0.0, 0.2, 0.0)), (0.0, 0.2, 0.0)),
        (dict(OFF, jitter_p=0.8), (0.8, 0.8, 0.8)),
    ]
    for kwargs, probs in cases:
        torch.manual_seed(0)
        hit = changed(BatchAugment(MEAN, STD, **kwargs).augment(x, crop_index))
        for c, prob in enumerate(probs):
            assert binomial_ok(hit[crop == c].sum(), n, prob), (kwargs, c, hit[crop == c].mean())
    torch.manual_seed(0)
    gray = unnormalise(BatchAugment(MEAN, STD).augment(x, crop_index))
    is_gray = ((gray - gray.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-5).numpy()
    assert binomial_ok(is_gray.sum(), 3 * n, 0.2), is_gray.mean()  # grayscale survives blur and solarisation


def test_parameters_differ_between_the_samples_of_a_batch():
    x = images(1).expand(16, -1, -1, -1)  # one image, 16 times
    out = BatchAugment(MEAN, STD).augment(x, [2] * 16)
    distinct = {tuple(v.flatten()[:50].tolist()) for v in out}
    assert len(distinct) >= 12  # a batch-wide draw would give at most a few distinct results
    p = BatchAugment(MEAN, STD).sample([2] * 16)
    assert len(set(p.sigma.tolist())) == 16 and len({tuple(o) for o in p.order.tolist()}) > 1


def test_seeded_draws_repeat_for_a_step_and_change_between_steps():
    aug = BatchAugment(MEAN, STD, seed=7)
    crops = [images(4, seed=1), images(4, seed=2), images(4, 16, 8, seed=3)]
    torch.manual_seed(0)
    a = aug(crops, step=5)
    torch.manual_seed(123)  # the global RNG plays no part
    b = aug(crops, step=5)
    c = aug(crops, step=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_output_equals_cpu_output():
    aug = BatchAugment(MEAN, STD, seed=0)
    crops = [images(8, 64, 32, seed=i) for i in range(2)] + [images(8, 32, 16, seed=5 + i) for i in range(4)]
    cpu = aug(crops, step=1)
    gpu = aug.to("cuda")([c.cuda() for c in crops], step=1)
    for u, v in zip(cpu, gpu):
        torch.testing.assert_close(v.cpu(), u, atol=1e-4, rtol=0)
