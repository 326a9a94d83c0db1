"""Configuration: dataclasses filled from YAML, then from `key.sub=value` overrides.

Precedence: dataclass defaults -> YAML file -> command-line overrides. Every key is checked against the dataclass:
an unknown key is an error that names its full path and the closest valid key, a wrong type names the key, the
value and the expected type, and impossible values are refused here rather than hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .atomic import atomic_write

__all__ = [
    "ConfigError",
    "DatasetSpec",
    "DinoConfig",
    "RecogConfig",
    "load",
    "from_dict",
    "to_dict",
    "save",
    "dump",
]

T = TypeVar("T")

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
ARCHS = VIT_ARCHS + ("resnet18", "resnet50", "resnet101")
DATASETS_LABELED = ("market1501", "msmt17", "labeled_folder", "demo")
DATASETS_UNLABELED = ("luperson", "luperson_lmdb", "image_folder", "demo") + DATASETS_LABELED[:3]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class DatasetSpec:
    """One data set: what it is and where it lives."""

    name: str = "market1501"  # market1501 | msmt17 | labeled_folder | demo (+ luperson | luperson_lmdb | image_folder)
    root: str = "data/Market-1501-v15.09.15"  # directory of the data set (demo: generated there on first use)
    version: str = "auto"  # MSMT17 only: V1, V2 or auto (detected from the folders)
    use_val: bool = True  # MSMT17 only: list_val.txt joins training (TransReID, PASS, TransReID-SSL do)

    def validate(self, path: str, allowed: tuple[str, ...]) -> None:
        _choice(path + ".name", self.name, allowed)
        _choice(path + ".version", self.version, ("auto", "V1", "V2"))
        if not self.root and self.name != "demo":
            raise ConfigError(f"{path}.root: empty; expected the directory of the {self.name} data set")


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded and resumed."""

    output_dir: str = "output/dino"  # checkpoints, exports, config.yaml, log.jsonl and tensorboard go here
    seed: int = 0  # base random seed; rank r uses seed + r for augmentation
    resume: str = "auto"  # auto: newest checkpoint in output_dir if any; "": start fresh; else a checkpoint path
    device: str = "auto"  # auto: cuda when available, else cpu; or cuda / cpu
    amp: str = "bf16"  # bf16 (when the device supports it), fp16 (with a gradient scaler) or fp32
    log_every: int = 50  # iterations between JSON-lines / tensorboard records
    keep_last: int = 3  # how many checkpoints (end-of-epoch and mid-epoch) are kept
    save_every_steps: int = 0  # also checkpoint every this many iterations inside an epoch; 0 = at epoch ends only
    skip_nonfinite_steps: int = 0  # NaN/inf-loss steps skipped (no update) before the run stops; 0 = stop at the first
    fused_attn: bool = True  # ViT attention through fused scaled_dot_product_attention (false: explicit softmax)
    fused_optimizer: bool = True  # on CUDA, the fused AdamW/Adam/SGD kernels (else the foreach implementation)
    compile: bool = False  # torch.compile the backbone (one graph per crop size; first steps are slow)
    channels_last: bool = False  # ResNets: channels-last memory format (faster convolutions with autocast on GPU)
    grad_checkpointing: bool = False  # recompute ViT blocks in backward: less memory, about 30% more compute

    def validate(self, path: str) -> None:
        _choice(path + ".device", self.device, ("auto", "cuda", "cpu"))
        _choice(path + ".amp", self.amp, ("bf16", "fp16", "fp32"))
        _positive(path + ".log_every", self.log_every)
        _positive(path + ".keep_last", self.keep_last)
        _non_negative(path + ".save_every_steps", self.save_every_steps)
        _non_negative(path + ".skip_nonfinite_steps", self.skip_nonfinite_steps)
        if not self.output_dir:
            raise ConfigError(f"{path}.output_dir: empty; expected a directory to write the run into")


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: DINO


@dataclass
class DinoDataConfig:
    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(name="luperson", root="data/LUPerson/images"))
    keys_file: str = ""  # LMDB only: plain-text key list (never keys.pkl); empty = list the LMDB once and cache
    batch_size_per_gpu: int = 64  # images per process; official DINO 64, TransReID-SSL 8 GPUs x 64
    num_workers: int = 10  # DataLoader workers per process (official DINO 10)
    eval_set: DatasetSpec | None = None  # labeled set whose query/gallery monitor kNN / rank-1 (null = none)

    def validate(self, path: str) -> None:
        self.train.validate(path + ".train", DATASETS_UNLABELED)
        if self.eval_set is not None:
            self.eval_set.validate(path + ".eval_set", DATASETS_LABELED)
        _positive(path + ".batch_size_per_gpu", self.batch_size_per_gpu)
        _non_negative(path + ".num_workers", self.num_workers)


@dataclass
class DinoModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101
    patch_size: int = 16  # ViT patch size (16 or 8)
    drop_path_rate: float = 0.1  # stochastic depth, student only (official 0.1)
    depth: int = 0  # ViT blocks; 0 = the architecture's (12)
    embed_dim: int = 0  # ViT width; 0 = the architecture's (tiny 192, small 384, base 768)
    num_heads: int = 0  # ViT attention heads; 0 = the architecture's (tiny 3, small 6, base 12)
    out_dim: int = 65536  # K, prototypes of the DINO head (official 65536)
    hidden_dim: int = 2048  # DINO head MLP width
    bottleneck_dim: int = 256  # DINO head bottleneck before the weight-normalised last layer
    norm_last_layer: bool = True  # freeze the weight-norm magnitude of the last layer (official True)
    use_bn_in_head: bool = False  # BatchNorm in the head MLP (official False)
    layerscale: float = 0.0  # ViT LayerScale: residual branches x a learned gamma started here (DINOv2 1e-5); 0 = off
    num_register_tokens: int = 0  # ViT register tokens after the CLS token (Darcet et al. 2024; DINOv2 0, "reg" 4)

    def validate(self, path: str) -> None:
        _choice(path + ".arch", self.arch, ARCHS)
        _choice(path + ".patch_size", self.patch_size, (8, 14, 16))
        _unit_interval(path + ".drop_path_rate", self.drop_path_rate, closed_right=False)
        _check_vit_size(path, self)
        for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
            _positive(f"{path}.{key}", getattr(self, key))
        _non_negative(path + ".layerscale", self.layerscale)
        _non_negative(path + ".num_register_tokens", self.num_register_tokens)
        if self.arch not in VIT_ARCHS and (self.layerscale or self.num_register_tokens):
            raise ConfigError(f"{path}.arch: {self.arch} with layerscale or num_register_tokens, which are ViT options")


@dataclass
class DinoLossConfig:
    student_temp: float = 0.1  # student softmax temperature (paper 0.1)
    teacher_temp: float = 0.04  # final teacher temperature (official 0.04; 0.07 in the "boost" recipe)
    warmup_teacher_temp: float = 0.04  # initial teacher temperature (official 0.04)
    warmup_teacher_temp_epochs: int = 0  # epochs of linear teacher-temperature warmup (official code 0)
    center_momentum: float = 0.9  # EMA of the teacher-output centre (paper 0.9)
    momentum_teacher: float = 0.996  # base EMA momentum of the teacher, cosine to 1 (official 0.996)
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no gradient (official 1)
    version: str = "v1"  # v1: DINO | v2: DINOv2, DINO + iBOT loss on masked global crops + KoLeo (Oquab et al. 2023)
    centering: str = "center"  # teacher targets: center (EMA centre) | sinkhorn_knopp (3 iterations; DINOv2 ViT-L/g)
    koleo_weight: float = 0.1  # v2: KoLeo regulariser on the student's global-crop CLS features (DINOv2 0.1)
    ibot_weight: float = 1.0  # v2: iBOT masked-patch loss (DINOv2 1.0)
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # v2: fraction of the patches a masked crop hides (DINOv2)
    mask_sample_probability: float = 0.5  # v2: fraction of the global crops that are masked (DINOv2 0.5)
    separate_ibot_head: bool = False  # v2: patch tokens through their own head of the same size (DINOv2 false)

    def validate(self, path: str) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _positive(f"{path}.{key}", getattr(self, key))
        _non_negative(path + ".warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs)
        _unit_interval(path + ".center_momentum", self.center_momentum)
        _unit_interval(path + ".momentum_teacher", self.momentum_teacher)
        _non_negative(path + ".freeze_last_layer", self.freeze_last_layer)
        _choice(path + ".version", self.version, ("v1", "v2"))
        _choice(path + ".centering", self.centering, ("center", "sinkhorn_knopp"))
        _non_negative(path + ".koleo_weight", self.koleo_weight)
        _non_negative(path + ".ibot_weight", self.ibot_weight)
        lo, hi = self.mask_ratio_min_max
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"{path}.mask_ratio_min_max: {[lo, hi]} is not a range 0 <= low <= high <= 1")
        _unit_interval(path + ".mask_sample_probability", self.mask_sample_probability)


@dataclass
class MultiCropConfig:
    global_crops_size: tuple[int, int] = (256, 128)  # (height, width) of the 2 global crops (TransReID-SSL)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area range of a global crop (official (0.4, 1))
    local_crops_number: int = 8  # local crops per image (official 8)
    local_crops_size: tuple[int, int] = (128, 64)  # (height, width) of a local crop (TransReID-SSL)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop (official (0.05, 0.4))
    part_aware_local_crops: bool = False  # PASS: local crops from top / middle / bottom body regions
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation mean (ImageNet)
    std: tuple[float, float, float] = IMAGENET_STD  # normalisation std (ImageNet)
    gpu_augment: bool = False  # workers return uint8 crops; jitter, grayscale, blur, solarise run batched on the device

    def validate(self, path: str) -> None:
        for key in ("global_crops_size", "local_crops_size"):
            for v in getattr(self, key):
                _positive(f"{path}.{key}", v)
        for key in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{path}.{key}: {[lo, hi]} is not a range 0 < low <= high <= 1")
        _non_negative(path + ".local_crops_number", self.local_crops_number)
        gh, gw = self.global_crops_size
        lh, lw = self.local_crops_size
        if self.local_crops_number and (lh > gh or lw > gw):
            raise ConfigError(
                f"{path}.local_crops_size: {[lh, lw]} is larger than global_crops_size {[gh, gw]}; "
                "a local crop must not exceed a global crop in height or width"
            )
        if self.part_aware_local_crops and self.local_crops_number % 3:
            raise ConfigError(
                f"{path}.local_crops_number: {self.local_crops_number} with part_aware_local_crops; "
                "expected a multiple of 3 (one group per body region: top, middle, bottom)"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{path}.std: {list(self.std)}; expected positive values")


@dataclass
class DinoTrainConfig:
    optimizer: str = "adamw"  # adamw | sgd (sgd for ResNets: official RN50 recipe)
    epochs: int = 100  # training epochs (official and TransReID-SSL 100)
    lr: float = 5e-4  # base learning rate at total batch 256; scaled linearly (official 5e-4)
    min_lr: float = 1e-6  # end of the cosine schedule (official 1e-6)
    warmup_epochs: int = 10  # linear lr warmup (official 10)
    weight_decay: float = 0.04  # start of the cosine weight-decay schedule (official 0.04)
    weight_decay_end: float = 0.4  # end of the cosine weight-decay schedule (official 0.4)
    clip_grad: float = 3.0  # max gradient norm; 0 disables (official 3.0)
    momentum: float = 0.9  # SGD momentum
    layer_decay: float = 1.0  # ViT layer-wise lr decay: lr x decay^(L + 1 - depth) (DINOv2 0.9; 1 = off)
    patch_embed_lr_mult: float = 1.0  # lr factor of the ViT patch embedding (DINOv2 0.2)

    def validate(self, path: str) -> None:
        _choice(path + ".optimizer", self.optimizer, ("adamw", "sgd"))
        _positive(path + ".epochs", self.epochs)
        _positive(path + ".lr", self.lr)
        _non_negative(path + ".min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr: {self.min_lr} is larger than lr {self.lr}")
        _non_negative(path + ".warmup_epochs", self.warmup_epochs)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"{path}.warmup_epochs: {self.warmup_epochs} is more than epochs {self.epochs}")
        _non_negative(path + ".weight_decay", self.weight_decay)
        _non_negative(path + ".weight_decay_end", self.weight_decay_end)
        _non_negative(path + ".clip_grad", self.clip_grad)
        _unit_interval(path + ".momentum", self.momentum)
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{path}.layer_decay: {self.layer_decay!r}; expected a value in (0, 1]")
        _non_negative(path + ".patch_embed_lr_mult", self.patch_embed_lr_mult)


@dataclass
class DinoEvalConfig:
    eval_every: int = 10  # epochs between kNN / rank-1 evaluations of the teacher (0 = never)
    knn_k: int = 20  # neighbours of the weighted kNN (DINO: 20)
    knn_temperature: float = 0.07  # vote weight exp(sim / T) (DINO: 0.07)
    saveckp_freq: int = 20  # epochs between kept numbered checkpoints (official 20)
    export_every: int = 10  # epochs between teacher_backbone.pth exports (also at the end)

    def validate(self, path: str) -> None:
        _non_negative(path + ".eval_every", self.eval_every)
        _positive(path + ".knn_k", self.knn_k)
        _positive(path + ".knn_temperature", self.knn_temperature)
        _non_negative(path + ".saveckp_freq", self.saveckp_freq)
        _non_negative(path + ".export_every", self.export_every)


@dataclass
class DinoConfig:
    """Stage 1: DINO self-distillation (Caron et al. 2021) on unlabeled person crops."""

    run: RunConfig = field(default_factory=RunConfig)  # output, seed, resume, device, precision, logging
    data: DinoDataConfig = field(default_factory=DinoDataConfig)  # unlabeled images, batch, workers
    model: DinoModelConfig = field(default_factory=DinoModelConfig)  # backbone and DINO head
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)  # loss temperatures, centre, teacher EMA, DINOv2
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)  # multi-crop augmentation
    train: DinoTrainConfig = field(default_factory=DinoTrainConfig)  # optimiser and schedules
    eval: DinoEvalConfig = field(default_factory=DinoEvalConfig)  # monitoring, checkpoints, exports

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.model.arch in VIT_ARCHS:
            _check_patches("crops.global_crops_size", self.crops.global_crops_size, self.model.patch_size)
            if self.crops.local_crops_number:
                _check_patches("crops.local_crops_size", self.crops.local_crops_size, self.model.patch_size)
        if self.dino.warmup_teacher_temp_epochs > self.train.epochs:
            raise ConfigError(
                f"dino.warmup_teacher_temp_epochs: {self.dino.warmup_teacher_temp_epochs} is more than "
                f"train.epochs {self.train.epochs}"
            )
        if self.dino.version == "v2" and self.model.arch not in VIT_ARCHS:
            raise ConfigError(f"dino.version: v2 masks patch tokens and needs a ViT, not model.arch {self.model.arch}")
        if self.dino.version == "v2" and self.model.use_bn_in_head:
            raise ConfigError(
                "model.use_bn_in_head: true with dino.version v2; the head sees CLS and patch tokens together, whose "
                "batch statistics would mix (DINOv2 has no BatchNorm either)"
            )


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: recognition fine-tuning


@dataclass
class RecogDataConfig:
    train: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])  # combined when several
    test: DatasetSpec = field(default_factory=DatasetSpec)  # query/gallery set; may differ (cross-domain)
    num_identities: int = 16  # P: identities per batch (BoT 16)
    num_instances: int = 4  # K: images per identity per batch (BoT 4); batch = P x K per process
    num_workers: int = 8  # DataLoader workers per process
    test_batch_size: int = 256  # images per process at feature extraction

    def validate(self, path: str) -> None:
        if not self.train:
            raise ConfigError(f"{path}.train: empty list; expected at least one data set")
        for i, spec in enumerate(self.train):
            spec.validate(f"{path}.train[{i}]", DATASETS_LABELED)
        self.test.validate(path + ".test", DATASETS_LABELED)
        _positive(path + ".num_identities", self.num_identities)
        _positive(path + ".num_instances", self.num_instances)
        _non_negative(path + ".num_workers", self.num_workers)
        _positive(path + ".test_batch_size", self.test_batch_size)


@dataclass
class ReIDAugConfig:
    size: tuple[int, int] = (256, 128)  # (height, width) input (BoT, TransReID-SSL)
    flip_prob: float = 0.5  # horizontal flip probability (BoT 0.5)
    padding: int = 10  # pixels of padding before the random crop back to `size` (BoT 10)
    erasing_prob: float = 0.5  # random erasing probability (BoT 0.5)
    color_jitter: bool = False  # brightness/contrast/saturation/hue jitter (off in BoT)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation mean; same as stage 1
    std: tuple[float, float, float] = IMAGENET_STD  # normalisation std; same as stage 1

    def validate(self, path: str) -> None:
        for v in self.size:
            _positive(path + ".size", v)
        _unit_interval(path + ".flip_prob", self.flip_prob)
        _non_negative(path + ".padding", self.padding)
        _unit_interval(path + ".erasing_prob", self.erasing_prob)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{path}.std: {list(self.std)}; expected positive values")


@dataclass
class RecogModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101
    patch_size: int = 16  # ViT patch size
    drop_path_rate: float = 0.1  # stochastic depth (TransReID 0.1)
    depth: int = 0  # ViT blocks; 0 = the architecture's (12)
    embed_dim: int = 0  # ViT width; 0 = the architecture's (tiny 192, small 384, base 768)
    num_heads: int = 0  # ViT attention heads; 0 = the architecture's (tiny 3, small 6, base 12)
    pretrained: str = "output/dino/teacher_backbone.pth"  # stage-1 export/checkpoint, DINO or timm weights; "" = none
    pretrained_key: str = "teacher"  # which network of a stage-1 / official DINO checkpoint: teacher | student
    feature: str = "cls"  # ViT: cls | cls_mean (CLS + mean patch token); ResNet: avg | gem
    last_stride: int = 1  # ResNet last-stage stride (BoT 1)
    embedding_dim: int = 0  # optional linear embedding before the BN neck; 0 = none
    neck: str = "bnneck"  # bnneck (BN before the classifier, bias frozen; Luo et al. 2019) | none

    def validate(self, path: str) -> None:
        _choice(path + ".arch", self.arch, ARCHS)
        _choice(path + ".patch_size", self.patch_size, (8, 14, 16))
        _unit_interval(path + ".drop_path_rate", self.drop_path_rate, closed_right=False)
        _check_vit_size(path, self)
        _choice(path + ".pretrained_key", self.pretrained_key, ("teacher", "student"))
        allowed = ("cls", "cls_mean") if self.arch in VIT_ARCHS else ("avg", "gem")
        _choice(path + ".feature", self.feature, allowed)
        _choice(path + ".last_stride", self.last_stride, (1, 2))
        _non_negative(path + ".embedding_dim", self.embedding_dim)
        _choice(path + ".neck", self.neck, ("bnneck", "none"))


@dataclass
class RecogLossConfig:
    ce_weight: float = 1.0  # softmax cross-entropy weight
    label_smoothing: float = 0.1  # epsilon of label smoothing (BoT 0.1)
    triplet_weight: float = 1.0  # batch-hard triplet weight (Hermans et al. 2017)
    triplet_margin: float = 0.0  # margin; 0 = soft margin log(1 + exp(d_ap - d_an)) (TransReID-SSL)
    triplet_distance: str = "euclidean"  # euclidean | cosine
    cosface_weight: float = 0.0  # CosFace (Wang et al. 2018) weight; 0 = off
    cosface_s: float = 30.0  # CosFace scale
    cosface_m: float = 0.35  # CosFace additive cosine margin
    arcface_weight: float = 0.0  # ArcFace (Deng et al. 2019) weight; 0 = off
    arcface_s: float = 30.0  # ArcFace scale
    arcface_m: float = 0.5  # ArcFace additive angular margin (radians)
    center_weight: float = 0.0  # center loss weight (BoT 5e-4); 0 = off
    center_lr: float = 0.5  # SGD lr of the class centres (BoT 0.5)
    distill_weight: float = 0.0  # alpha of knowledge distillation (Hinton et al. 2015); 0 = off
    distill_temperature: float = 4.0  # T of the softened distributions
    distill_teacher: str = ""  # stage-2 checkpoint of the frozen teacher (any architecture)
    dino_aux_weight: float = 0.0  # DINO on the backbone as an auxiliary loss (DINOWrapper); 0 = off
    dino_aux_out_dim: int = 4096  # prototypes of the auxiliary DINO head
    dino_aux_local_crops: int = 2  # local crops per image of the auxiliary DINO loss (half the input size)

    def validate(self, path: str) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_weight"):
                _non_negative(f"{path}.{f.name}", getattr(self, f.name))
        _unit_interval(path + ".label_smoothing", self.label_smoothing, closed_right=False)
        _non_negative(path + ".triplet_margin", self.triplet_margin)
        _choice(path + ".triplet_distance", self.triplet_distance, ("euclidean", "cosine"))
        for key in ("cosface_s", "arcface_s", "center_lr", "distill_temperature"):
            _positive(f"{path}.{key}", getattr(self, key))
        _non_negative(path + ".cosface_m", self.cosface_m)
        if not 0 <= self.arcface_m < math.pi / 2:
            raise ConfigError(f"{path}.arcface_m: {self.arcface_m}; expected radians in [0, pi/2)")
        _non_negative(path + ".dino_aux_weight", self.dino_aux_weight)
        _positive(path + ".dino_aux_out_dim", self.dino_aux_out_dim)
        _non_negative(path + ".dino_aux_local_crops", self.dino_aux_local_crops)
        if self.distill_weight > 0 and not self.distill_teacher:
            raise ConfigError(f"{path}.distill_teacher: empty while distill_weight > 0; expected a checkpoint path")
        if sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_weight")) == 0:
            raise ConfigError(f"{path}: every loss weight is 0; expected at least one loss")


@dataclass
class RecogTrainConfig:
    optimizer: str = "sgd"  # sgd | adamw | adam (TransReID-SSL: sgd; BoT: adam)
    epochs: int = 120  # training epochs (TransReID-SSL, BoT 120)
    lr: float = 4e-4  # base learning rate (TransReID-SSL ViT-S 0.0004)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # (TransReID-SSL 1e-4; BoT 5e-4)
    bias_lr_factor: float = 2.0  # lr multiplier of biases (TransReID family 2)
    head_lr_factor: float = 1.0  # lr multiplier of the new neck / classifier
    layer_decay: float = 1.0  # ViT layer-wise lr decay; 1 = off (PASS / TransReID-SSL), MAE-style 0.4
    scheduler: str = "cosine"  # cosine | step
    warmup_epochs: int = 20  # linear warmup (TransReID-SSL 20, BoT 10)
    warmup_factor: float = 0.01  # warmup starts at lr x this (TransReID 0.01)
    min_lr: float = 8e-7  # end of the cosine schedule (TransReID family: 0.002 x lr)
    milestones: list[int] = field(default_factory=lambda: [40, 70])  # step schedule epochs (BoT 40, 70)
    gamma: float = 0.1  # step schedule factor
    clip_grad: float = 0.0  # max gradient norm; 0 disables

    def validate(self, path: str) -> None:
        _choice(path + ".optimizer", self.optimizer, ("sgd", "adamw", "adam"))
        _choice(path + ".scheduler", self.scheduler, ("cosine", "step"))
        _positive(path + ".epochs", self.epochs)
        _positive(path + ".lr", self.lr)
        _non_negative(path + ".min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr: {self.min_lr} is larger than lr {self.lr}")
        _unit_interval(path + ".momentum", self.momentum)
        _non_negative(path + ".weight_decay", self.weight_decay)
        _positive(path + ".bias_lr_factor", self.bias_lr_factor)
        _positive(path + ".head_lr_factor", self.head_lr_factor)
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{path}.layer_decay: {self.layer_decay}; expected 0 < value <= 1 (1 = off)")
        _non_negative(path + ".warmup_epochs", self.warmup_epochs)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"{path}.warmup_epochs: {self.warmup_epochs} is more than epochs {self.epochs}")
        _unit_interval(path + ".warmup_factor", self.warmup_factor)
        if sorted(self.milestones) != list(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"{path}.milestones: {self.milestones}; expected increasing positive epochs")
        _unit_interval(path + ".gamma", self.gamma)
        _non_negative(path + ".clip_grad", self.clip_grad)


@dataclass
class RecogEvalConfig:
    eval_every: int = 10  # epochs between query/gallery evaluations (0 = only at the end)
    metric: str = "cosine"  # cosine | euclidean distance between embeddings (fast-reid default cosine)
    flip: bool = False  # average the features of the image and its mirror
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017) of the query-gallery distances
    rerank_k1: int = 20  # k1 of re-ranking (fast-reid / torchreid 20; TransReID reports with 50)
    rerank_k2: int = 6  # k2, local query expansion (fast-reid / torchreid 6; TransReID 15)
    rerank_lambda: float = 0.3  # weight of the original distance in the re-ranked one (all 0.3)
    aqe: bool = False  # alpha-weighted average query expansion (fast-reid TEST.AQE)
    aqe_k: int = 5  # neighbours averaged by query expansion, the item itself included (fast-reid 5)
    aqe_alpha: float = 3.0  # similarity exponent of query expansion (fast-reid 3.0)
    topk: int = 0  # >0: rank with a faiss top-k search (huge galleries; mAP@k, mINP@k); 0: the full ranking

    def validate(self, path: str) -> None:
        _non_negative(path + ".eval_every", self.eval_every)
        _choice(path + ".metric", self.metric, ("cosine", "euclidean"))
        for key in ("rerank_k1", "rerank_k2", "aqe_k"):
            _positive(f"{path}.{key}", getattr(self, key))
        _unit_interval(path + ".rerank_lambda", self.rerank_lambda)
        _non_negative(path + ".aqe_alpha", self.aqe_alpha)
        _non_negative(path + ".topk", self.topk)
        if self.rerank and self.topk:
            raise ConfigError(
                f"{path}.rerank with {path}.topk={self.topk}: re-ranking needs the full distance matrix; set topk=0"
            )


@dataclass
class RecogConfig:
    """Stage 2: supervised re-identification fine-tuning."""

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="output/recog"))  # output, seed, resume, ...
    data: RecogDataConfig = field(default_factory=RecogDataConfig)  # train / test sets and the P x K sampler
    aug: ReIDAugConfig = field(default_factory=ReIDAugConfig)  # train augmentation (test: resize + normalise)
    model: RecogModelConfig = field(default_factory=RecogModelConfig)  # backbone, its weights, head
    loss: RecogLossConfig = field(default_factory=RecogLossConfig)  # loss terms and their weights
    train: RecogTrainConfig = field(default_factory=RecogTrainConfig)  # optimiser and schedule
    eval: RecogEvalConfig = field(default_factory=RecogEvalConfig)  # query/gallery evaluation

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.model.arch in VIT_ARCHS:
            _check_patches("aug.size", self.aug.size, self.model.patch_size)
        if self.loss.triplet_weight > 0 or self.loss.center_weight > 0:
            # Batch-hard mining needs a positive (another image of the anchor's identity) and a negative in the batch.
            if self.data.num_instances < 2:
                raise ConfigError(
                    f"data.num_instances: {self.data.num_instances} with a triplet or centre loss; expected >= 2 "
                    "(a positive pair needs two images of one identity in the batch)"
                )
            if self.data.num_identities < 2:
                raise ConfigError(
                    f"data.num_identities: {self.data.num_identities} with a triplet or centre loss; expected >= 2 "
                    "(a negative needs a second identity in the batch)"
                )


# --------------------------------------------------------------------------------------------------------------------
# Value checks shared by the validate() methods


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_vit_size(path: str, model: DinoModelConfig | RecogModelConfig) -> None:
    for key in ("depth", "embed_dim", "num_heads"):
        _non_negative(f"{path}.{key}", getattr(model, key))
    if model.embed_dim and model.num_heads and model.embed_dim % model.num_heads:
        raise ConfigError(f"{path}.embed_dim: {model.embed_dim} is not divisible by num_heads {model.num_heads}")


def _check_patches(key: str, size: tuple[int, int], patch_size: int) -> None:
    """A ViT input must be a whole number of patches in height and width (at least one each)."""
    if any(v % patch_size or v < patch_size for v in size):
        raise ConfigError(
            f"{key}: {list(size)} is not a multiple of model.patch_size {patch_size} in height and width; "
            f"expected e.g. {[max(patch_size, round(v / patch_size) * patch_size) for v in size]}"
        )


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: {value!r}; expected a value > 0")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}: {value!r}; expected a value >= 0")


def _unit_interval(key: str, value: float, closed_right: bool = True) -> None:
    ok = 0 <= value <= 1 if closed_right else 0 <= value < 1
    if not ok:
        raise ConfigError(f"{key}: {value!r}; expected a value in [0, 1{']' if closed_right else ')'}")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _fill(tp(), value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # PyYAML reads 1e-4 (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _valid_keys(cls: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        keys.append(path)
        tp = _strip_optional(typing.get_type_hints(cls)[f.name])
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, path + ".")
    return keys


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _unknown_key(key: str, cls: Any, prefix: str) -> ConfigError:
    keys = _valid_keys(cls, prefix)
    # Compare dotted paths without list indices so `data.train[0].rot` suggests `data.train.root`.
    bare = key.replace("[", ".[").split(".")
    bare = ".".join(p for p in bare if not p.startswith("["))
    close = difflib.get_close_matches(bare, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {key}{hint}")


def _fill(obj: T, values: dict, prefix: str) -> T:
    """Set fields of the dataclass instance `obj` from the mapping `values`, recursively."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    bare_prefix = ".".join(p.split("[")[0] for p in prefix.split(".")) if prefix else ""
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key(key, type(obj), bare_prefix + "." if bare_prefix else "")
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _fill(current, value, key)  # partial update keeps the other defaults of the section
        else:
            setattr(obj, name, _convert(value, tp, key))
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def _apply_override(cfg: Any, parts: list[str], value: Any, cls: Any) -> None:
    """Set one dotted key (list items as `name[i]`) on the config tree."""
    obj: Any = cfg
    walked: list[str] = []
    for depth, part in enumerate(parts):
        name, _, index = part.partition("[")
        key = ".".join(walked + [part])
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(".".join(parts), cls, "")  # the whole key, so the suggestion is a whole key
        last = depth == len(parts) - 1
        if index:
            seq = getattr(obj, name)
            i = int(index.rstrip("]")) if index.rstrip("]").isdigit() else -1
            if not isinstance(seq, list) or not 0 <= i < len(seq):
                n = len(seq) if isinstance(seq, list) else 0
                raise ConfigError(f"{key}: index out of range; {'.'.join(walked + [name])} has {n} entries")
            if last:
                elem_tp = typing.get_args(_strip_optional(typing.get_type_hints(type(obj))[name]))[0]
                seq[i] = _convert(value, elem_tp, key)
                return
            obj = seq[i]
        elif last:
            _fill(obj, {name: value}, ".".join(walked) if walked else "")
            return
        else:
            child = getattr(obj, name)
            if child is None:  # an optional section being switched on from the command line
                child = _strip_optional(typing.get_type_hints(type(obj))[name])()
                setattr(obj, name, child)
            obj = child
        walked.append(part)


def from_dict(cls: type[T], values: dict | None, source: str = "config", overrides: list[str] | None = None) -> T:
    """Build and validate a config of type `cls` from a mapping, then command-line overrides.

    Args:
        cls: DinoConfig or RecogConfig.
        values: nested mapping as read from YAML; None means all defaults.
        source: name of where the values came from, used in error messages.
        overrides: items like `train.lr=0.001` or `data.train[0].root=/data/market`; values are parsed as YAML.

    Raises:
        ConfigError: naming the source, the key, the value and what was expected.
    """
    cfg = cls()
    try:
        if values is not None:
            if not isinstance(values, dict):
                raise ConfigError(f"expected a mapping at the top level, got {type(values).__name__}")
            _fill(cfg, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for item in overrides or []:
        try:
            parts, value = _parse_override(item)
            _apply_override(cfg, parts, value, cls)
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}{' + command line' if overrides else ''}: {e}") from None
    return cfg


def load(path: str | os.PathLike | None, overrides: list[str] | None = None, cls: type[T] = DinoConfig) -> T:
    """Load a YAML config, apply `key.sub=value` overrides, and validate once.

    Args:
        path: YAML file; None uses the dataclass defaults only.
        overrides: items like `train.lr=0.001` or `data.train[0].root=/data/market`; values are parsed as YAML.
        cls: the config dataclass (DinoConfig or RecogConfig).

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the file or override, the key, the value and what was expected.
    """
    if path is None:
        return from_dict(cls, None, "defaults", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return from_dict(cls, values if values is not None else {}, str(p), overrides)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-friendly values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically, so a crash never leaves half a file."""
    atomic_write(path, lambda fh: fh.write(dump(cfg).encode("utf-8")), "config")
