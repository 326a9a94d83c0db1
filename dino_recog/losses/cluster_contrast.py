"""Cluster contrast (Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification", 2021): a memory of one
L2-normalised centroid per pseudo-identity, the ClusterNCE loss against it, and its momentum update.

The memory M (C, D) is re-initialised from the clustering every epoch (`reset`: the mean of each cluster's
normalised features, normalised) and changed only by the momentum update, never by gradients: the loss treats it as a
constant. ClusterNCE of a batch of features x (B, D) with pseudo-labels y (B,), q = x / ||x||:

    L = -1/B sum_i log( exp(q_i . M[y_i] / tau) / sum_{c=1..C} exp(q_i . M[c] / tau) )

i.e. the cross-entropy of the logits q M^T / tau (tau 0.05 in the paper). Update, after the step, with momentum mu
(the paper's 0.2: the centroid keeps 0.2 of itself and takes 0.8 of the feature), then renormalised:

    instance (`hard=False`): for each sample i of the batch in order, M[y_i] <- normalise(mu M[y_i] + (1 - mu) q_i)
    hard (`hard=True`):      for each cluster c of the batch, with h the least similar of its samples to M[c]
                             (argmin_i q_i . M[c]), M[c] <- normalise(mu M[c] + (1 - mu) q_h)

The hard variant is the paper's "hard instance update" (cluster-contrast's `cm_hard`), the one its results use.
Under torchrun every rank updates with the features of every rank's batch (gathered, in rank order), so the
memory stays the same on all of them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dist

__all__ = ["ClusterMemory", "cluster_centroids"]


def cluster_centroids(features: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """L2-normalised mean of the normalised features of each cluster.

    Args:
        features: (N, D) features.
        labels: (N,) cluster index in [0, num_clusters); negative (outliers) are left out.
        num_clusters: C.

    Returns:
        (C, D) float32 centroids.
    """
    keep = labels >= 0
    f = F.normalize(features[keep].float(), dim=1)  # (N', D)
    sums = torch.zeros(num_clusters, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels[keep], f)
    return F.normalize(sums, dim=1)  # the mean's direction: the count would only scale it


class ClusterMemory(nn.Module):
    """The cluster memory and the ClusterNCE loss (formula in the module docstring).

    Args:
        dim: D, the feature size.
        temperature: tau (paper 0.05).
        momentum: mu of the update (paper 0.2).
        hard: the hard-instance update (the paper's results) instead of one update per instance.

    `forward(features (B, D), labels (B,)) -> loss` also records the batch (detached) for `update()`, which the task
    calls after the optimiser step; `reset(centroids)` starts an epoch.
    """

    def __init__(self, dim: int, temperature: float = 0.05, momentum: float = 0.2, hard: bool = True) -> None:
        super().__init__()
        self.temperature, self.momentum, self.hard = temperature, momentum, hard
        # (C, D); its size changes every epoch, so it is saved by the script with the epoch's pseudo-labels, not in
        # the state dict that resume checks against the model's shapes
        self.register_buffer("features", torch.zeros(0, dim), persistent=False)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_clusters(self) -> int:
        return self.features.shape[0]

    def reset(self, centroids: torch.Tensor) -> None:
        """Start from these (C, D) centroids (normalised here); forgets a batch not yet applied."""
        self.features = F.normalize(centroids.detach().to(self.features), dim=1)  # the buffer's dtype and device
        self.pending = []

    def restore(self, memory: torch.Tensor) -> None:
        """Take these rows as they are (a checkpoint's): normalising them again would change their last bits."""
        self.features = memory.detach().to(self.features)
        self.pending = []

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.num_clusters:
            raise RuntimeError("ClusterMemory.forward before reset(): the memory has no clusters")
        q = F.normalize(features, dim=1)  # (B, D)
        logits = q @ self.features.to(q.dtype).t() / self.temperature  # (B, C); the memory is a constant
        self.pending.append((q.detach().to(self.features.dtype), labels.detach()))
        if logits.dtype in (torch.float16, torch.bfloat16):  # under autocast: the softmax of 1/0.05-scaled logits
            logits = logits.float()
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def update(self) -> None:
        """Apply the momentum update with the batches since the last call (every rank's, in rank order)."""
        if not self.pending:
            return
        q = torch.cat([p[0] for p in self.pending])
        y = torch.cat([p[1] for p in self.pending])
        self.pending = []
        if dist.get_world_size() > 1:
            q = torch.cat(dist.all_gather_variable(q))
            y = torch.cat(dist.all_gather_variable(y))
        self.features = momentum_update(self.features, q, y, self.momentum, self.hard)


def momentum_update(memory: torch.Tensor, q: torch.Tensor, y: torch.Tensor, momentum: float,
                    hard: bool) -> torch.Tensor:  # fmt: skip
    """The updated copy of `memory` (C, D) after the batch of normalised features q (B, D) with labels y (B,)."""
    memory = memory.clone()
    if hard:
        sim = (q * memory[y]).sum(1)  # (B,) each sample's similarity to its own centroid, before the update
        for c in torch.unique(y).tolist():  # ascending, like the loop of cm_hard over the batch's clusters
            idx = (y == c).nonzero().flatten()
            h = idx[torch.argmin(sim[idx])]  # the first of equally dissimilar ones
            memory[c] = F.normalize(momentum * memory[c] + (1 - momentum) * q[h], dim=0)
        return memory
    for i in range(len(y)):  # in order: two samples of one cluster update it one after the other
        c = y[i]
        memory[c] = F.normalize(momentum * memory[c] + (1 - momentum) * q[i], dim=0)
    return memory
