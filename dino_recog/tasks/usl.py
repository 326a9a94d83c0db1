"""Stage 2 without labels as one module: cluster contrast (Dai et al. 2021) on pseudo-identities.

`USLTask` owns the recognition model (backbone + BN neck, no classifier: there are no classes) and the cluster
memory (`losses.ClusterMemory`), which is outside DDP (it is no parameter: the momentum update changes it, with
every rank's batch, after each step). Every epoch the script gives it the epoch's pseudo-labels: `pseudo_label`
extracts the features of the target's training images, clusters them (k-reciprocal Jaccard distance + DBSCAN,
`dino_recog.pseudo_labels`) and `start_epoch` resets the memory to the clusters' centroids (and, with labeled
source sets, their identities' centroids after them). `engine.train_one_epoch` runs it like any other task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .. import config as C
from .. import distributed as dist
from .. import parallel
from ..data import datasets as ds
from ..evaluation import extract_features
from ..losses import ClusterMemory, cluster_centroids
from ..models import ReIDModel
from ..optim import reid_param_groups
from .reid import ReIDStep, build_model

__all__ = ["PseudoLabels", "USLTask", "build_usl_task", "pseudo_label"]

log = logging.getLogger(__name__)


class USLTask(nn.Module):
    """Recognition model + cluster memory; the loss is ClusterNCE of the BN-neck feature against the memory.

    Args:
        model: the ReIDModel being trained (its `neck` output is the feature the memory holds).
        memory: the ClusterMemory (reset every epoch by `start_epoch`).
    """

    name = "unsupervised re-id"  # in messages

    def __init__(self, model: ReIDModel, memory: ClusterMemory) -> None:
        super().__init__()
        self.net, self.memory = model, memory
        self._iteration = -1  # the step whose batches the memory holds for its update

    @property
    def model(self) -> ReIDModel:
        return self.net

    @property
    def trainable(self) -> nn.Module:
        return self.net  # what DDP wraps; the memory is not trained by gradients

    def parts(self) -> dict[str, nn.Module]:
        """What resume checks and restores as modules: the model. The memory changes size every epoch: the script
        saves it with the epoch's pseudo-labels (`PseudoLabels.state`)."""
        return {"state_dict": self.net}

    def param_groups(self, bias_lr_factor: float = 1.0, head_lr_factor: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict]:  # fmt: skip
        return reid_param_groups(self.net, bias_lr_factor, head_lr_factor, layer_decay)

    def start_epoch(self, centroids: torch.Tensor) -> None:
        """The memory of the epoch: one row per pseudo-identity (training label), in label order."""
        self.memory.reset(centroids)
        self._iteration = -1

    def forward(self, batch: tuple, step: ReIDStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ClusterNCE on one P x K batch of pseudo-identities. Returns (loss, {"cluster_nce": loss})."""
        if step.iteration != self._iteration:  # a new step (the batches of a skipped one are not applied)
            self.memory.pending = []
            self._iteration = step.iteration
        device = self.memory.features.device
        x, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        out = parallel.ddp_module(self)(x)  # {"feat", "neck", "logits": None}
        loss = self.memory(out["neck"], labels)
        return loss, {"cluster_nce": loss}

    def cancel_gradients(self, step: ReIDStep) -> None:
        pass

    @torch.no_grad()
    def after_step(self, step: ReIDStep) -> None:
        """The momentum update of the memory with the step's batches (every rank's)."""
        self.memory.update()

    def log_stats(self, step: ReIDStep, terms: dict[str, float], loss: float, epoch: int) -> dict[str, float]:
        return {}

    def epoch_stats(self) -> dict[str, float]:
        return {}  # the clustering's numbers have a record of their own ("cluster"), written before the epoch


def build_usl_task(cfg: C.UslConfig) -> USLTask:
    """The model (`model.*`, weights from `model.pretrained`: a stage-1 export, a DINO checkpoint or a stage-2
    model.pth, as stage 2 loads them) without a classifier, and the memory (`loss.*`)."""
    model = build_model(cfg, 0, classifier=False)
    memory = ClusterMemory(model.head.out_dim, cfg.loss.temperature, cfg.loss.momentum, cfg.loss.hard)
    return USLTask(model, memory)


# ---------------------------------------------------------------------------------------------------------------------
# Pseudo-labels


@dataclass
class PseudoLabels:
    """One epoch's training labels.

    Attributes:
        epoch: the epoch (0-based) they were made for.
        target: (N,) cluster of each target training image, -1 for an outlier (left out this epoch).
        records: the epoch's training records: the clustered target images with their cluster as pid, then the
            source images with their identity + the number of clusters.
        centroids: (C, D) the memory's initial rows, in pid order.
    """

    epoch: int
    target: np.ndarray
    records: list[ds.Record]
    centroids: torch.Tensor

    def state(self, memory: torch.Tensor) -> dict:
        """What a checkpoint holds to resume inside the epoch: the labels and the memory as it is now."""
        return {"epoch": self.epoch, "target": torch.from_numpy(self.target), "memory": memory.detach().cpu()}


def pseudo_label(
    model: nn.Module, epoch: int, target: list[ds.Record], source: list[ds.Record], extract_set, cfg: C.UslConfig,
    device: torch.device, saved: dict | None = None,
) -> tuple[PseudoLabels, dict]:  # fmt: skip
    """The epoch's pseudo-labels: extract the features of the target (and source) training images with the current
    model, cluster the target's on rank 0 (every rank gets its labels), and build the records and centroids.

    Args:
        target, source: the training records of the target (their pids only measure the clustering) and of the
            source sets (pids 0..S-1, trained on).
        extract_set: records -> an evaluation data set over them (resize + normalise).
        saved: a checkpoint's `PseudoLabels.state` of this epoch (a resume inside it): its labels and memory are
            taken as they are; nothing is extracted or clustered.

    Returns:
        The labels, and the clustering's numbers (`pseudo_labels.cluster_quality` against the target's identities).
    """
    from ..pseudo_labels import cluster, cluster_quality

    c = cfg.cluster
    if saved is not None:
        labels, centroids = saved["target"].numpy(), saved["memory"]
    else:
        features, _, _ = extract_features(model, extract_set(target), device, cfg.data.test_batch_size,
                                          cfg.data.num_workers)  # fmt: skip
        labels = dist.run_on_main(lambda: cluster(features.numpy(), c.eps, c.min_samples, c.k1, c.k2))
        labels = np.asarray(dist.broadcast_object(labels), dtype=np.int64)
    n_clusters = int(labels.max()) + 1 if len(labels) else 0
    if n_clusters <= 0:
        raise RuntimeError(f"epoch {epoch}: the clustering of {len(labels)} target images found no cluster (every "
                           f"image an outlier at cluster.eps {c.eps}, min_samples {c.min_samples}); raise cluster.eps "
                           "or start from a better model.pretrained")  # fmt: skip
    quality = cluster_quality(labels, np.array([r.pid for r in target]))
    log.info("epoch %d: %d clusters, %d outliers of %d images; against the true identities NMI %.4f ARI %.4f", epoch,
             quality["num_clusters"], quality["num_outliers"], len(labels), quality["nmi"], quality["ari"])  # fmt: skip
    keep = np.flatnonzero(labels >= 0)
    records = [ds.Record(target[i].path, int(labels[i]), target[i].camid) for i in keep]
    records += [ds.Record(r.path, n_clusters + int(r.pid), r.camid) for r in source]
    if saved is None:
        centroids = cluster_centroids(features, torch.from_numpy(labels), n_clusters)
        if source:  # the source identities' rows after the clusters', from the same model
            s_feat, s_ids, _ = extract_features(model, extract_set(source), device, cfg.data.test_batch_size,
                                                cfg.data.num_workers)  # fmt: skip
            ids = torch.from_numpy(s_ids).long()
            centroids = torch.cat([centroids, cluster_centroids(s_feat, ids, int(ids.max()) + 1)])
    return PseudoLabels(epoch, labels, records, centroids), quality
