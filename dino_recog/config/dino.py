"""Stage 1: the DINO config and its sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import (
    DATASETS_LABELED,
    DATASETS_UNLABELED,
    MAX_BATCH,
    MAX_CROPS,
    MAX_DEPTH,
    MAX_HEADS,
    MAX_NEIGHBOURS,
    MAX_PROTOTYPES,
    MAX_WIDTH,
    MAX_WORKERS,
    PATCH_SIZES,
    DatasetSpec,
    RunConfig,
    arch,
    arch_is_vit,
    check_heads,
    check_input_sizes,
    image_size,
    norm_mean,
    norm_std,
)
from .constraints import (
    ConfigError,
    Constraint,
    check,
    choice,
    declare,
    non_negative,
    one_of,
    positive,
    range_pair,
    unit_interval,
)

__all__ = [
    "DinoConfig",
    "DinoDataConfig",
    "DinoEvalConfig",
    "DinoLossConfig",
    "DinoModelConfig",
    "DinoTrainConfig",
    "MultiCropConfig",
]


@dataclass
class DinoDataConfig:
    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(name="luperson", root="data/LUPerson/images"))
    keys_file: str = ""  # LMDB only: plain-text key list (never keys.pkl); empty = list the LMDB once and cache
    batch_size_per_gpu: int = positive(64, MAX_BATCH)  # images per process; official DINO 64, TransReID-SSL 8 GPUs x 64
    num_workers: int = non_negative(10, MAX_WORKERS)  # DataLoader workers per process (official DINO 10)
    eval_set: DatasetSpec | None = None  # labeled set whose query/gallery monitor kNN / rank-1 (null = none)

    def validate(self, path: str) -> None:
        check(path + ".train.name", self.train.name, one_of(*DATASETS_UNLABELED))
        if self.eval_set is not None:
            check(path + ".eval_set.name", self.eval_set.name, one_of(*DATASETS_LABELED))
            if self.eval_set.keep_list:
                raise ConfigError(f"{path}.eval_set.keep_list: {self.eval_set.keep_list}; a keep list selects "
                                  "training images, expected it empty here")  # fmt: skip


@dataclass
class DinoModelConfig:
    # vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101 | resnet50_ibn_a | timm:<name> (any timm model)
    arch: str = arch()
    patch_size: int = choice(*PATCH_SIZES, default=16)  # ViT patch size (16 or 8)
    drop_path_rate: float = unit_interval(0.1, open_right=True)  # stochastic depth, student only (official 0.1)
    depth: int = non_negative(0, MAX_DEPTH)  # ViT blocks; 0 = the architecture's (12)
    embed_dim: int = non_negative(0, MAX_WIDTH)  # ViT width; 0 = the architecture's (tiny 192, small 384, base 768)
    # ViT attention heads; 0 = the architecture's (tiny 3, small 6, base 12)
    num_heads: int = non_negative(0, MAX_HEADS)
    out_dim: int = positive(65536, MAX_PROTOTYPES)  # K, prototypes of the DINO head (official 65536)
    hidden_dim: int = positive(2048, MAX_WIDTH)  # DINO head MLP width
    bottleneck_dim: int = positive(256, MAX_WIDTH)  # DINO head bottleneck before the weight-normalised last layer
    norm_last_layer: bool = True  # freeze the weight-norm magnitude of the last layer (official True)
    use_bn_in_head: bool = False  # BatchNorm in the head MLP (official False)
    # ViT LayerScale: residual branches x a learned gamma started here (DINOv2 1e-5); 0 = off
    layerscale: float = non_negative(0.0)
    # ViT register tokens after the CLS token (Darcet et al. 2024; DINOv2 0, "reg" 4)
    num_register_tokens: int = non_negative(0)
    # continued pre-training: start from these weights (ours, DINO, DINOv2, timm); "" = random
    pretrained: str = ""

    def validate(self, path: str) -> None:
        check_heads(path, self)
        if not arch_is_vit(path, self) and (self.layerscale or self.num_register_tokens):
            raise ConfigError(f"{path}.arch: {self.arch} with layerscale or num_register_tokens, which are ViT options")


@dataclass
class DinoLossConfig:
    student_temp: float = positive(0.1)  # student softmax temperature (paper 0.1)
    teacher_temp: float = positive(0.04)  # final teacher temperature (official 0.04; 0.07 in the "boost" recipe)
    warmup_teacher_temp: float = positive(0.04)  # initial teacher temperature (official 0.04)
    warmup_teacher_temp_epochs: int = non_negative(0)  # epochs of linear teacher-temperature warmup (official code 0)
    center_momentum: float = unit_interval(0.9)  # EMA of the teacher-output centre (paper 0.9)
    momentum_teacher: float = unit_interval(0.996)  # base EMA momentum of the teacher, cosine to 1 (official 0.996)
    freeze_last_layer: int = non_negative(1)  # epochs during which the head's last layer gets no gradient (official 1)
    # v1: DINO | v2: DINOv2, DINO + iBOT loss on masked global crops + KoLeo (Oquab et al. 2023)
    version: str = choice("v1", "v2")
    # teacher targets: center (EMA centre) | sinkhorn_knopp (3 iterations; DINOv2 ViT-L/g)
    centering: str = choice("center", "sinkhorn_knopp")
    # v2: KoLeo regulariser on the student's global-crop CLS features (DINOv2 0.1)
    koleo_weight: float = non_negative(0.1)
    ibot_weight: float = non_negative(1.0)  # v2: iBOT masked-patch loss (DINOv2 1.0)
    # v2: fraction of the patches a masked crop hides (DINOv2)
    mask_ratio_min_max: tuple[float, float] = range_pair((0.1, 0.5), zero_low=True)
    mask_sample_probability: float = unit_interval(0.5)  # v2: fraction of the global crops that are masked (DINOv2 0.5)
    separate_ibot_head: bool = False  # v2: patch tokens through their own head of the same size (DINOv2 false)


@dataclass
class MultiCropConfig:
    global_crops_size: tuple[int, int] = image_size((256, 128))  # (height, width) of the 2 global crops (TransReID-SSL)
    global_crops_scale: tuple[float, float] = range_pair((0.4, 1.0))  # area range of a global crop (official (0.4, 1))
    local_crops_number: int = non_negative(8, MAX_CROPS)  # local crops per image (official 8)
    local_crops_size: tuple[int, int] = image_size((128, 64))  # (height, width) of a local crop (TransReID-SSL)
    # area range of a local crop (official (0.05, 0.4))
    local_crops_scale: tuple[float, float] = range_pair((0.05, 0.4))
    part_aware_local_crops: bool = False  # PASS: local crops from top / middle / bottom body regions
    mean: tuple[float, float, float] = norm_mean()  # normalisation mean (ImageNet)
    std: tuple[float, float, float] = norm_std()  # normalisation std (ImageNet)
    gpu_augment: bool = False  # workers return uint8 crops; jitter, grayscale, blur, solarise run batched on the device
    # cpu: workers decode and crop | gpu: workers send JPEG bytes + crop boxes; decode (nvJPEG), crop, resize and the
    # gpu_augment colour ops run on the device
    decode: str = choice("cpu", "gpu")

    def validate(self, path: str) -> None:
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


_LAYER_DECAY = Constraint(lambda v: 0 < v <= 1, "{value}; expected a value in (0, 1]")


@dataclass
class DinoTrainConfig:
    optimizer: str = choice("adamw", "sgd")  # adamw | sgd (sgd for ResNets: official RN50 recipe)
    epochs: int = positive(100)  # training epochs (official and TransReID-SSL 100)
    lr: float = positive(5e-4)  # base learning rate at total batch 256; scaled linearly (official 5e-4)
    min_lr: float = non_negative(1e-6)  # end of the cosine schedule (official 1e-6)
    warmup_epochs: int = non_negative(10)  # linear lr warmup (official 10)
    weight_decay: float = non_negative(0.04)  # start of the cosine weight-decay schedule (official 0.04)
    weight_decay_end: float = non_negative(0.4)  # end of the cosine weight-decay schedule (official 0.4)
    clip_grad: float = non_negative(3.0)  # max gradient norm; 0 disables (official 3.0)
    # batches per process summed into one optimiser step: the lr scales with batch_size_per_gpu x processes x this
    accumulate_steps: int = positive(1)
    momentum: float = unit_interval(0.9)  # SGD momentum
    # ViT layer-wise lr decay: lr x decay^(L + 1 - depth) (DINOv2 0.9; 1 = off)
    layer_decay: float = declare(1.0, _LAYER_DECAY)
    patch_embed_lr_mult: float = non_negative(1.0)  # lr factor of the ViT patch embedding (DINOv2 0.2)

    def validate(self, path: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr: {self.min_lr} is larger than lr {self.lr}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"{path}.warmup_epochs: {self.warmup_epochs} is more than epochs {self.epochs}")


@dataclass
class DinoEvalConfig:
    eval_every: int = non_negative(10)  # epochs between kNN / rank-1 evaluations of the teacher (0 = never)
    knn_k: int = positive(20, MAX_NEIGHBOURS)  # neighbours of the weighted kNN (DINO: 20)
    knn_temperature: float = positive(0.07)  # vote weight exp(sim / T) (DINO: 0.07)
    saveckp_freq: int = non_negative(20)  # epochs between kept numbered checkpoints (official 20)
    export_every: int = non_negative(10)  # epochs between teacher_backbone.pth exports (also at the end)


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

    def validate(self, path: str = "") -> None:
        sizes = {"crops.global_crops_size": self.crops.global_crops_size}
        if self.crops.local_crops_number:  # multi-crop: one network takes both sizes
            sizes["crops.local_crops_size"] = self.crops.local_crops_size
        check_input_sizes(self.model, sizes)
        if self.dino.warmup_teacher_temp_epochs > self.train.epochs:
            raise ConfigError(
                f"dino.warmup_teacher_temp_epochs: {self.dino.warmup_teacher_temp_epochs} is more than "
                f"train.epochs {self.train.epochs}"
            )
        if self.run.parallel == "fsdp" and self.eval.eval_every:
            raise ConfigError(f"eval.eval_every: {self.eval.eval_every} with run.parallel fsdp; the monitoring "
                              "evaluation of a sharded teacher is not supported yet: set eval.eval_every=0 (and "
                              "evaluate teacher_backbone.pth with eval_knn.py / eval_reid.py)")
        if self.dino.version == "v2" and not arch_is_vit("model", self.model):
            raise ConfigError(f"dino.version: v2 masks patch tokens and needs a ViT, not model.arch {self.model.arch}")
        if self.dino.version == "v2" and self.model.use_bn_in_head:
            raise ConfigError(
                "model.use_bn_in_head: true with dino.version v2; the head sees CLS and patch tokens together, whose "
                "batch statistics would mix (DINOv2 has no BatchNorm either)"
            )
