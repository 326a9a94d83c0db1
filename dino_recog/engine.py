"""Training loop bodies. No engine class, no hooks: one function per stage, called once per epoch."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from . import distributed as dist
from .data.masking import BlockMaskGenerator, sample_batch_masks
from .losses.dino import DINOLoss, collapse_stats
from .losses.dinov2 import IBOTPatchLoss, KoLeoLoss
from .models.dino import update_teacher
from .optim import set_schedule
from .runlog import RunLog

__all__ = [
    "DinoStep",
    "DinoV2Terms",
    "NonFiniteLossError",
    "RecogLosses",
    "autocast_context",
    "train_one_epoch_dino",
    "train_one_epoch_recog",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing is saved from this state."""


@dataclass
class DinoStep:
    """The scheduled values of one DINO iteration."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


@dataclass
class DinoV2Terms:
    """What DINOv2 (Oquab et al. 2023) adds to a DINO iteration: masks on the student's global crops, the iBOT
    masked-patch loss and the KoLeo regulariser, with their weights."""

    ibot_loss: IBOTPatchLoss
    mask_generator: BlockMaskGenerator  # over the patch grid of a global crop
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_loss: KoLeoLoss = field(default_factory=KoLeoLoss)


def dinov2_losses(
    student: nn.Module,
    teacher: nn.Module,
    crops: list[torch.Tensor],
    loss_fn: DINOLoss,
    v2: DinoV2Terms,
    teacher_temp: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One DINOv2 forward: loss = DINO + ibot_weight x iBOT + koleo_weight x KoLeo.

    Masks are drawn for the n_global x B global crops (`sample_batch_masks`, from torch's generator so seeding torch
    fixes them); the teacher sees the unmasked global crops, the student the masked ones and the local crops. KoLeo
    is summed over the global crops, each crop's batch on its own, as DINOv2 does.

    Args:
        student, teacher: MaskedMultiCropNets (the student possibly DDP-wrapped).

    Returns:
        (loss, {"dino", "ibot", "koleo"} unweighted terms, student CLS outputs (n_crops x B, K), teacher CLS outputs
        (n_global x B, K)).
    """
    n_global = loss_fn.n_global_crops
    rng = random.Random(int(torch.randint(2**62, ()).item()))
    masks = sample_batch_masks(v2.mask_generator, n_global * crops[0].shape[0], v2.mask_ratio_min_max,
                               v2.mask_sample_probability, rng).to(crops[0].device)  # fmt: skip
    with torch.no_grad():
        t = teacher(crops[:n_global], masks, mask_inputs=False)
    s = student(crops, masks)
    terms = {
        "dino": loss_fn(s["cls"], t["cls"], teacher_temp),
        "ibot": v2.ibot_loss(s["patch"], t["patch"], masks, teacher_temp),
        "koleo": sum(v2.koleo_loss(f) for f in s["cls_features"].chunk(n_global)),
    }
    loss = terms["dino"] + v2.ibot_weight * terms["ibot"] + v2.koleo_weight * terms["koleo"]
    return loss, terms, s["cls"], t["cls"]


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it, fp16 when asked, fp32 otherwise (and always on the CPU)."""
    if device.type != "cuda" or amp == "fp32":
        return contextlib.nullcontext()
    if amp == "bf16" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch_dino(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: Callable[[int], DinoStep],
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    amp: str,
    clip_grad: float,
    runlog: RunLog,
    log_every: int = 50,
    augment: Callable[[list[torch.Tensor], int], list[torch.Tensor]] | None = None,
    v2: DinoV2Terms | None = None,
    start_step: int = 0,
    nonfinite_budget: int = 0,
    save_every_steps: int = 0,
    save_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One epoch of DINO (Caron et al. 2021, Algorithm 1), or of DINOv2 with `v2`.

    For each batch of multi-crop views: teacher on the 2 global crops, student on all crops, DINO loss (which updates
    the centre), backward, gradient clipping, the head's last layer frozen in the first epochs, optimiser step, then
    the teacher takes an EMA step towards the student. lr, weight decay, teacher momentum and temperature come from
    `schedule(iteration)`.

    Args:
        student: the DDP-wrapped (or plain) student MultiCropNet.
        teacher: the teacher MultiCropNet (never DDP-wrapped, no gradients).
        loader: yields ((crops, pids, camids, index), n_skipped) as `collate_skip_none` makes them; when resuming
            mid-epoch it starts at batch `start_step` (see `SeededBatches`).
        augment: `(crops, iteration) -> crops` applied on the device before the forward (the photometric half of
            the augmentation with `crops.gpu_augment`, e.g. a `BatchAugment`); None when the workers did it all.
        v2: the DINOv2 terms (student and teacher are then MaskedMultiCropNets); see `dinov2_losses`.
        start_step: the index in the epoch of the loader's first batch.
        nonfinite_budget: how many more steps with a NaN or infinite loss may be skipped (no optimiser, EMA or centre
            update); one more raises NonFiniteLossError. The decision is taken on all ranks together.
        save_every_steps, save_checkpoint: `save_checkpoint(steps_done_in_epoch)` is called after every
            `save_every_steps`-th iteration (counted over the run) that does not end the epoch.

    Returns:
        Epoch averages: loss (and with v2 its terms dino, ibot, koleo); the numbers of skipped (undecodable) images
        and of skipped non-finite steps.
    """
    student.train()
    teacher.train()  # as in the official code: BatchNorm (ResNet, BN head) normalises with the batch statistics
    net = _unwrap(student)
    last_layer = [p for n, p in net.named_parameters() if n.startswith(("head.last_layer", "ibot_head.last_layer"))]
    loss_sum, n_loss, skipped, nonfinite = torch.zeros((), device=device), 0, 0, 0
    term_sums: dict[str, torch.Tensor] = {}
    # what a forward pass changes: BatchNorm statistics, the DINO (and iBOT) centres
    buffers = _buffers(net, teacher, loss_fn, *([v2.ibot_loss] if v2 is not None else []))
    watch = _NonFiniteWatch("DINO", epoch, device)
    t_start, images = time.perf_counter(), 0
    bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", disable=not dist.is_main_process(),
               leave=False)  # fmt: skip
    for i, (batch, n_bad) in enumerate(loader, start_step):
        skipped += n_bad
        if batch is None:  # every image of the batch was undecodable
            continue
        it = epoch * steps_per_epoch + i
        s = schedule(it)
        set_schedule(optimizer, s.lr, s.weight_decay)
        crops = [c.to(device, non_blocking=True) for c in batch[0]]
        if augment is not None:
            crops = augment(crops, it)
        saved = [b.clone() for b in buffers] if nonfinite_budget > nonfinite else None

        terms: dict[str, torch.Tensor] = {}
        with autocast_context(device, amp):
            if v2 is not None:
                loss, terms, student_out, teacher_out = dinov2_losses(student, teacher, crops, loss_fn, v2,
                                                                      s.teacher_temp)  # fmt: skip
            else:
                with torch.no_grad():
                    teacher_out = teacher(crops[: loss_fn.n_global_crops])  # (2B, K)
                student_out = student(crops)  # (n_crops * B, K)
                loss = loss_fn(student_out, teacher_out, s.teacher_temp)

        if nonfinite_budget > nonfinite:  # a step may still be skipped: decide now, on all ranks (one host sync)
            if _any_nonfinite(loss):
                _skip_or_raise("DINO", epoch, it, {"loss": loss, **terms}, nonfinite, nonfinite_budget, buffers, saved)
                nonfinite += 1
                continue
        else:  # no sync in the hot loop: checked at log intervals, before checkpoints and at the end of the epoch
            watch.record(it, {"loss": loss, **terms})
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
        if s.freeze_last_layer:
            for p in last_layer:
                p.grad = None
        scaler.step(optimizer)
        scaler.update()
        update_teacher(net, teacher, s.momentum)

        loss_sum += loss.detach()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + v.detach().float()
        n_loss += 1
        images += crops[0].shape[0] * dist.get_world_size()
        if it % log_every == 0:
            watch.check()
            stats = collapse_stats(
                student_out.detach(), teacher_out, loss_fn.center, loss_fn.student_temp, s.teacher_temp
            )
            value = loss.item()  # one sync every log_every iterations only
            term_values = {k: v.item() for k, v in terms.items()}
            rate = images / (time.perf_counter() - t_start)
            runlog.write(
                "train", it, epoch=epoch, loss=value, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum,
                teacher_temp=s.teacher_temp, images_per_s=rate, **stats, **term_values,
            )  # fmt: skip
            _warn_collapse(term_values.get("dino", value), stats, it, epoch, teacher_out.shape[-1])
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{s.lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(1)
        if save_checkpoint is not None and save_every_steps and (it + 1) % save_every_steps == 0:
            if i + 1 < steps_per_epoch:  # the end of the epoch has a checkpoint of its own
                watch.check()  # never a checkpoint from a non-finite state
                save_checkpoint(i + 1)
    bar.close()
    watch.check()
    loss_avg = dist.all_reduce_mean(loss_sum / max(n_loss, 1)).item()
    term_avgs = {k: dist.all_reduce_mean(v / max(n_loss, 1)).item() for k, v in term_sums.items()}
    skipped = int(dist.all_reduce_sum(torch.tensor([skipped], device=device)).item())
    if skipped:
        log.warning("epoch %d: skipped %d undecodable training images (see the warnings above)", epoch, skipped)
    return {"loss": loss_avg, **term_avgs, "skipped_images": skipped, "nonfinite_steps": nonfinite,
            "images_per_s": images / (time.perf_counter() - t_start)}  # fmt: skip


@dataclass
class RecogLosses:
    """The stage-2 loss terms that are switched on, with their weights (a weight of 0 means the term is absent)."""

    terms: dict[str, tuple[float, nn.Module]]  # name -> (weight, loss); see train_recog.build_losses
    teacher: nn.Module | None = None  # frozen recognition model for distillation

    def __call__(self, out: dict, labels: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted sum of the terms. CE / distillation read the classifier logits, triplet / centre the feature
        before the BN neck, CosFace / ArcFace the feature after it (they bring their own class weights)."""
        values = {}
        for name, (_weight, fn) in self.terms.items():
            if name == "ce":
                values[name] = fn(out["logits"], labels)
            elif name == "distill":
                with torch.no_grad():
                    teacher_logits = self.teacher(images)["logits"]
                values[name] = fn(out["logits"], labels, teacher_logits)
            elif name in ("triplet", "center"):
                values[name] = fn(out["feat"], labels)
            elif name == "dino":  # DINOWrapper around the backbone: a label-free term on the same images
                values[name] = fn.loss(images)
            else:  # cosface, arcface
                values[name] = fn(out["neck"], labels)
        total = sum(self.terms[k][0] * v for k, v in values.items())
        return total, values

    def parameters(self) -> list[nn.Parameter]:
        """The trainable weights the loss terms hold themselves (outside the recognition model and its DDP)."""
        params = []
        for name, (_, fn) in self.terms.items():
            module = fn.head if name == "dino" else fn  # the DINO wrapper's student is the model's own backbone
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def after_step(self) -> None:
        """After each optimiser step: the EMA teacher of the auxiliary DINO term follows the backbone."""
        if "dino" in self.terms:
            self.terms["dino"][1].update_teacher()


def train_one_epoch_recog(
    model: nn.Module,
    losses: RecogLosses,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: Callable[[int], float],
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    amp: str,
    clip_grad: float,
    runlog: RunLog,
    log_every: int = 50,
    center_optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    nonfinite_budget: int = 0,
    save_every_steps: int = 0,
    save_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One epoch of supervised re-identification training on P x K batches.

    Args:
        model: the DDP-wrapped (or plain) ReIDModel, in train mode returning {"feat", "neck", "logits"}.
        schedule: iteration -> learning rate (times each group's lr_scale).
        center_optimizer: the separate optimiser of the centre-loss centres (BoT), if that term is on.
        start_step, nonfinite_budget, save_every_steps, save_checkpoint: as in `train_one_epoch_dino`.

    Returns:
        Epoch averages of the total loss and of each term, the batch accuracy of the classifier, the numbers of
        skipped images and of skipped non-finite steps.
    """
    model.train()
    loss_params = losses.parameters()
    sums: dict[str, torch.Tensor] = {}
    correct = seen = n = skipped = nonfinite = 0
    # what a forward pass changes: BatchNorm statistics (of the distillation teacher too, which runs in train mode)
    buffers = _buffers(model, *(fn for _, fn in losses.terms.values()), *filter(None, [losses.teacher]))
    watch = _NonFiniteWatch("re-id", epoch, device)
    t_start, images = time.perf_counter(), 0
    bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", disable=not dist.is_main_process(),
               leave=False)  # fmt: skip
    for i, (batch, n_bad) in enumerate(loader, start_step):
        skipped += n_bad
        if batch is None:
            continue
        it = epoch * steps_per_epoch + i
        lr = schedule(it)
        set_schedule(optimizer, lr)
        x, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        saved = [b.clone() for b in buffers] if nonfinite_budget > nonfinite else None
        with autocast_context(device, amp):
            out = model(x)
            loss, values = losses(out, labels, x)
        if nonfinite_budget > nonfinite:  # a step may still be skipped: decide now, on all ranks (one host sync)
            if _any_nonfinite(loss):
                _skip_or_raise("re-id", epoch, it, {"loss": loss, **values}, nonfinite, nonfinite_budget, buffers,
                               saved)  # fmt: skip
                nonfinite += 1
                continue
        else:  # no sync in the hot loop: checked at log intervals, before checkpoints and at the end of the epoch
            watch.record(it, {"loss": loss, **values})
        optimizer.zero_grad(set_to_none=True)
        if center_optimizer is not None:
            center_optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        dist.all_reduce_gradients(loss_params)  # DDP averages the model's gradients, not those of the loss terms
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(_unwrap(model).parameters(), clip_grad)
        scaler.step(optimizer)
        if center_optimizer is not None:
            # The centre loss is weighted in the total; undo that on the centres' own update (as BoT does).
            weight = losses.terms["center"][0]
            for p in center_optimizer.param_groups[0]["params"]:
                if p.grad is not None:
                    p.grad.mul_(1.0 / (weight * scaler.get_scale()))
            center_optimizer.step()
        scaler.update()
        losses.after_step()

        for k, v in [("loss", loss), *values.items()]:
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        if out["logits"] is not None:
            correct += (out["logits"].argmax(1) == labels).sum()
            seen += len(labels)
        n += 1
        images += len(labels) * dist.get_world_size()
        if it % log_every == 0:
            watch.check()
            rate = images / (time.perf_counter() - t_start)
            runlog.write(
                "train",
                it,
                epoch=epoch,
                lr=lr,
                images_per_s=rate,
                **{k: v.item() for k, v in [("loss", loss), *values.items()]},
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(1)
        if save_checkpoint is not None and save_every_steps and (it + 1) % save_every_steps == 0:
            if i + 1 < steps_per_epoch:  # the end of the epoch has a checkpoint of its own
                watch.check()
                save_checkpoint(i + 1)
    bar.close()
    watch.check()
    stats = {k: dist.all_reduce_mean(v / max(n, 1)).item() for k, v in sums.items()}
    if seen:
        stats["train_acc"] = float(correct) / seen
    skipped = int(dist.all_reduce_sum(torch.tensor([skipped], device=device)).item())
    if skipped:
        log.warning("epoch %d: skipped %d undecodable training images (see the warnings above)", epoch, skipped)
    stats.update(
        skipped_images=skipped, nonfinite_steps=nonfinite, images_per_s=images / (time.perf_counter() - t_start)
    )
    return stats


def _buffers(*modules: nn.Module) -> list[torch.Tensor]:
    return [b for m in modules for b in _unwrap(m).buffers()]


class _NonFiniteWatch:
    """The first non-finite step of this rank, recorded on the device without a host sync (the hot loop keeps the
    GPU queue full); `check()` decides on all ranks together and raises NonFiniteLossError naming that step and
    every rank's loss terms there. Called at log intervals, before each checkpoint and at the end of the epoch, so a
    non-finite state is never saved; the steps between the bad one and the check are lost with it."""

    def __init__(self, stage: str, epoch: int, device: torch.device) -> None:
        self.stage, self.epoch = stage, epoch
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # iteration of the first bad step, or -1
        self.values: torch.Tensor | None = None  # the loss terms at that step
        self.names: list[str] = []

    def record(self, it: int, terms: dict[str, torch.Tensor]) -> None:
        row = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if self.values is None:
            self.values, self.names = torch.zeros_like(row), list(terms)
        new = torch.logical_not(torch.isfinite(row).all()) & (self.first < 0)
        self.values = torch.where(new, row, self.values)
        self.first = torch.where(new, torch.full_like(self.first, it), self.first)
        self.last = row

    def check(self) -> None:
        if not bool(dist.all_reduce_sum((self.first >= 0).float().reshape(1)).item()):
            return
        # every rank reports: its terms at its first bad step, or (all finite there) at its latest step
        values = torch.where(self.first >= 0, self.values, self.last)
        rows = dist.all_gather_variable(torch.cat([self.first.float().reshape(1), values]).reshape(1, -1))
        it = min(int(t[0, 0]) for t in rows if t[0, 0] >= 0)
        terms = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in zip(self.names, t[0, 1:].tolist()))
                          + ("" if int(t[0, 0]) in (-1, it) else f" (at iteration {int(t[0, 0])})")
                          for r, t in enumerate(rows))  # fmt: skip
        raise NonFiniteLossError(f"non-finite {self.stage} loss at epoch {self.epoch}, iteration {it} ({terms})")


def _any_nonfinite(loss: torch.Tensor) -> bool:
    """Whether the loss is NaN or infinite on any rank: one decision for all of them, so that they skip a step or
    stop together (a rank that skipped the backward pass alone would leave the others waiting in DDP's all-reduce)."""
    bad = torch.logical_not(torch.isfinite(loss.detach())).float().reshape(1)
    return bool(dist.all_reduce_sum(bad).item())


def _skip_or_raise(
    stage: str,
    epoch: int,
    it: int,
    terms: dict[str, torch.Tensor],
    skipped: int,
    budget: int,
    buffers: list[torch.Tensor],
    saved: list[torch.Tensor] | None,
) -> None:
    """After a non-finite loss (on any rank): put back the buffers the forward pass changed and skip the step, or
    raise NonFiniteLossError when `budget` steps have been skipped already. Every rank calls this together."""
    row = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).reshape(1, -1)
    rows = dist.all_gather_variable(row)
    values = "; ".join(
        f"rank {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in zip(terms, t[0].tolist())) for r, t in enumerate(rows)
    )
    where = f"non-finite {stage} loss at epoch {epoch}, iteration {it} ({values})"
    if skipped >= budget:
        raise NonFiniteLossError(where)
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)
    log.warning("%s: step skipped, no update (%d more tolerated)", where, budget - skipped - 1)


def _warn_collapse(loss: float, stats: dict[str, float], it: int, epoch: int, out_dim: int) -> None:
    """Warn about the two collapse modes of the paper's section 5.3 (after the first epoch, when start-up is over)."""
    if epoch < 1:
        return
    if loss > 0.98 * math.log(out_dim) and stats["kl"] < 1e-3:
        log.warning(
            "iteration %d: loss %.4f is stuck near ln K = %.4f with KL(teacher||student) %.2e: uniform collapse "
            "(try a lower teacher temperature or a larger momentum)", it, loss, math.log(out_dim), stats["kl"],
        )  # fmt: skip
    if stats["teacher_batch_entropy"] < 0.05:
        log.warning(
            "iteration %d: the teacher puts the whole batch on one prototype (batch entropy %.3f): one-dimension "
            "collapse (check the centring)", it, stats["teacher_batch_entropy"],
        )  # fmt: skip
