"""Stage 2 without labels: the unsupervised / domain-adaptive re-identification config (cluster contrast).

The model, augmentation and evaluation sections are stage 2's (`recog`); the training section is stage 2's with the
defaults of the published cluster-contrast runs of TransReID-SSL (SGD lr 3.5e-4, weight decay 5e-4, 50 epochs of
200 iterations, lr x 0.1 every 20 epochs, no warmup).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .common import (
    DATASETS_LABELED,
    MAX_BATCH,
    MAX_NEIGHBOURS,
    MAX_WORKERS,
    DatasetSpec,
    RunConfig,
    check_input_sizes,
)
from .constraints import ConfigError, Constraint, check, choice, declare, non_negative, one_of, positive, unit_interval
from .recog import _MILESTONES, RecogEvalConfig, RecogModelConfig, RecogTrainConfig, ReIDAugConfig

__all__ = ["UslClusterConfig", "UslConfig", "UslDataConfig", "UslLossConfig", "UslTrainConfig"]


@dataclass
class UslDataConfig:
    # the unlabeled target: its training split is clustered (its identities, where it has them, are only compared
    # with the clusters in the log); market1501 | msmt17 | labeled_folder | demo (+ dukemtmcreid, ...)
    train: DatasetSpec = field(default_factory=DatasetSpec)
    test: DatasetSpec = field(default_factory=DatasetSpec)  # query/gallery set (the target's own)
    # labeled source sets trained jointly with the target's clusters (their identities join the memory); [] = the
    # published protocol, where the source is used before this stage (model.pretrained = a stage-2 model on it)
    source: list[DatasetSpec] = field(default_factory=list)
    # P: pseudo-identities per batch per process (published 32 x 8 = 256 images a step in all)
    num_identities: int = positive(8, MAX_BATCH)
    num_instances: int = positive(8, MAX_BATCH)  # K: images per pseudo-identity per batch (published 8)
    num_workers: int = non_negative(8, MAX_WORKERS)  # DataLoader workers per process
    test_batch_size: int = positive(256, MAX_BATCH)  # images per process at feature extraction (clustering, eval)
    # pk_epoch: every clustered image once per epoch in chunks of K; pk_random: P identities and K images drawn anew
    # each step (the published RandomMultipleGallerySampler draws per step)
    sampler: str = choice("pk_random", "pk_epoch")
    iters_per_epoch: int = non_negative(200)  # steps per epoch (published 200); 0 = clustered images / (P K processes)

    def validate(self, path: str) -> None:
        if self.num_identities * self.num_instances > MAX_BATCH:
            raise ConfigError(f"{path}.num_identities: {self.num_identities} x num_instances {self.num_instances} = "
                              f"{self.num_identities * self.num_instances} images per process; expected at most "
                              f"{MAX_BATCH}")  # fmt: skip
        check(path + ".train.name", self.train.name, one_of(*DATASETS_LABELED))
        check(path + ".test.name", self.test.name, one_of(*DATASETS_LABELED))
        target = os.path.normpath(os.path.abspath(self.train.root))
        for i, spec in enumerate(self.source):
            check(f"{path}.source[{i}].name", spec.name, one_of(*DATASETS_LABELED))
            if os.path.normpath(os.path.abspath(spec.root)) == target and spec.name == self.train.name:
                raise ConfigError(f"{path}.source[{i}]: {spec.root} is also {path}.train; expected a labeled set "
                                  "other than the unlabeled target")  # fmt: skip


_EPS = Constraint(lambda v: 0 < v < 1, "{value}; expected 0 < eps < 1 (Jaccard distances lie in [0, 1])")


@dataclass
class UslClusterConfig:
    k1: int = positive(30, MAX_NEIGHBOURS)  # k-reciprocal neighbours of the Jaccard distance (cluster contrast 30)
    k2: int = positive(6, MAX_NEIGHBOURS)  # neighbours of the local query expansion (cluster contrast 6)
    eps: float = declare(0.6, _EPS)  # DBSCAN radius on the Jaccard distance (published: Market 0.6, MSMT17 0.7)
    min_samples: int = positive(4, MAX_NEIGHBOURS)  # DBSCAN core points' neighbourhood, the point itself included (4)


@dataclass
class UslLossConfig:
    temperature: float = positive(0.05)  # tau of ClusterNCE (cluster contrast 0.05)
    momentum: float = unit_interval(0.2)  # a centroid keeps this much of itself at each update (cluster contrast 0.2)
    hard: bool = True  # hard-instance update: the least similar sample of each cluster in the batch (the paper's)


@dataclass
class UslTrainConfig(RecogTrainConfig):
    epochs: int = positive(50)  # training epochs, one clustering each (published 50)
    lr: float = positive(3.5e-4)  # base learning rate (published 0.00035)
    weight_decay: float = non_negative(5e-4)  # (published 5e-4)
    bias_lr_factor: float = positive(1.0)  # lr multiplier of biases (published 1: one group)
    scheduler: str = choice("step", "cosine")  # step | cosine (published: step)
    warmup_epochs: int = non_negative(0)  # linear warmup (published none)
    milestones: list[int] = declare([20, 40], _MILESTONES)  # step schedule epochs (published StepLR(20, 0.1))


@dataclass
class UslConfig:
    """Stage 2 without labels: cluster contrast on the target's training images."""

    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="output/usl"))  # output, seed, resume, ...
    data: UslDataConfig = field(default_factory=UslDataConfig)  # target / source / test sets and the P x K sampler
    aug: ReIDAugConfig = field(default_factory=ReIDAugConfig)  # train augmentation (test: resize + normalise)
    model: RecogModelConfig = field(default_factory=RecogModelConfig)  # backbone, its weights, head
    cluster: UslClusterConfig = field(default_factory=UslClusterConfig)  # pseudo-labels: Jaccard distance + DBSCAN
    loss: UslLossConfig = field(default_factory=UslLossConfig)  # ClusterNCE and its memory
    train: UslTrainConfig = field(default_factory=UslTrainConfig)  # optimiser and schedule
    eval: RecogEvalConfig = field(default_factory=RecogEvalConfig)  # query/gallery evaluation

    def validate(self, path: str = "") -> None:
        if self.run.parallel == "fsdp":
            raise ConfigError("run.parallel: fsdp is implemented for stages 1 and 2 (train_dino.py, train_recog.py) "
                              "only so far; the unsupervised stage trains with run.parallel=ddp")  # fmt: skip
        check_input_sizes(self.model, {"aug.size": self.aug.size})
