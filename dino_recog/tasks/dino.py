"""Stage 1 as one module: DINO (Caron et al. 2021) or DINOv2 (Oquab et al. 2023) self-distillation.

`DinoTask` owns everything stage 1 trains or updates: the student (backbone + DINO head, with v2 a mask token and
an optional iBOT head), its EMA teacher, the DINO loss with its centre, and with `dino.version: v2` the iBOT loss
(its own centre), KoLeo and the block-mask sampler. `engine.train_one_epoch` runs it like any other task.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import config as C
from .. import distributed as dist
from .. import parallel
from .. import weights as ckpt
from ..checkpoint import load_checkpoint
from ..data.batch_augment import BatchAugment
from ..data.device_decode import DeviceCrops, EncodedBatch
from ..data.masking import BlockMaskGenerator, sample_batch_masks
from ..losses.dino import DINOLoss, collapse_stats
from ..losses.dinov2 import IBOTPatchLoss, KoLeoLoss
from ..models import BackboneSpec, DINOHead, MaskedMultiCropNet, MultiCropNet, update_teacher
from ..optim import param_groups
from ..schedules import cosine_schedule, linear_warmup, scaled_lr
from ..weight_formats import extract_head_states

__all__ = [
    "DinoStep", "DinoTask", "DinoV2Terms", "build_dino_task", "collapse_warning", "dino_schedule", "effective_batch",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class DinoStep:
    """The scheduled values of one DINO iteration."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool
    iteration: int = 0


@dataclass
class DinoV2Terms:
    """What DINOv2 adds to a DINO iteration: block masks on the student's global crops, the iBOT masked-patch loss
    and the KoLeo regulariser, with their weights."""

    ibot_loss: IBOTPatchLoss
    mask_generator: BlockMaskGenerator  # over the patch grid of a global crop
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1


class DinoTask(nn.Module):
    """Student, teacher and DINO loss (plus the DINOv2 terms with `v2`).

    Args:
        student, teacher: MultiCropNets (MaskedMultiCropNets with `v2`); the teacher gets no gradients.
        loss: the DINO loss with its centre.
        v2: the DINOv2 terms, or None for DINO v1.
        augment: the photometric half of the augmentation run on the device (`crops.gpu_augment`), or None.
        decode: with `crops.decode: gpu`, what decodes, crops and resizes the images on the device (the batch's first
            field is then an :class:`EncodedBatch`); needs `augment`.
    """

    name = "DINO"  # in messages

    def __init__(self, student: MultiCropNet, teacher: MultiCropNet, loss: DINOLoss, v2: DinoV2Terms | None = None,
                 augment: BatchAugment | None = None, decode: DeviceCrops | None = None) -> None:  # fmt: skip
        super().__init__()
        if decode is not None and augment is None:
            raise ValueError("decode (crops.decode: gpu) makes uint8 crops: it needs the device-side augment")
        self.decode = decode
        self.student, self.teacher, self.dino_loss = student, teacher, loss
        self.ibot_loss = v2.ibot_loss if v2 is not None else None
        self.koleo_loss = KoLeoLoss()
        self.v2, self.augment = v2, augment
        # the centres take one EMA step per optimiser step (`after_step`), with the mean of all its micro-batches
        # (gradient accumulation): each micro-batch's loss then sees the centre the whole batch would
        for centred in (loss, self.ibot_loss):
            if centred is not None:
                centred.defer_center = True
        self._last: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._monitor: deque[dict[str, float]] = deque(maxlen=COLLAPSE_WINDOW)  # the last log intervals' monitors
        self._collapsed = False

    @property
    def trainable(self) -> nn.Module:
        return self.student  # what DDP wraps (`parallel.wrap_ddp`); the teacher stays outside

    def fsdp_roots(self) -> tuple[nn.Module, nn.Module]:
        """What `parallel.wrap_fsdp` shards: the student, and the teacher the same way (a shard-local EMA)."""
        return self.student, self.teacher

    # --- what the loop calls -----------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """The state a checkpoint holds (its keys), resume restores and the cross-rank check compares."""
        parts = {"student": self.student, "teacher": self.teacher, "dino_loss": self.dino_loss}
        if self.ibot_loss is not None:
            parts["ibot_loss"] = self.ibot_loss
        return parts

    def param_groups(self, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
        return param_groups(self.student, layer_decay, patch_embed_lr_mult)

    def forward(self, batch: tuple, step: DinoStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One iteration's loss: teacher on the global crops, student on all crops (Algorithm 1 of the paper).

        Returns:
            (loss, {}) for v1; (loss, {"dino", "ibot", "koleo"} unweighted) for v2.
        """
        device = self.dino_loss.center.device
        if isinstance(batch[0], EncodedBatch):  # crops.decode: gpu
            crops = self.decode(batch[0], device)
        else:
            crops = [c.to(device, non_blocking=True) for c in batch[0]]
        if self.augment is not None:
            crops = self.augment(crops, step.iteration)
        student = parallel.ddp_module(self)
        n_global = self.dino_loss.n_global_crops
        terms: dict[str, torch.Tensor] = {}
        if self.v2 is None:
            with torch.no_grad():
                teacher_out = self.teacher(crops[:n_global])  # (2B, K)
            student_out = student(crops)  # (n_crops * B, K)
            loss = self.dino_loss(student_out, teacher_out, step.teacher_temp)
        else:
            loss, terms, student_out, teacher_out = self._dinov2(student, crops, step.teacher_temp)
        self._last = (student_out.detach(), teacher_out, step.teacher_temp)
        return loss, terms

    def _dinov2(self, student: nn.Module, crops: list[torch.Tensor], teacher_temp: float):
        """loss = DINO + ibot_weight x iBOT + koleo_weight x KoLeo.

        Masks are drawn for the n_global x B global crops from torch's generator (seeding torch fixes them); the
        teacher sees the unmasked global crops, the student the masked ones and the local crops. KoLeo is summed
        over the global crops, each crop's batch on its own, as DINOv2 does.
        """
        v2, n_global = self.v2, self.dino_loss.n_global_crops
        rng = random.Random(int(torch.randint(2**62, ()).item()))
        masks = sample_batch_masks(v2.mask_generator, n_global * crops[0].shape[0], v2.mask_ratio_min_max,
                                   v2.mask_sample_probability, rng).to(crops[0].device)  # fmt: skip
        with torch.no_grad():
            t = self.teacher(crops[:n_global], masks, mask_inputs=False)
        s = student(crops, masks)
        terms = {
            "dino": self.dino_loss(s["cls"], t["cls"], teacher_temp),
            "ibot": self.ibot_loss(s["patch"], t["patch"], masks, teacher_temp),
            "koleo": sum(self.koleo_loss(f) for f in s["cls_features"].chunk(n_global)),
        }
        loss = terms["dino"] + v2.ibot_weight * terms["ibot"] + v2.koleo_weight * terms["koleo"]
        return loss, terms, s["cls"], t["cls"]

    def cancel_gradients(self, step: DinoStep) -> None:
        """The head's last layer gets no update in the first epochs (`dino.freeze_last_layer`), as in DINO."""
        if step.freeze_last_layer:
            for n, p in self.student.named_parameters():
                if n.startswith(("head.last_layer", "ibot_head.last_layer")):
                    p.grad = None

    @torch.no_grad()
    def after_step(self, step: DinoStep) -> None:
        """The teacher takes an EMA step towards the student; the centres one with the step's teacher outputs."""
        update_teacher(self.student, self.teacher, step.momentum)
        self.dino_loss.apply_center()
        if self.ibot_loss is not None:
            self.ibot_loss.apply_center()

    def log_stats(self, step: DinoStep, terms: dict[str, float], loss: float, epoch: int) -> dict[str, float]:
        """At log intervals: the collapse monitors of the last batch (and a warning when they say collapse)."""
        student_out, teacher_out, temp = self._last
        loss_fn = self.dino_loss
        stats = collapse_stats(student_out, teacher_out, loss_fn.center, loss_fn.student_temp, temp, loss_fn.centering)
        self._monitor.append({"epoch": epoch, "loss": terms.get("dino", loss), **stats})
        message = collapse_warning(self._monitor, teacher_out.shape[-1])
        if message is not None and not self._collapsed:  # once per onset, not at every interval it lasts
            log.warning("iteration %d: %s", step.iteration, message)
        self._collapsed = message is not None
        return {"weight_decay": step.weight_decay, "momentum": step.momentum, "teacher_temp": temp, **stats}

    def epoch_stats(self) -> dict[str, float]:
        """With `crops.decode: gpu`: the images the device could not decode this epoch (`skipped_on_device`; those
        the workers could not read are in the loop's `skipped_images`)."""
        if self.decode is None:
            return {}
        skipped, self.decode.skipped = self.decode.skipped, 0
        return {"skipped_on_device": skipped}


# A collapse is a state, not a value: one log interval near ln K can be noise (the first epochs of a healthy run pass
# through it), so the warning reads the last COLLAPSE_WINDOW log intervals and fires when all of them agree.
COLLAPSE_WINDOW = 5
UNIFORM_ENTROPY_RATIO = 0.9  # teacher entropy / ln K at or above which the target is (nearly) flat
UNIFORM_LOSS_RATIO = 0.9  # loss / ln K at or above which the student learns nothing but that flat target
ONE_DIM_BATCH_ENTROPY = 0.05  # batch entropy (nats) below which the whole batch goes to one prototype


def collapse_warning(history: Sequence[Mapping[str, float]], out_dim: int, window: int = COLLAPSE_WINDOW) -> str | None:
    """The collapse the recent monitor values show, as a message, or None.

    A pure function of the log records: the two collapse modes of the DINO paper (section 5.3), each required to hold
    at every one of the last `window` log intervals after the first epoch (whose start near ln K is by construction):

    - uniform: teacher entropy >= 0.9 ln K (a flat target) and loss >= 0.9 ln K (the student matches it). The loss
      alone is not enough (it is h(P_t) + KL, large early on), nor is a single KL threshold: the old demo recipe sat
      at entropy 0.95 ln K and loss 0.98 ln K with a KL of 0.07-0.09 from epoch 4 to 16.
    - one-dimension: the batch-averaged teacher distribution has entropy < 0.05 (every image on one prototype).

    Args:
        history: the log records, oldest first, each with `epoch`, `loss`, `entropy_ratio` and
            `teacher_batch_entropy` (as `collapse_stats` and the training loop write them).
        out_dim: K, the number of prototypes.
        window: the number of consecutive log intervals the state must last.

    Returns:
        A one-line description of the collapse, or None when the last `window` records do not all show one.
    """
    recent = list(history)[-window:]
    if window < 1 or len(recent) < window or any(r["epoch"] < 1 for r in recent):
        return None
    ln_k = math.log(out_dim)
    if all(r["entropy_ratio"] >= UNIFORM_ENTROPY_RATIO and r["loss"] >= UNIFORM_LOSS_RATIO * ln_k for r in recent):
        return (
            f"uniform collapse: for the last {window} log intervals the teacher entropy was "
            f"{min(r['entropy_ratio'] for r in recent):.0%}-{max(r['entropy_ratio'] for r in recent):.0%} of ln K and "
            f"the loss {min(r['loss'] for r in recent):.3f}-{max(r['loss'] for r in recent):.3f} against "
            f"ln K = {ln_k:.3f}: the teacher's targets are nearly flat, with little per-image signal (docs/stages.md)"
        )
    if all(r["teacher_batch_entropy"] < ONE_DIM_BATCH_ENTROPY for r in recent):
        return (
            f"one-dimension collapse: for the last {window} log intervals the teacher put the whole batch on one "
            f"prototype (batch entropy <= {max(r['teacher_batch_entropy'] for r in recent):.3f}; check the centring)"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------------
# From the config


def _net(cfg: C.DinoConfig, spec: BackboneSpec, drop_path: float) -> MultiCropNet:
    m = cfg.model
    backbone, dim = spec.build(drop_path)  # what the export describes, exactly
    head = DINOHead(dim, m.out_dim, m.use_bn_in_head, m.norm_last_layer, hidden_dim=m.hidden_dim,
                    bottleneck_dim=m.bottleneck_dim)  # fmt: skip
    if cfg.dino.version == "v1":
        return MultiCropNet(backbone, head)
    ibot_head = DINOHead(dim, m.out_dim, False, m.norm_last_layer, hidden_dim=m.hidden_dim,
                         bottleneck_dim=m.bottleneck_dim) if cfg.dino.separate_ibot_head else None  # fmt: skip
    return MaskedMultiCropNet(backbone, head, ibot_head)


def load_pretrained(net: MultiCropNet, spec: BackboneSpec, path: str) -> None:
    """Continued pre-training: `net` starts from the weights in `path` (ours, official DINO / DINOv2, timm; the
    teacher network of a student/teacher checkpoint). The backbone must load whole (a missing tensor is an error);
    each head and DINOv2's mask token load when the file has them with the same shapes, and start fresh otherwise,
    which the log says.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file's own description (ours carry one) is another architecture than `model.*`, or
            the weights do not fit the backbone.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found; point it at a checkpoint or set "
                                "model.pretrained='' to start from random weights")  # fmt: skip
    own = ckpt.read_backbone_spec(path)
    if own is not None and own.architecture() != spec.architecture():
        theirs, ours = own.architecture(), spec.architecture()
        diff = ", ".join(f"model.{k}={theirs[k]} (now {ours[k]})" for k in theirs if theirs[k] != ours[k])
        raise ckpt.CheckpointError(f"model.pretrained: {path} holds another backbone; set {diff}")
    ckpt.load_backbone_weights(net.backbone, path, key="teacher", switch=None)
    found = extract_head_states(load_checkpoint(path), "teacher")
    for name in ("head", "ibot_head", "mask_token"):
        target = getattr(net, name, None)
        if target is None:
            continue
        own_state = {"": target} if name == "mask_token" else target.state_dict()
        state = {"": found[name]} if name == "mask_token" and name in found else found.get(name, {})
        if set(state) == set(own_state) and all(state[k].shape == v.shape for k, v in own_state.items()):
            if name == "mask_token":
                with torch.no_grad():
                    target.copy_(state[""])
            else:
                target.load_state_dict(state)
            log.info("model.pretrained: %s loaded from %s", name, path)
        else:
            why = "not in the file" if not state else "of another shape in the file"
            log.info("model.pretrained: %s starts fresh (%s)", name, why)


def build_dino_task(cfg: C.DinoConfig) -> DinoTask:
    """Student (with stochastic depth) and teacher (without, starting as a copy of the student; both from
    `model.pretrained` when set), the DINO loss, with v2 the iBOT loss, KoLeo and the mask sampler over the global
    crops' patch grid, and with `crops.gpu_augment` (or `crops.decode: gpu`) the device-side photometric augmentation
    (seeded by seed + rank and the iteration only), with `crops.decode: gpu` the device-side decoding and cropping."""
    d = cfg.dino
    spec = BackboneSpec.from_dino_config(cfg)
    student, teacher = _net(cfg, spec, cfg.model.drop_path_rate), _net(cfg, spec, 0.0)
    if cfg.model.pretrained:
        load_pretrained(student, spec, cfg.model.pretrained)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss = DINOLoss(cfg.model.out_dim, 2, d.student_temp, d.center_momentum, d.centering)
    v2 = None
    if d.version == "v2":
        patch = spec.patch_size  # a timm model's own
        grid = (cfg.crops.global_crops_size[0] // patch, cfg.crops.global_crops_size[1] // patch)  # (h, w) patches
        v2 = DinoV2Terms(IBOTPatchLoss(cfg.model.out_dim, d.student_temp, d.center_momentum, d.centering),
                         BlockMaskGenerator(grid), tuple(d.mask_ratio_min_max), d.mask_sample_probability,
                         d.ibot_weight, d.koleo_weight)  # fmt: skip
    augment, on_device = None, cfg.crops.decode == "gpu"
    if cfg.crops.gpu_augment or on_device:  # decode: gpu makes uint8 crops on the device: their colours are done there
        augment = BatchAugment(cfg.crops.mean, cfg.crops.std, seed=cfg.run.seed + dist.get_rank())
    return DinoTask(student, teacher, loss, v2, augment, DeviceCrops() if on_device else None)


def effective_batch(cfg: C.DinoConfig) -> int:
    """Images per optimiser step: batch_size_per_gpu x processes x train.accumulate_steps (what scales the lr)."""
    return cfg.data.batch_size_per_gpu * dist.get_world_size() * cfg.train.accumulate_steps


def dino_schedule(cfg: C.DinoConfig, steps_per_epoch: int):
    """iteration -> DinoStep, from the pure schedule functions (lr scaled linearly with the effective batch);
    `steps_per_epoch` counts optimiser steps."""
    t, d = cfg.train, cfg.dino
    total = t.epochs * steps_per_epoch
    lr = scaled_lr(t.lr, effective_batch(cfg))

    def schedule(it: int) -> DinoStep:
        return DinoStep(
            lr=cosine_schedule(it, total, lr, t.min_lr, t.warmup_epochs * steps_per_epoch),
            weight_decay=cosine_schedule(it, total, t.weight_decay, t.weight_decay_end),
            momentum=cosine_schedule(it, total, d.momentum_teacher, 1.0),
            teacher_temp=linear_warmup(
                it, d.warmup_teacher_temp_epochs * steps_per_epoch, d.warmup_teacher_temp, d.teacher_temp
            ),
            freeze_last_layer=it < d.freeze_last_layer * steps_per_epoch,
            iteration=it,
        )

    return schedule
