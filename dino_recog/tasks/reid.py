"""Stage 2 as one module: supervised re-identification on P x K batches.

`ReIDTask` owns what stage 2 trains: the recognition model (backbone + BN-neck head) and the weighted loss terms with
their own weights (CosFace / ArcFace classes, centre-loss centres, the auxiliary DINO head) in one module that DDP
wraps or FSDP shards (`ReIDNet`), so every gradient is averaged; the frozen distillation teacher and the EMA teacher
of the auxiliary DINO term stay outside it, and so do the classifiers that `loss.partial_fc` shards over the
processes (`sharded` terms: each rank trains its own part, with an optimiser of its own; `shards()`).
`engine.train_one_epoch` runs it like any other task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from .. import config as C
from .. import parallel
from ..losses import (
    ArcFaceLoss,
    CenterLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CrossEntropyLabelSmooth,
    DistillationLoss,
    PartialFC,
    TripletLoss,
)
from ..losses.partial_fc import LabelCorrection
from ..models import BackboneSpec, ReIDModel, build_reid_model, reid_spec
from ..optim import reid_param_groups
from ..schedules import cosine_schedule, step_schedule
from ..wrapper import DINOConf, DINOWrapper

__all__ = ["INPUTS", "LossTerm", "ReIDNet", "ReIDStep", "ReIDTask", "build_model", "build_reid_task", "model_spec",
           "reid_schedule"]  # fmt: skip

log = logging.getLogger(__name__)

# What a loss term can read: the model's features before / after the BN neck and its logits (train mode), the
# identity labels, the input images, and the distillation teacher's logits.
INPUTS = ("feat", "neck", "logits", "labels", "images", "teacher_logits")


@dataclass
class ReIDStep:
    """The scheduled values of one stage-2 iteration."""

    lr: float
    iteration: int = 0


class LossTerm(nn.Module):
    """One weighted term of the stage-2 loss: `weight x loss(*[inputs[k] for k in reads])`.

    Args:
        name: how the term is logged and saved.
        weight: its factor in the total loss.
        loss: the loss module (its own weights, if any, train with it).
        reads: which of `INPUTS` it takes, in the order of its forward's arguments.
        lr_scale: the learning-rate factor of the loss's own weights in the main optimiser.
        own_lr: train the loss's own weights with a plain SGD of this lr on the unweighted loss instead (BoT's
            centre-loss update); None: in the main optimiser.
    """

    def __init__(self, name: str, weight: float, loss: nn.Module, reads: tuple[str, ...], lr_scale: float = 1.0,
                 own_lr: float | None = None) -> None:  # fmt: skip
        super().__init__()
        unknown = [r for r in reads if r not in INPUTS]
        if not reads or unknown:
            raise ValueError(f"loss term {name!r}: reads {list(reads)}; expected names among {', '.join(INPUTS)}")
        self.name, self.weight, self.loss, self.reads = name, weight, loss, tuple(reads)
        self.lr_scale, self.own_lr = lr_scale, own_lr
        if own_lr is not None and weight:
            # The term is weighted in the total loss; its own weights learn from the unweighted one (as BoT does).
            for p in loss.parameters():
                p.register_hook(lambda g, w=weight: g * (1.0 / w))

    def forward(self, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        return self.loss(*[inputs[k] for k in self.reads])

    def params(self) -> list[nn.Parameter]:
        """The loss's own weights (a frozen one, like the DINO head's weight-norm magnitude, is skipped by the
        optimiser: it never gets a gradient)."""
        return list(self.loss.parameters())


class ReIDNet(nn.Module):
    """The recognition model and the loss terms, in one module so DDP reduces the gradients of both."""

    def __init__(self, model: ReIDModel, terms: list[LossTerm]) -> None:
        super().__init__()
        self.model, self.terms = model, nn.ModuleList(terms)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        out = self.model(images)  # {"feat", "neck", "logits"}
        # copies of views (the backbone's feature is its CLS token or pooled map): FSDP2 hooks its backward on what a
        # sharded network returns, and an in-place op on a returned view would drop that hook (torch warns)
        out = {k: v.clone() if v is not None and v._is_view() else v for k, v in out.items()}
        inputs = {**out, "labels": labels, "images": images, "teacher_logits": teacher_logits}
        return inputs, {t.name: t(inputs) for t in self.terms}


class _DinoAux(nn.Module):
    """The auxiliary DINO term inside ReIDNet: its head trains with the model (the student is the model's own
    backbone); the wrapper with its EMA teacher is held by the task, outside DDP (not registered here)."""

    def __init__(self, wrapper: DINOWrapper) -> None:
        super().__init__()
        self.head = wrapper.head
        self.__dict__["wrapper"] = wrapper

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapper.loss(images)


class ReIDTask(nn.Module):
    """Recognition model + loss terms (+ distillation teacher, + auxiliary DINO wrapper).

    Args:
        model: the ReIDModel being trained.
        terms: the switched-on loss terms.
        distill_teacher: a frozen ReIDModel whose logits the terms reading `teacher_logits` get.
        dino_aux: the DINOWrapper around `model.backbone` behind a term whose loss is `_DinoAux`.
        sharded: terms whose loss holds this rank's shard of a classifier (`PartialFC`); outside DDP.
    """

    name = "re-id"  # in messages

    def __init__(self, model: ReIDModel, terms: list[LossTerm], distill_teacher: nn.Module | None = None,
                 dino_aux: DINOWrapper | None = None, sharded: list[LossTerm] | None = None) -> None:  # fmt: skip
        super().__init__()
        if model.head.classifier is None:
            blind = [t.name for t in terms if "logits" in t.reads]
            if blind:
                raise ValueError(f"loss terms {blind} read the classifier's logits, but the model has no classifier")
        if distill_teacher is None and any("teacher_logits" in t.reads for t in terms):
            raise ValueError("a loss term reads teacher_logits, but no distillation teacher is given")
        self.net = ReIDNet(model, terms)
        self.sharded = nn.ModuleList(sharded or [])
        self.distill_teacher, self.dino_aux = distill_teacher, dino_aux
        if distill_teacher is not None:
            distill_teacher.requires_grad_(False)
        self.register_buffer("correct", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def model(self) -> ReIDModel:
        return self.net.model

    @property
    def trainable(self) -> nn.Module:
        return self.net  # what DDP wraps (`parallel.wrap_ddp`)

    def fsdp_roots(self) -> tuple[nn.Module]:
        """What `parallel.wrap_fsdp` shards: the model with the loss terms' weights (per ViT block or ResNet stage,
        then the rest: stem, BN neck, classifier, CosFace / ArcFace classes). The Partial FC shards stay rank-local
        outside it (no gradient reduction, as under DDP) and the distillation teacher stays whole on every rank."""
        return (self.net,)

    @property
    def terms(self) -> dict[str, LossTerm]:
        return {t.name: t for t in [*self.net.terms, *self.sharded]}

    def shards(self) -> dict[str, nn.Module]:
        """The state each rank holds a different part of (the Partial FC classifiers): saved per rank, left out of
        `parts()`, of the broadcast from rank 0 and of the cross-rank check."""
        return {t.name: t.loss for t in self.sharded}

    def shard_param_groups(self) -> list[dict]:
        """The sharded classifiers' weights, for their own optimiser (its state is per rank too)."""
        return [{"params": t.params(), "lr_scale": t.lr_scale, "apply_wd": True} for t in self.sharded]

    def parts(self) -> dict[str, nn.Module]:
        """The state a checkpoint holds, resume restores and the cross-rank check compares: the model under
        `state_dict` and each loss term's own state under `losses` (the auxiliary DINO wrapper whole)."""
        losses = {t.name: t.loss for t in self.net.terms if not isinstance(t.loss, DistillationLoss)}
        if self.dino_aux is not None:
            losses = {**losses, **{t.name: self.dino_aux for t in self.net.terms if isinstance(t.loss, _DinoAux)}}
        return {"state_dict": self.model, "losses": nn.ModuleDict(losses)}

    def param_groups(self, bias_lr_factor: float = 1.0, head_lr_factor: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict]:  # fmt: skip
        """The model's groups (`optim.reid_param_groups`), then one group per loss term with weights of its own."""
        groups = reid_param_groups(self.model, bias_lr_factor, head_lr_factor, layer_decay)
        for t in self.net.terms:
            if t.own_lr is None and t.params():
                groups.append({"params": t.params(), "lr_scale": t.lr_scale, "apply_wd": True})
        return groups

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Plain SGD for the terms that train their weights at a fixed lr of their own (BoT's centres)."""
        return [torch.optim.SGD(t.params(), lr=t.own_lr) for t in self.net.terms if t.own_lr is not None]

    def forward(self, batch: tuple, step: ReIDStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sum_t weight_t x term_t on one P x K batch. Returns (loss, {term name: unweighted value})."""
        device = self.correct.device
        x, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        teacher_logits = None
        if self.distill_teacher is not None:
            with torch.no_grad():
                teacher_logits = self.distill_teacher(x)["logits"]
        out, values = parallel.ddp_module(self)(x, labels, teacher_logits)  # out: what the terms read
        # the sharded terms on the DDP output: the embeddings' gradient reaches the backbone through DDP
        values.update({t.name: t(out) for t in self.sharded})
        loss = sum(self.terms[k].weight * v for k, v in values.items())
        if out["logits"] is not None:
            self.correct += (out["logits"].detach().argmax(1) == labels).sum()
            self.seen += len(labels)
        return loss, values

    def cancel_gradients(self, step: ReIDStep) -> None:
        pass

    @torch.no_grad()
    def after_step(self, step: ReIDStep) -> None:
        """The EMA teacher of the auxiliary DINO term follows the backbone."""
        if self.dino_aux is not None:
            self.dino_aux.update_teacher()

    def log_stats(self, step: ReIDStep, terms: dict[str, float], loss: float, epoch: int) -> dict[str, float]:
        return {}  # the loop logs lr, loss and terms; nothing more to monitor here

    def epoch_stats(self) -> dict[str, float]:
        """The classifier's accuracy on this rank's training batches since the last call, and how many labels of
        the global batches label correction replaced."""
        stats = {"train_acc": self.correct.item() / self.seen.item()} if self.seen.item() else {}
        self.correct.zero_()
        self.seen.zero_()
        for t in self.sharded:
            if t.loss.correction is not None:
                stats["labels_corrected"] = int(t.loss.corrected.item())
                t.loss.corrected.zero_()
        return stats


# ---------------------------------------------------------------------------------------------------------------------
# From the config


def model_spec(cfg: C.RecogConfig, num_classes: int, classifier: bool | None = None) -> dict:
    """The model's flat spec: `model.*` / `aug.*`, with the architecture of a `model.pretrained` file that carries
    its own (a stage-1 export or checkpoint, a stage-2 model; logged when it replaces `model.*`). `classifier`: None
    = whether `loss.*` reads logits (the unsupervised stage, which has no classes, says False)."""
    m = cfg.model
    backbone = BackboneSpec.from_recog_config(cfg)
    if m.pretrained and Path(m.pretrained).is_file():
        backbone = ckpt.pretrained_backbone_spec(backbone, m.pretrained, "model.pretrained")
    if classifier is None:
        classifier = (cfg.loss.ce_weight > 0 and not cfg.loss.partial_fc) or cfg.loss.distill_weight > 0
    return reid_spec(backbone, num_classes, embedding_dim=m.embedding_dim, neck=m.neck, drop_path_rate=m.drop_path_rate,
                     test_feature=m.test_feature, classifier=classifier)


def build_model(cfg: C.RecogConfig, num_classes: int, classifier: bool | None = None) -> ReIDModel:
    """The recognition model, its backbone loaded from `model.pretrained` (any supported file) or from scratch
    (`classifier`: as in `model_spec`)."""
    model = build_reid_model(model_spec(cfg, num_classes, classifier))
    if cfg.model.pretrained:
        if not Path(cfg.model.pretrained).is_file():
            raise FileNotFoundError(
                f"model.pretrained: {cfg.model.pretrained} not found; run stage 1 first (train_dino.py exports "
                f"teacher_backbone.pth), point it at other weights, or set model.pretrained='' to start from scratch"
            )
        # A backbone tensor the file lacks would start fine-tuning from random values for it (a bare state dict
        # with fewer blocks than model.depth): refused, with no switch; the neck and classifier are not backbone
        # keys and always start fresh.
        ckpt.load_backbone_weights(model.backbone, cfg.model.pretrained, key=cfg.model.pretrained_key, switch=None)
    else:
        log.info("model.pretrained is empty: the backbone starts from random initialisation")
    return model


def _dino_aux(cfg: C.RecogConfig, backbone: nn.Module, steps_per_epoch: int) -> DINOWrapper:
    """DINO on the backbone's global feature, on crops of the training batch (DINOWrapper, v1 schedules)."""
    h, w = cfg.aug.size
    conf = DINOConf(
        global_crop_size=(h, w), local_crop_size=(max(1, h // 2), max(1, w // 2)),
        local_crops_number=cfg.loss.dino_aux_local_crops, out_dim=cfg.loss.dino_aux_out_dim,
        input_mean=tuple(cfg.aug.mean), input_std=tuple(cfg.aug.std), epochs=cfg.train.epochs,
        len_train_loader=steps_per_epoch,
    )  # fmt: skip
    return DINOWrapper(backbone, conf)


def build_reid_task(cfg: C.RecogConfig, num_classes: int, steps_per_epoch: int = 1) -> ReIDTask:
    """The model and the loss terms `loss.*` switches on: CE / distillation read the logits, triplet and centre the
    feature before the BN neck, CosFace / ArcFace / combined margin the one after it (with their class weights,
    trained like the head). `steps_per_epoch` counts optimiser steps. With `loss.partial_fc` every classifier loss is a
    `PartialFC` on the BN-neck feature and the model has no classifier of its own."""
    lc, head_lr = cfg.loss, cfg.train.head_lr_factor
    model = build_model(cfg, num_classes)
    dim = model.head.out_dim
    terms, sharded, teacher, aux = [], [], None, None
    classifiers = {  # name: (weight, the replicated loss, the Partial FC kind, scale, (m1, m2, m3), smoothing)
        "ce": (lc.ce_weight, lambda: CrossEntropyLabelSmooth(num_classes, lc.label_smoothing), "ce", 1.0,
               (1.0, 0.0, 0.0), lc.label_smoothing),
        "cosface": (lc.cosface_weight, lambda: CosFaceLoss(dim, num_classes, lc.cosface_s, lc.cosface_m), "cosface",
                    lc.cosface_s, (1.0, 0.0, lc.cosface_m), 0.0),
        "arcface": (lc.arcface_weight, lambda: ArcFaceLoss(dim, num_classes, lc.arcface_s, lc.arcface_m), "arcface",
                    lc.arcface_s, (1.0, lc.arcface_m, 0.0), 0.0),
        "combined": (lc.combined_weight, lambda: CombinedMarginLoss(dim, num_classes, lc.combined_s, lc.combined_m1,
                                                                    lc.combined_m2, lc.combined_m3),
                     "combined", lc.combined_s, (lc.combined_m1, lc.combined_m2, lc.combined_m3), 0.0),
    }  # fmt: skip
    for name, (weight, replicated, kind, s, margins, eps) in classifiers.items():
        if not weight or (name == "ce" and lc.distill_weight):  # the distillation loss contains the cross-entropy
            continue
        if lc.partial_fc:  # the classifier reads the BN-neck feature, as the model's own classifier would
            correction = None
            if lc.label_correction and not sharded:  # ce when it is on, else the first classifier loss
                # PartialFC counts its forward passes: accumulate_steps per optimiser step
                start = lc.label_correction_start_epoch * steps_per_epoch * cfg.train.accumulate_steps
                correction = LabelCorrection(start, lc.label_correction_alpha, lc.label_correction_threshold,
                                             lc.label_correction_t, lc.label_correction_momentum)  # fmt: skip
            pfc = PartialFC(dim, num_classes, kind, s, margins, lc.partial_fc_sample_rate, eps, cfg.run.seed,
                            correction)  # fmt: skip
            sharded.append(LossTerm(name, weight, pfc, ("neck", "labels"), lr_scale=head_lr))
        elif name == "ce":
            terms.append(LossTerm(name, weight, replicated(), ("logits", "labels")))
        else:
            terms.append(LossTerm(name, weight, replicated(), ("neck", "labels"), lr_scale=head_lr))
    if lc.triplet_weight:
        terms.append(LossTerm("triplet", lc.triplet_weight, TripletLoss(lc.triplet_margin, lc.triplet_distance),
                              ("feat", "labels")))  # fmt: skip
    if lc.center_weight:
        terms.append(LossTerm("center", lc.center_weight, CenterLoss(dim, num_classes), ("feat", "labels"),
                              own_lr=lc.center_lr))  # fmt: skip
    if lc.distill_weight:
        teacher = ckpt.load_reid_model(lc.distill_teacher)
        if teacher.spec["num_classes"] != num_classes:
            raise ValueError(f"loss.distill_teacher: {lc.distill_teacher} has {teacher.spec['num_classes']} classes, "
                             f"the training set {num_classes}; distillation needs the same identities")  # fmt: skip
        terms.append(LossTerm("distill", 1.0, DistillationLoss(lc.distill_weight, lc.distill_temperature,
                                                               lc.label_smoothing),
                              ("logits", "labels", "teacher_logits")))  # fmt: skip
    if lc.dino_aux_weight:
        aux = _dino_aux(cfg, model.backbone, steps_per_epoch)
        terms.append(LossTerm("dino", lc.dino_aux_weight, _DinoAux(aux), ("images",), lr_scale=head_lr))
    return ReIDTask(model, terms, teacher, aux, sharded)


def reid_schedule(cfg: C.RecogConfig, steps_per_epoch: int):
    """iteration -> ReIDStep: warmup, then cosine or step decay of the lr."""
    t = cfg.train
    total, warmup = t.epochs * steps_per_epoch, t.warmup_epochs * steps_per_epoch
    if t.scheduler == "cosine":
        return lambda it: ReIDStep(cosine_schedule(it, total, t.lr, t.min_lr, warmup, t.lr * t.warmup_factor), it)
    return lambda it: ReIDStep(step_schedule(it, steps_per_epoch, t.lr, t.milestones, t.gamma, warmup,
                                             t.warmup_factor), it)  # fmt: skip
