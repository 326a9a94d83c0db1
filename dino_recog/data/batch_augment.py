"""DINO's photometric augmentation, batched with per-sample random parameters, on any device.

The official `DataAugmentationDINO` runs, for every crop, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur and
solarisation through PIL, one image at a time. :class:`BatchAugment` runs the same operations with the same
parameter distributions on a whole batch of crops at once, on whatever device the crops are on:

- in the DataLoader workers, on the crops of one image (``MultiCropTransform``: the CPU path), and
- on the GPU, on the crops of a whole batch after the transfer (``crops.gpu_augment: true``), so that the workers
  only decode, crop, resize and flip.

Both paths therefore share one implementation. The operations and their order, per sample:

1. with probability ``jitter_p``: brightness, contrast, saturation and hue factors drawn as torchvision's
   ``ColorJitter`` draws them, applied in a random order drawn per sample (torchvision draws one order per call, i.e.
   per crop, which is per sample here);
2. with probability ``gray_p``: grayscale (torchvision's luma weights);
3. with the crop's blur probability: Gaussian blur, sigma uniform in ``sigma``, a separable kernel out to 3 sigma
   of the widest blur in the batch (at most 6 pixels: torchvision's ``gaussian_blur`` with kernel size 13 at
   sigma 2), reflected borders;
4. with the crop's solarisation probability: values >= 128/255 inverted (``RandomSolarize(128)`` on uint8);
5. normalisation with ``mean`` / ``std``.

Each operation is torchvision's tensor formula on float values in [0, 1], clamped after every jitter step as
torchvision does; values are not re-quantised to uint8 between operations as the PIL path does. The random
parameters are drawn on the CPU (from a generator seeded with ``(seed, step)`` when both are given, otherwise from
the global torch RNG), so no device synchronisation is needed and a seed gives the same augmentation on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["JITTER_OPS", "AugmentParams", "BatchAugment", "adjust_hue", "gaussian_blur", "grayscale"]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(128) on uint8 images
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images, torchvision's weights: (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images in [0, 1] by `shift` turns, per sample.

    Equal to torchvision's ``adjust_hue`` (RGB -> HSV, h = (h + shift) mod 1, HSV -> RGB) without building the HSV
    image: with V = max, C = max - min and the hue h in sixths of a turn, each channel is
    ``V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6`` and n = 5, 3, 1 for R, G, B.

    Written for the CPU as much as for the GPU: comparisons write float masks and select with ``lerp`` (boolean
    comparisons and ``where`` are about 4x slower there), channels are reduced with element-wise maxima, and the
    modulo is a floor (``remainder`` is 10x slower).

    Args:
        x: (N, 3, H, W) float images in [0, 1].
        shift: (N,) hue shifts in turns (torchvision's `hue_factor`, in [-0.5, 0.5]).
    """
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    is_r = torch.eq(value, r, out=torch.empty_like(value))
    is_g = torch.eq(value, g, out=torch.empty_like(value))
    # hue x chroma, in sixths of a turn, from the sector of the maximum (R before G before B on ties, as torchvision)
    hue = torch.lerp(torch.lerp(chroma * 4 + r - g, chroma * 2 + b - r, is_g), g - b, is_r)
    hue = hue.div_(chroma.clamp(min=1e-12)).add_(6 * shift.view(-1, 1, 1))  # grey pixels: 0 / C = 0
    k = hue.unsqueeze(1) + torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = k.sub_(torch.floor(k * (1 / 6)), alpha=6)  # the wave below has period 6: an off-by-one floor is harmless
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur with one sigma per sample: a separable kernel of 2 radius + 1 taps, reflected borders.

    Equal to torchvision's ``gaussian_blur(img, kernel_size=2 radius + 1, sigma)`` per sample (its 2-D kernel is the
    outer product of the same 1-D kernels; reflecting rows after the horizontal pass is the same as reflecting them
    first). Each pass is a sum of shifted slices weighted per sample: on the CPU that is several times faster than a
    grouped convolution with one kernel per sample, and on a GPU it is a few memory-bound kernels.

    Args:
        x: (N, C, H, W) float images.
        sigma: (N,) standard deviations in pixels.
        radius: kernel half-width; must be smaller than H and W (reflection).
    """
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).T.reshape(-1, len(x), 1, 1, 1)  # (taps, N, 1, 1, 1)
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = padded[..., :w] * kernel[0]
    for t in range(1, 2 * radius + 1):
        out.addcmul_(padded[..., t : t + w], kernel[t])
    padded = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = padded[..., :h, :] * kernel[0]
    for t in range(1, 2 * radius + 1):
        out.addcmul_(padded[..., t : t + h, :], kernel[t])
    return out


@dataclass
class AugmentParams:
    """The random parameters of a batch, one row per sample (NumPy arrays: cheap to index on the CPU).

    Attributes:
        jitter: (N,) bool, colour jitter applied.
        factors: (N, 4) float32 brightness, contrast, saturation factors and hue shift; the identity (1, 1, 1, 0)
            where not jittered.
        order: (N, 4) int, a permutation of 0..3 per sample: its k-th jitter operation, an index into `JITTER_OPS`.
        gray: (N,) bool, converted to grayscale.
        blur: (N,) bool, blurred.
        sigma: (N,) float32 blur standard deviation (drawn for every sample, used where `blur`).
        solarize: (N,) bool, solarised.
    """

    jitter: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray
    solarize: np.ndarray


class BatchAugment(nn.Module):
    """DINO's colour jitter, grayscale, blur, solarisation and normalisation on batches of crops, per-sample random.

    Args:
        mean: normalisation mean per channel.
        std: normalisation standard deviation per channel.
        n_global: how many leading crops are global crops (crop i < n_global gets `blur_p[i]`, `solarize_p[i]`).
        jitter: brightness, contrast, saturation, hue strengths (factors uniform in [max(0, 1 - s), 1 + s], hue
            shift in [-s, s]; official (0.4, 0.4, 0.2, 0.1)).
        jitter_p: probability of colour jitter (official 0.8).
        gray_p: probability of grayscale (official 0.2).
        blur_p: blur probability of global crop 1, global crop 2, ..., then of every local crop (official 1.0, 0.1,
            0.5).
        sigma: range of the blur standard deviation in pixels (official (0.1, 2.0); PIL's blur "radius" is sigma).
        solarize_p: solarisation probability, indexed like `blur_p` (official 0, 0.2, 0).
        seed: with a `step` in `forward`, the parameters come from a generator seeded with (seed, step), so a
            resumed run repeats them; otherwise from the global torch RNG (which DataLoader workers seed).
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        n_global: int = 2,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: Sequence[float] = (1.0, 0.1, 0.5),
        sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: Sequence[float] = (0.0, 0.2, 0.0),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if len(blur_p) != n_global + 1 or len(solarize_p) != n_global + 1:
            raise ValueError(f"blur_p and solarize_p need {n_global + 1} values: the global crops, then the locals")
        b, c, s, h = jitter
        self.low = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        self.high = np.array([1 + b, 1 + c, 1 + s, h])
        self.active = np.array(jitter) > 0  # torchvision's ColorJitter skips an operation of strength 0
        self.n_global, self.jitter_p, self.gray_p, self.sigma = n_global, jitter_p, gray_p, tuple(sigma)
        self.blur_p, self.solarize_p = np.array(blur_p, dtype=float), np.array(solarize_p, dtype=float)
        self.seed = seed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("gray", torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def sample(self, crop_index: Sequence[int], generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the parameters of one sample per entry of `crop_index`.

        Args:
            crop_index: which crop each sample is (below n_global: that global crop; from n_global on: a local
                crop), for the blur and solarisation probabilities.
            generator: a CPU generator, or None for the global torch RNG.
        """
        n = len(crop_index)
        which = np.minimum(np.asarray(crop_index, dtype=int), self.n_global)
        u = torch.rand(n, 9, generator=generator, dtype=torch.float64).numpy()
        order = torch.rand(n, 4, generator=generator).argsort(1).numpy()  # a uniform random permutation per row
        jitter = u[:, 0] < self.jitter_p
        factors = np.where(jitter[:, None], self.low + (self.high - self.low) * u[:, 1:5], (1.0, 1.0, 1.0, 0.0))
        return AugmentParams(
            jitter=jitter,
            factors=factors.astype(np.float32),
            order=order,
            gray=u[:, 5] < self.gray_p,
            blur=u[:, 6] < self.blur_p[which],
            sigma=(self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 7]).astype(np.float32),
            solarize=u[:, 8] < self.solarize_p[which],
        )

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Augment and normalise a batch with the given parameters.

        Args:
            x: (N, 3, H, W) uint8 (0..255) or float (0..1) images, on any device.
            p: the parameters of the N samples.

        Returns:
            (N, 3, H, W) float32, normalised.
        """
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float().clone()
        dev = x.device

        def to_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)

        def rows(mask: np.ndarray) -> np.ndarray:
            return np.flatnonzero(mask)

        # Brightness, contrast and saturation are blends clamp(f x + (1 - f) ref), with ref = 0, the mean luma or the
        # luma image: one pass over the whole batch runs the k-th operation of every sample whose k-th operation is
        # a blend, with per-sample coefficients (f = 1 and no reference leaves the others exactly unchanged). Hue is
        # the costly one: it runs once, on all its samples, between the blends before and after it in each order.
        op = p.order
        active = p.jitter[:, None] & self.active[op]  # (N, 4): the k-th operation of the sample runs
        blend = active & (op < 3)
        hue_at = np.argmax(op == 3, axis=1)  # (N,): position of hue in each order
        before = np.arange(4) < hue_at[:, None]
        sides = [[(k, on) for k in range(4) if (on := blend[:, k] & side[:, k]).any()] for side in (before, ~before)]
        passes, n_before = sides[0] + sides[1], len(sides[0])
        f = np.take_along_axis(p.factors, np.minimum(op, 2), 1)  # (N, 4): factor of the k-th operation
        coef = [(np.where(on, f[:, k], 1.0), np.where(on & (op[:, k] == 1), 1 - f[:, k], 0.0),
                 np.where(on & (op[:, k] == 2), 1 - f[:, k], 0.0)) for k, on in passes]  # fmt: skip
        coef = to_device(np.array(coef, dtype=np.float32).reshape(len(passes), 3, len(op), 1, 1, 1))
        hue = to_device(p.factors[:, 3])
        for j in range(len(passes) + 1):
            if j == n_before:
                _update(x, rows(active[np.arange(len(op)), hue_at]), dev, lambda v, i: adjust_hue(v, hue[i]))
            if j < len(passes):
                k, on = passes[j]
                c_mean = coef[j, 1] if (on & (op[:, k] == 1)).any() else None
                c_luma = coef[j, 2] if (on & (op[:, k] == 2)).any() else None
                _blend(x, coef[j, 0], c_mean, c_luma, self.gray)
        _update(x, rows(p.gray), dev, lambda v, i: grayscale(v).expand_as(v))
        blurred = rows(p.blur)
        if len(blurred):
            # Taps out to 3 sigma of the widest blur in the batch (99.7% of the mass; radius 6, torchvision's kernel
            # size 13, at sigma 2); reflection needs radius < size.
            radius = min(math.ceil(3 * float(p.sigma[blurred].max())), x.shape[-2] - 1, x.shape[-1] - 1)
            sigma = to_device(p.sigma)
            _update(x, blurred, dev, lambda v, i: gaussian_blur(v, sigma[i], radius) if radius > 0 else v)
        if p.solarize.any():
            flag = to_device(p.solarize).view(-1, 1, 1, 1)
            x = torch.where(flag & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
        return x.sub_(self.mean).div_(self.std)

    def augment(
        self, x: torch.Tensor, crop_index: Sequence[int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``apply(x, sample(crop_index, generator))``: x is (N, 3, H, W), sample i being crop `crop_index[i]`."""
        return self.apply(x, self.sample(crop_index, generator))

    def forward(self, crops: Sequence[torch.Tensor], step: int | None = None) -> list[torch.Tensor]:
        """Augment a multi-crop batch.

        Args:
            crops: global crops then local crops, each (B, 3, H, W) uint8 (or float in [0, 1]); crops of one size
                are concatenated and processed together.
            step: the training iteration; with the constructor's `seed`, makes the draw reproducible.

        Returns:
            The crops in the same order, float32 and normalised.
        """
        generator = None
        if self.seed is not None and step is not None:
            state = np.random.SeedSequence([self.seed, step]).generate_state(2, np.uint32)
            generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[1:]), []).append(i)
        out = list(crops)
        for members in groups.values():
            sizes = [len(crops[i]) for i in members]
            batch = crops[members[0]] if len(members) == 1 else torch.cat([crops[i] for i in members])
            index = np.repeat(members, sizes)
            for i, y in zip(members, self.augment(batch, index, generator).split(sizes)):
                out[i] = y
        return out


def _update(
    x: torch.Tensor, rows: np.ndarray, device: torch.device, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> None:
    """``x[rows] = fn(x[rows], rows)`` in place: no gather when every sample is selected, nothing when none is."""
    if len(rows) == 0:
        return
    idx = torch.from_numpy(rows).to(device, non_blocking=True)
    if len(rows) == len(x):
        x.copy_(fn(x, idx))
    else:
        x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


def _blend(
    x: torch.Tensor, f: torch.Tensor, c_mean: torch.Tensor | None, c_luma: torch.Tensor | None, gray: torch.Tensor
) -> None:
    """In place: x = clamp(f x + c_mean mean_luma(x) + c_luma luma(x), 0, 1), coefficients (N, 1, 1, 1) per sample."""
    mean = (x.mean((2, 3), keepdim=True) * gray).sum(1, keepdim=True) if c_mean is not None else None
    luma = grayscale(x) if c_luma is not None else None
    x.mul_(f)
    if mean is not None:
        x.add_(mean * c_mean)
    if luma is not None:
        x.addcmul_(luma, c_luma)
    x.clamp_(0, 1)
