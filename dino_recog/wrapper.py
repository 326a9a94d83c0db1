"""DINO as a loss on any backbone: `DINOWrapper(model)` (the API of the DINO-Wrapper seed, with DINO v1 and v2).

    dino_model = DINOWrapper(model)                    # model: (B, C, H, W) -> (B, D)
    original_output, dino_loss = dino_model(images)    # images: the normal batch
    loss = criterion(original_output) + dino_loss
    loss.backward(); optimizer.step(); dino_model.update_teacher()

The wrapper makes the multi-crop views of the batch on its device (batched random resized crops and flips, then the
DINO colour augmentation), runs the student (the wrapped model + a DINO head) on all of them and an EMA teacher on
the global ones, and returns the DINO loss (Caron et al. 2021) beside the model's own output on the original images.
Teacher momentum and temperature follow the official schedules over `epochs x len_train_loader` optimiser steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.batch_augment import BatchAugment
from .losses.dino import DINOLoss
from .losses.dinov2 import KoLeoLoss
from .models.dino import update_teacher
from .models.heads import DINOHead
from .schedules import cosine_schedule, linear_warmup

__all__ = ["DINOConf", "DINOWrapper", "random_resized_crops"]

Size = tuple[int, int]


def _pair(value: int | tuple[int, int] | list[int] | None, name: str) -> Size | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"DINOConf.{name} = {value!r}: expected an int or (height, width) of positive ints")


@dataclass
class DINOConf:
    """Settings of `DINOWrapper`; `version` picks the defaults of DINO v1 (official repo) or v2 (Oquab et al. 2023).

    Sizes are (height, width) or an int for a square; None for the global crop means the input images' size, and
    for the local crop 96/224 of the global one (the official ratio).
    """

    version: str = "v1"  # v1 | v2 (v2: teacher momentum 0.992, temperature 0.04 -> 0.07 over 30 epochs, KoLeo 0.1)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area fraction of the image in a global crop
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area fraction of the image in a local crop
    local_crops_number: int = 8  # local crops per image (0: only the two global crops)
    global_crop_size: int | tuple[int, int] | None = None  # (H, W) of the global crops; None: the input size
    local_crop_size: int | tuple[int, int] | None = None  # (H, W) of the local crops; None: 96/224 of the global
    out_dim: int = 65536  # prototypes K of the DINO head
    hidden_dim: int = 2048  # head MLP width
    bottleneck_dim: int = 256  # head bottleneck
    student_temp: float = 0.1
    teacher_temp: float | None = None  # final teacher temperature (v1 0.04, v2 0.07)
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int | None = None  # (v1 0, v2 30)
    momentum_teacher: float | None = None  # base EMA momentum, cosine to 1 (v1 0.996, v2 0.992)
    center_momentum: float = 0.9
    koleo_weight: float | None = None  # KoLeo regulariser on the student's global-crop features (v1 0, v2 0.1)
    loss_weight: float = 1.0  # multiplies the returned DINO loss
    epochs: int = 100  # length of the schedules, in epochs
    len_train_loader: int | None = None  # optimiser steps per epoch; None: constant momentum and temperature
    input_mean: tuple[float, float, float] | None = None  # the batch is normalised with this mean (None: in [0, 1])
    input_std: tuple[float, float, float] | None = None
    color_augment: bool = True  # colour jitter, grayscale, blur, solarisation as in DINO (on the device)

    def __post_init__(self) -> None:
        defaults = {"v1": (0.04, 0, 0.996, 0.0), "v2": (0.07, 30, 0.992, 0.1)}
        if self.version not in defaults:
            raise ValueError(f"DINOConf.version = {self.version!r}: expected 'v1' or 'v2'")
        temp, warm, momentum, koleo = defaults[self.version]
        self.teacher_temp = temp if self.teacher_temp is None else self.teacher_temp
        self.warmup_teacher_temp_epochs = (
            warm if self.warmup_teacher_temp_epochs is None else self.warmup_teacher_temp_epochs
        )
        self.momentum_teacher = momentum if self.momentum_teacher is None else self.momentum_teacher
        self.koleo_weight = koleo if self.koleo_weight is None else self.koleo_weight
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"DINOConf.{name} = {(lo, hi)}: expected 0 < min <= max <= 1")
        self.global_crop_size = _pair(self.global_crop_size, "global_crop_size")
        self.local_crop_size = _pair(self.local_crop_size, "local_crop_size")
        g, loc = self.global_crop_size, self.local_crop_size
        if g is not None and loc is not None and (loc[0] > g[0] or loc[1] > g[1]):
            raise ValueError(
                f"DINOConf.local_crop_size = {loc} is larger than global_crop_size = {g}; expected local <= global"
            )
        if self.local_crops_number < 0:
            raise ValueError(f"DINOConf.local_crops_number = {self.local_crops_number}: expected >= 0")
        if not 0 <= self.momentum_teacher <= 1:
            raise ValueError(f"DINOConf.momentum_teacher = {self.momentum_teacher}: expected a value in [0, 1]")
        if self.len_train_loader is not None and self.len_train_loader < 1:
            raise ValueError(f"DINOConf.len_train_loader = {self.len_train_loader}: expected >= 1 (len(train_loader))")
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("DINOConf.input_mean and input_std: give both (the batch's normalisation) or neither")
        for f in ("student_temp", "teacher_temp", "warmup_teacher_temp", "out_dim", "epochs"):
            if getattr(self, f) <= 0:
                raise ValueError(f"DINOConf.{f} = {getattr(self, f)}: expected a positive value")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def random_resized_crops(
    images: torch.Tensor, size: Size, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """A random resized crop and a horizontal flip with probability 1/2 for every image, batched with one
    `grid_sample` (bilinear).

    Each crop covers an area fraction drawn from U(scale) with log-uniform aspect (relative to the output's aspect,
    so person crops are not stretched) and a uniform position. Unlike torchvision's rejection sampling, a box that
    does not fit is shrunk to fit, which moves a little probability mass towards smaller crops on extreme draws.

    Args:
        images: (B, C, H, W) float.
        size: (h, w) of the output.

    Returns:
        (B, C, h, w).
    """
    b, _, height, width = images.shape
    dev = images.device
    area = torch.empty(b, device=dev).uniform_(*scale)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r) * (size[1] / size[0]) / (width / height)  # crop w/h relative to the image's
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    h = (area / w).clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * (1 - w) + w / 2) * 2 - 1  # centres in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class DINOWrapper(nn.Module):
    """DINO self-distillation around any model that maps (B, C, H, W) images to (B, D) features.

    `forward(images)` returns `(model(images), dino_loss)`; call `update_teacher()` after each optimiser step. The
    student is the wrapped model itself (its weights are shared, not copied) followed by a DINO head; the teacher is
    an EMA copy of both. In eval mode the loss is 0 and no crops are made.

    Args:
        model: the network to train; its output on the original images is returned unchanged.
        conf: DINOConf (v1 defaults when omitted).
        in_dim: D of the model's output; found by one forward of a dummy batch when None.
    """

    def __init__(self, model: nn.Module, conf: DINOConf | None = None, in_dim: int | None = None) -> None:
        super().__init__()
        self.conf = conf = conf or DINOConf()
        self.model = model
        if in_dim is None:
            in_dim = self._probe_dim()
        self.head = DINOHead(in_dim, conf.out_dim, hidden_dim=conf.hidden_dim, bottleneck_dim=conf.bottleneck_dim)
        self.teacher_model = copy.deepcopy(model)
        self.teacher_head = copy.deepcopy(self.head)
        for p in [*self.teacher_model.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad = False
        self.loss_fn = DINOLoss(conf.out_dim, 2, conf.student_temp, conf.center_momentum)
        self.koleo = KoLeoLoss()
        identity = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        mean, std = (conf.input_mean, conf.input_std) if conf.input_mean is not None else identity
        self.augment = BatchAugment(mean, std)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimiser steps taken (schedules)

    @torch.no_grad()
    def _probe_dim(self) -> int:
        size = self.conf.global_crop_size or (224, 224)
        p = next(self.model.parameters(), None)
        was = self.model.training
        self.model.eval()
        out = self.model(torch.zeros(2, 3, *size, device=p.device if p is not None else "cpu"))
        self.model.train(was)
        if out.ndim != 2:
            raise ValueError(f"DINOWrapper: the model returns shape {tuple(out.shape)}; expected (B, D) features")
        return out.shape[1]

    # schedules (pure functions of the step, as in the official code)
    def _total_steps(self) -> int | None:
        c = self.conf
        return c.epochs * c.len_train_loader if c.len_train_loader else None

    def teacher_temperature(self) -> float:
        c = self.conf
        if not c.len_train_loader:
            return c.teacher_temp
        return linear_warmup(int(self.step), c.warmup_teacher_temp_epochs * c.len_train_loader,
                             c.warmup_teacher_temp, c.teacher_temp)  # fmt: skip

    def momentum(self) -> float:
        total = self._total_steps()
        if total is None:
            return self.conf.momentum_teacher
        return cosine_schedule(min(int(self.step), total), total, self.conf.momentum_teacher, 1.0)

    @torch.no_grad()
    def make_crops(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Two global and `local_crops_number` local views of every image, crop-major, on the images' device."""
        c = self.conf
        g_size = c.global_crop_size or tuple(images.shape[-2:])
        l_size = c.local_crop_size or (max(1, round(g_size[0] * 96 / 224)), max(1, round(g_size[1] * 96 / 224)))
        x = images.float()
        mean = std = None
        if c.input_mean is not None:
            mean = x.new_tensor(c.input_mean).view(1, -1, 1, 1)
            std = x.new_tensor(c.input_std).view(1, -1, 1, 1)
            x = x * std + mean  # back to [0, 1] for the colour operations
        views = [random_resized_crops(x, g_size, c.global_crops_scale) for _ in range(2)]
        views += [random_resized_crops(x, l_size, c.local_crops_scale) for _ in range(c.local_crops_number)]
        if c.color_augment:  # per-view probabilities of DINO's pipeline, then the batch's own normalisation
            views = self.augment(views)
        elif mean is not None:
            views = [(v - mean) / std for v in views]
        return [v.to(images.dtype) for v in views]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(images)
        if not self.training:
            return output, output.new_zeros(())
        return output, self.loss(images)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The (weighted) DINO loss of the batch alone, without the model's output on the original images."""
        crops = self.make_crops(images)
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_model(torch.cat(crops[:2])))  # (2B, K)
        feats = [self.model(torch.cat(crops[:2]))]  # (2B, D): crops of one size in one call
        if len(crops) > 2:
            feats.append(self.model(torch.cat(crops[2:])))
        student_feats = torch.cat(feats)
        loss = self.loss_fn(self.head(student_feats), teacher_out, self.teacher_temperature())
        if self.conf.koleo_weight:
            b = images.shape[0]
            global_feats = student_feats[: 2 * b].float()
            loss = loss + self.conf.koleo_weight * (self.koleo(global_feats[:b]) + self.koleo(global_feats[b:])) / 2
        return self.conf.loss_weight * loss

    @torch.no_grad()
    def update_teacher(self) -> float:
        """EMA step of the teacher towards the student (call after `optimizer.step()`); returns the momentum used."""
        m = self.momentum()
        update_teacher(self.model, self.teacher_model, m)
        update_teacher(self.head, self.teacher_head, m)
        self.step += 1
        return m
