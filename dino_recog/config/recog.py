"""Stage 2: the re-identification fine-tuning config and its sections."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .common import (
    DATASETS_LABELED,
    DATASETS_LMDB_LABELED,
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
    pixels,
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
    unit_interval,
)

__all__ = [
    "RecogConfig",
    "RecogDataConfig",
    "RecogEvalConfig",
    "RecogLossConfig",
    "RecogModelConfig",
    "RecogTrainConfig",
    "ReIDAugConfig",
]

_NOT_EMPTY = Constraint(bool, "empty list; expected at least one data set")


@dataclass
class RecogDataConfig:
    train: list[DatasetSpec] = declare([DatasetSpec()], _NOT_EMPTY)  # combined when several
    test: DatasetSpec = field(default_factory=DatasetSpec)  # query/gallery set; may differ (cross-domain)
    num_identities: int = positive(16, MAX_BATCH)  # P: identities per batch (BoT 16)
    num_instances: int = positive(4, MAX_BATCH)  # K: images per identity per batch (BoT 4); batch = P x K per process
    num_workers: int = non_negative(8, MAX_WORKERS)  # DataLoader workers per process
    test_batch_size: int = positive(256, MAX_BATCH)  # images per process at feature extraction
    min_images_per_id: int = non_negative(0)  # drop training identities with fewer images (0 = keep all)
    # pk_epoch: every image once per epoch, in chunks of K (torchreid's RandomIdentitySampler); pk_random: each
    # step draws its P identities (image-weighted) and K images anew, O(P K) per step (millions of images)
    sampler: str = choice("pk_epoch", "pk_random")
    iters_per_epoch: int = non_negative(0)  # steps per epoch; 0 = images / (P x K x processes)

    def validate(self, path: str) -> None:
        if self.num_identities * self.num_instances > MAX_BATCH:
            raise ConfigError(f"{path}.num_identities: {self.num_identities} x num_instances {self.num_instances} = "
                              f"{self.num_identities * self.num_instances} images per process; expected at most "
                              f"{MAX_BATCH}")  # fmt: skip
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.train):
            check(f"{path}.train[{i}].name", spec.name, one_of(*DATASETS_LABELED, *DATASETS_LMDB_LABELED))
            if spec.name in DATASETS_LMDB_LABELED and len(self.train) > 1:
                raise ConfigError(f"{path}.train[{i}]: {spec.name} is combined with {len(self.train) - 1} other "
                                  "set(s); expected an LMDB set alone (pack the others into it with "
                                  "python -m dino_recog.data.build_lmdb)")  # fmt: skip
            # the same folder twice would count each identity twice, as two people
            where = os.path.normpath(os.path.abspath(spec.root))
            if where in seen:
                raise ConfigError(f"{path}.train[{i}]: {spec.root} is also {path}.train[{seen[where]}]; expected "
                                  "each training set once")  # fmt: skip
            seen[where] = i
        check(path + ".test.name", self.test.name, one_of(*DATASETS_LABELED))
        if self.test.keep_list:
            raise ConfigError(f"{path}.test.keep_list: {self.test.keep_list}; a keep list selects training images, "
                              "expected it empty here (the query/gallery protocol is fixed)")  # fmt: skip


@dataclass
class ReIDAugConfig:
    size: tuple[int, int] = image_size((256, 128))  # (height, width) input (BoT, TransReID-SSL)
    flip_prob: float = unit_interval(0.5)  # horizontal flip probability (BoT 0.5)
    padding: int = pixels(10)  # pixels of padding before the random crop back to `size` (BoT 10)
    erasing_prob: float = unit_interval(0.5)  # random erasing probability (BoT 0.5)
    color_jitter: bool = False  # brightness/contrast/saturation/hue jitter (off in BoT)
    mean: tuple[float, float, float] = norm_mean()  # normalisation mean; same as stage 1
    std: tuple[float, float, float] = norm_std()  # normalisation std; same as stage 1


@dataclass
class RecogModelConfig:
    # vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101 | resnet50_ibn_a | timm:<name> (any timm model)
    arch: str = arch()
    patch_size: int = choice(*PATCH_SIZES, default=16)  # ViT patch size
    drop_path_rate: float = unit_interval(0.1, open_right=True)  # stochastic depth (TransReID 0.1)
    depth: int = non_negative(0, MAX_DEPTH)  # ViT blocks; 0 = the architecture's (12)
    embed_dim: int = non_negative(0, MAX_WIDTH)  # ViT width; 0 = the architecture's (tiny 192, small 384, base 768)
    # ViT attention heads; 0 = the architecture's (tiny 3, small 6, base 12)
    num_heads: int = non_negative(0, MAX_HEADS)
    pretrained: str = "output/dino/teacher_backbone.pth"  # stage-1 export/checkpoint, DINO or timm weights; "" = none
    # which network of a stage-1 / official DINO checkpoint: teacher | student
    pretrained_key: str = choice("teacher", "student")
    feature: str = "cls"  # ViT: cls | cls_mean (CLS + mean patch token); ResNet: avg | gem
    last_stride: int = choice(1, 2)  # ResNet last-stage stride (BoT 1)
    embedding_dim: int = non_negative(0, MAX_WIDTH)  # optional linear embedding before the BN neck; 0 = none
    neck: str = choice("bnneck", "none")  # bnneck (BN before the classifier, bias frozen; Luo et al. 2019) | none
    # the embedding evaluated, extracted and exported (saved in model.pth): after_neck (BN output; BoT) | before_neck
    # (the feature entering the BN; TEST.NECK_FEAT before: TransReID-SSL, PASS, SOLIDER-REID)
    test_feature: str = choice("after_neck", "before_neck")

    def validate(self, path: str) -> None:
        check_heads(path, self)
        allowed = ("cls", "cls_mean") if arch_is_vit(path, self) else ("avg", "gem")
        check(path + ".feature", self.feature, one_of(*allowed))


_RADIANS = Constraint(lambda v: 0 <= v < math.pi / 2, "{value}; expected radians in [0, pi/2)")
_SAMPLE_RATE = Constraint(lambda v: 0 < v <= 1, "{value}; expected 0 < rate <= 1 (1 = every class)")
# the losses with a classifier that loss.partial_fc shards
SHARDABLE = ("ce_weight", "cosface_weight", "arcface_weight", "combined_weight")


@dataclass
class RecogLossConfig:
    ce_weight: float = non_negative(1.0)  # softmax cross-entropy weight
    label_smoothing: float = unit_interval(0.1, open_right=True)  # epsilon of label smoothing (BoT 0.1)
    triplet_weight: float = non_negative(1.0)  # batch-hard triplet weight (Hermans et al. 2017)
    triplet_margin: float = non_negative(0.0)  # margin; 0 = soft margin log(1 + exp(d_ap - d_an)) (TransReID-SSL)
    triplet_distance: str = choice("euclidean", "cosine")  # euclidean | cosine
    cosface_weight: float = non_negative(0.0)  # CosFace (Wang et al. 2018) weight; 0 = off
    cosface_s: float = positive(30.0)  # CosFace scale
    cosface_m: float = non_negative(0.35)  # CosFace additive cosine margin
    arcface_weight: float = non_negative(0.0)  # ArcFace (Deng et al. 2019) weight; 0 = off
    arcface_s: float = positive(30.0)  # ArcFace scale
    arcface_m: float = declare(0.5, _RADIANS)  # ArcFace additive angular margin (radians)
    # arcface_torch's combined margin, target logit s (cos(m1 t + m2) - m3) (Deng et al. 2019, 3.3); 0 = off
    combined_weight: float = non_negative(0.0)
    combined_s: float = positive(64.0)  # scale (arcface_torch 64)
    combined_m1: float = positive(1.0)  # multiplicative angular margin (SphereFace); arcface_torch 1.0
    combined_m2: float = declare(0.5, _RADIANS)  # additive angular margin (ArcFace), radians; arcface_torch 0.5
    combined_m3: float = non_negative(0.0)  # additive cosine margin (CosFace); arcface_torch 0.0
    # shard the classifiers of ce / cosface / arcface / combined over the processes (Partial FC, An et al. 2022)
    partial_fc: bool = False
    # fraction of each shard's classes scored per step, the batch's identities always among them (paper 0.1)
    partial_fc_sample_rate: float = declare(0.1, _SAMPLE_RATE)
    # prototype-guided correction of noisy labels (PNL, Zhu et al. 2022) in the sharded ce (or first) classifier
    label_correction: bool = False
    label_correction_start_epoch: int = non_negative(11)  # epochs before it starts (PNL 11)
    label_correction_alpha: float = unit_interval(0.5)  # weight of the classifier against the prototypes (PNL 0.5)
    label_correction_threshold: float = unit_interval(0.8)  # confidence above which a label is replaced (PNL 0.8)
    label_correction_t: float = positive(0.07)  # temperature of the prototype similarities (PNL 0.07)
    label_correction_momentum: float = unit_interval(0.999)  # moving average of the prototypes (PNL 0.999)
    center_weight: float = non_negative(0.0)  # center loss weight (BoT 5e-4); 0 = off
    center_lr: float = positive(0.5)  # SGD lr of the class centres (BoT 0.5)
    distill_weight: float = non_negative(0.0)  # alpha of knowledge distillation (Hinton et al. 2015); 0 = off
    distill_temperature: float = positive(4.0)  # T of the softened distributions
    distill_teacher: str = ""  # stage-2 checkpoint of the frozen teacher (any architecture)
    dino_aux_weight: float = non_negative(0.0)  # DINO on the backbone as an auxiliary loss (DINOWrapper); 0 = off
    dino_aux_out_dim: int = positive(4096, MAX_PROTOTYPES)  # prototypes of the auxiliary DINO head
    # local crops per image of the auxiliary DINO loss (half the input size)
    dino_aux_local_crops: int = non_negative(2, MAX_CROPS)

    def validate(self, path: str) -> None:
        if self.distill_weight > 0 and not self.distill_teacher:
            raise ConfigError(f"{path}.distill_teacher: empty while distill_weight > 0; expected a checkpoint path")
        if sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_weight")) == 0:
            raise ConfigError(f"{path}: every loss weight is 0; expected at least one loss")
        if self.label_correction and not self.partial_fc:
            raise ConfigError(f"{path}.label_correction needs {path}.partial_fc=true: it runs in the sharded "
                              "classifier (on one process with partial_fc_sample_rate 1 that is the plain classifier)")
        if self.partial_fc:
            if self.distill_weight > 0:
                raise ConfigError(f"{path}.partial_fc with {path}.distill_weight={self.distill_weight}: distillation "
                                  "reads the logits of every class, which a sharded classifier never forms; set "
                                  "distill_weight=0 or partial_fc=false")  # fmt: skip
            if not any(getattr(self, k) > 0 for k in SHARDABLE):
                raise ConfigError(f"{path}.partial_fc: no loss with a classifier is on; expected one of "
                                  f"{', '.join(path + '.' + k for k in SHARDABLE)} > 0")  # fmt: skip


_LAYER_DECAY = Constraint(lambda v: 0 < v <= 1, "{value}; expected 0 < value <= 1 (1 = off)")
_MILESTONES = Constraint(
    lambda v: sorted(v) == list(v) and all(m > 0 for m in v), "{value}; expected increasing positive epochs"
)


@dataclass
class RecogTrainConfig:
    optimizer: str = choice("sgd", "adamw", "adam")  # sgd | adamw | adam (TransReID-SSL: sgd; BoT: adam)
    epochs: int = positive(120)  # training epochs (TransReID-SSL, BoT 120)
    lr: float = positive(4e-4)  # base learning rate (TransReID-SSL ViT-S 0.0004)
    momentum: float = unit_interval(0.9)  # SGD momentum
    weight_decay: float = non_negative(1e-4)  # (TransReID-SSL 1e-4; BoT 5e-4)
    bias_lr_factor: float = positive(2.0)  # lr multiplier of biases (TransReID family 2)
    head_lr_factor: float = positive(1.0)  # lr multiplier of the new neck / classifier
    # ViT layer-wise lr decay; 1 = off (PASS / TransReID-SSL), MAE-style 0.4
    layer_decay: float = declare(1.0, _LAYER_DECAY)
    scheduler: str = choice("cosine", "step")  # cosine | step
    warmup_epochs: int = non_negative(20)  # linear warmup (TransReID-SSL 20, BoT 10)
    warmup_factor: float = unit_interval(0.01)  # warmup starts at lr x this (TransReID 0.01)
    min_lr: float = non_negative(8e-7)  # end of the cosine schedule (TransReID family: 0.002 x lr)
    milestones: list[int] = declare([40, 70], _MILESTONES)  # step schedule epochs (BoT 40, 70)
    gamma: float = unit_interval(0.1)  # step schedule factor
    clip_grad: float = non_negative(0.0)  # max gradient norm; 0 disables
    # P x K batches per process summed into one optimiser step (effective batch P x K x processes x this)
    accumulate_steps: int = positive(1)

    def validate(self, path: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr: {self.min_lr} is larger than lr {self.lr}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"{path}.warmup_epochs: {self.warmup_epochs} is more than epochs {self.epochs}")


@dataclass
class RecogEvalConfig:
    eval_every: int = non_negative(10)  # epochs between query/gallery evaluations (0 = only at the end)
    # cosine | euclidean distance between embeddings (fast-reid default cosine)
    metric: str = choice("cosine", "euclidean")
    flip: bool = False  # average the features of the image and its mirror
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017) of the query-gallery distances
    # k1 of re-ranking (fast-reid / torchreid 20; TransReID reports with 50)
    rerank_k1: int = positive(20, MAX_NEIGHBOURS)
    rerank_k2: int = positive(6, MAX_NEIGHBOURS)  # k2, local query expansion (fast-reid / torchreid 6; TransReID 15)
    rerank_lambda: float = unit_interval(0.3)  # weight of the original distance in the re-ranked one (all 0.3)
    aqe: bool = False  # alpha-weighted average query expansion (fast-reid TEST.AQE)
    # neighbours averaged by query expansion, the item itself included (fast-reid 5)
    aqe_k: int = positive(5, MAX_NEIGHBOURS)
    aqe_alpha: float = non_negative(3.0)  # similarity exponent of query expansion (fast-reid 3.0)
    # >0: rank with a faiss top-k search (huge galleries; mAP@k, mINP@k); 0: the full ranking
    topk: int = non_negative(0)

    def validate(self, path: str) -> None:
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

    def validate(self, path: str = "") -> None:
        if self.run.parallel == "fsdp":
            # both rescale or copy the weights FSDP shards through the original parameters, which it replaces
            for key, why in (("center_weight", "the centres' own SGD (loss.center_lr) rescales their gradient with a "
                              "hook on the parameter"), ("dino_aux_weight", "the auxiliary DINO teacher follows the "
                              "backbone's parameters by EMA")):  # fmt: skip
                if getattr(self.loss, key) > 0:
                    raise ConfigError(f"loss.{key}: {getattr(self.loss, key)} with run.parallel fsdp: {why}, which "
                                      f"FSDP replaces by shards; set loss.{key}=0 or run.parallel=ddp")  # fmt: skip
        check_input_sizes(self.model, {"aug.size": self.aug.size})
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
