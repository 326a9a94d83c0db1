"""Partial FC: a softmax classifier whose class centres are sharded across processes (An et al. 2022, "Killing Two
Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by Partial FC", CVPR; insightface's
arcface_torch `partial_fc_v2.py` is the reference implementation).

With C classes on W processes, rank r stores and optimises only its C / W class centres. A step all-gathers the
embeddings (and labels) of the global batch, scores them against the local shard, and does the softmax with an
all-reduced max and sum, so no process ever holds the C-wide logits or the whole classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dist
from .metric import margin_target

__all__ = ["KINDS", "LabelCorrection", "PartialFC", "shard_range"]

KINDS = ("ce", "cosface", "arcface", "combined")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) of rank `rank`'s shard: C // W each, the first C % W ranks one more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of the (B_r, D) embeddings of every rank into (sum B_r, D), in rank order.

    Backward all-reduces the gradient of the gathered batch (each rank's shard contributed a part of it), keeps this
    rank's rows and multiplies them by W: DDP divides the backbone's gradient by W, and the loss here is already the
    mean over the global batch, not over this rank's share.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = dist.all_gather_variable(x.contiguous())
        ctx.start, ctx.n = sum(len(p) for p in parts[: dist.get_rank()]), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.n] * dist.get_world_size()


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (with label smoothing eps over the N scored classes) of logits split by class over ranks.

        loss_i = log sum_j e^{z_ij} - (1 - eps) z_iy - eps mean_j z_ij,   d loss_i / d z_ij = p_ij - q_ij

    with the max, the sum of exponentials, the target logit and the sum of logits all-reduced over the ranks.
    Shapes: logits (B, n_r) of this rank's classes, target (B,) the index among them or -1 (on another rank).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, epsilon: float, num_scored: int) -> torch.Tensor:
        here = target >= 0
        rows = torch.arange(len(target), device=logits.device)
        p, top, total = _sharded_softmax(logits)  # kept for backward
        z_y = dist.all_reduce_sum(torch.where(here, logits[rows, target.clamp_min(0)], 0.0) if logits.shape[1]
                                  else logits.new_zeros(len(logits)))  # fmt: skip
        loss = total.log() + top - (1.0 - epsilon) * z_y
        if epsilon:
            loss = loss - epsilon * dist.all_reduce_sum(logits.sum(1)) / num_scored
        ctx.save_for_backward(p, target)
        ctx.epsilon, ctx.num_scored = epsilon, num_scored
        return loss.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, target = ctx.saved_tensors
        g = p.clone()
        here = (target >= 0).nonzero().squeeze(1)
        g[here, target[here]] -= 1.0 - ctx.epsilon
        if ctx.epsilon:
            g -= ctx.epsilon / ctx.num_scored
        return g * (grad / len(target)), None, None, None


class PartialFC(nn.Module):
    """A classifier of `num_classes` centres sharded over the processes, with the loss of one of `KINDS`:

        ce:        z_j = <f, W_j>                                          (softmax; label smoothing `epsilon`)
        cosface:   z_j = s cos t_j,   z_y = s (cos t_y - m3)               (Wang et al. 2018)
        arcface:   z_j = s cos t_j,   z_y = s cos(t_y + m2)                (Deng et al. 2019)
        combined:  z_j = s cos t_j,   z_y = s (cos(m1 t_y + m2) - m3)      (arcface_torch's CombinedMarginLoss)

        loss = mean over the global batch of  -log( e^{z_y} / sum_{j in S} e^{z_j} )

    with cos t_j = <f / |f|, W_j / |W_j|> and S the scored classes: every class (`sample_rate` 1), or per step the
    positives of the global batch plus random negatives, `sample_rate` x C in all (Partial FC's sampling). The
    margins are those of `CosFaceLoss` / `ArcFaceLoss` / `CombinedMarginLoss` (`margin_target`), so on one process
    at `sample_rate` 1 this is exactly those losses (and `CrossEntropyLabelSmooth` over the logits of a bias-free
    linear classifier); on W processes it is the same loss over the concatenated batch.

    `weight` is this rank's shard (n_r, D): classes [first, first + n_r) of `shard_range`. The sampled negatives come
    from a generator seeded by (seed, rank, step) with `step` a buffer saved with the shard, so a resumed run draws
    what the uninterrupted one would. The gradient reaching the embeddings is W x d loss / d f (see
    `_GatherWithGrad`): train the backbone with DDP and the shard with an optimiser of its own, outside DDP.

    Args:
        in_features: D.
        num_classes: C, at least the number of processes.
        kind: one of `KINDS`.
        s: the scale of the margin kinds.
        margins: (m1, m2, m3); `cosface` uses m3, `arcface` m2.
        sample_rate: the fraction of each shard's classes scored per step (positives always); 1 = all.
        epsilon: label smoothing (Szegedy et al. 2016) over the scored classes.
        seed: base seed of the negative sampling and of the shard's initialisation.
        correction: prototype-guided label correction (`LabelCorrection`), or None.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "cosface", s: float = 30.0,
                 margins: tuple[float, float, float] = (1.0, 0.0, 0.35), sample_rate: float = 1.0,
                 epsilon: float = 0.0, seed: int = 0, correction: LabelCorrection | None = None) -> None:  # fmt: skip
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"partial FC loss {kind!r}: expected one of {', '.join(KINDS)}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate {sample_rate}: expected 0 < rate <= 1")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} processes; expected at "
                             "least one class per process")  # fmt: skip
        self.num_classes, self.kind, self.s, self.sample_rate, self.epsilon = num_classes, kind, s, sample_rate, epsilon
        self.m1, self.m2, self.m3 = {"cosface": (1.0, 0.0, margins[2]), "arcface": (1.0, margins[1], 0.0)}.get(
            kind, tuple(margins)
        )
        self.seed = seed
        self.first, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        g = torch.Generator().manual_seed(_seed(seed, self.rank, -1))
        # The initialisations of the replicated classifiers: the BN-neck linear classifier's and _MarginSoftmax's.
        std = 0.001 if kind == "ce" else 0.01
        self.weight = nn.Parameter(torch.randn(self.num_local, in_features, generator=g) * std)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_index: torch.Tensor | None = None  # the local classes scored by the last training step
        self.correction = correction
        if correction is not None:
            # the class prototypes of this rank's shard, in the space of the L2-normalised embeddings
            self.register_buffer("prototypes", torch.zeros(self.num_local, in_features))
            self.register_buffer("corrected", torch.zeros((), dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.kind}, classes {self.first}..{self.first + self.num_local - 1} of {self.num_classes} "
                f"(rank {self.rank}/{self.world_size}), sample_rate={self.sample_rate}")  # fmt: skip

    def _sample(self, positives: torch.Tensor) -> torch.Tensor | None:
        """The sorted local classes to score: all positives, then random negatives up to rate x n_r."""
        num_sample = int(self.sample_rate * self.num_local)
        if not self.training or num_sample >= self.num_local:
            return None
        g = torch.Generator(device=self.weight.device).manual_seed(_seed(self.seed, self.rank, int(self.step)))
        score = torch.rand(self.num_local, generator=g, device=self.weight.device)
        score[positives] = 2.0  # above any draw: the positives are always kept
        k = max(num_sample, len(positives))
        return score.topk(k).indices.sort().values

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            features = _GatherWithGrad.apply(features)
            labels = torch.cat(dist.all_gather_variable(labels.contiguous()))
        if self.correction is not None and self.training:
            labels = self._correct(features.detach(), labels)
        local = labels - self.first
        mine = (local >= 0) & (local < self.num_local)
        target = torch.where(mine, local, -1)
        index = self._sample(local[mine].unique())
        weight = self.weight
        if index is not None:
            weight = weight[index]
            target = torch.where(mine, torch.searchsorted(index, target.clamp_min(0)), -1)
        self.last_index = None if index is None else index + self.first
        if self.training:
            self.step += 1
        if self.kind == "ce":
            logits = F.linear(features, weight).float()
        else:
            cos = F.linear(F.normalize(features.float(), dim=1), F.normalize(weight.float(), dim=1)).float()
            rows = mine.nonzero().squeeze(1)
            cos = cos.index_put((rows, target[rows]), margin_target(cos[rows, target[rows]], self.m1, self.m2,
                                                                    self.m3))  # fmt: skip
            logits = self.s * cos
        num_scored = 0  # all ranks join the sum (only label smoothing needs it): some may score all their classes
        if self.epsilon:
            here = torch.tensor(self.num_local if index is None else len(index), device=logits.device)
            num_scored = int(dist.all_reduce_sum(here))
        return _ShardedCrossEntropy.apply(logits, target, self.epsilon, num_scored)


    @torch.no_grad()
    def _correct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labels of the global batch after `LabelCorrection` (from its start step on), then the prototype update
        with them."""
        c = self.correction
        f = F.normalize(features.float(), dim=1)
        if int(self.step) >= c.start_step:
            weight = self.weight.float()
            logits = f @ F.normalize(weight, dim=1).t() * self.s if self.kind != "ce" else features.float() @ weight.t()
            proto_logits = f @ self.prototypes.t() / c.t
            soft = c.alpha * _sharded_softmax(logits)[0] + (1 - c.alpha) * _sharded_softmax(proto_logits)[0]
            score, index = soft.max(1) if self.num_local else (soft.new_zeros(len(f)), labels.new_zeros(len(f)))
            scores, indexes = dist.all_gather_variable(score[None]), dist.all_gather_variable(index[None] + self.first)
            best = torch.cat(scores).argmax(0)  # the rank whose shard holds the most confident class
            score = torch.cat(scores).gather(0, best[None])[0]
            index = torch.cat(indexes).gather(0, best[None])[0]
            new = torch.where(score > c.threshold, index, labels)
            self.corrected += (new != labels).sum()
            labels = new
        local = labels - self.first
        mine = (local >= 0) & (local < self.num_local)
        if mine.any():  # each class's prototype moves towards the mean of its batch features
            rows = local[mine]
            sums = torch.zeros_like(self.prototypes).index_add_(0, rows, f[mine])
            counts = torch.zeros(self.num_local, device=f.device).index_add_(0, rows, f.new_ones(len(rows)))
            seen = counts > 0
            mean = sums[seen] / counts[seen, None]
            self.prototypes[seen] = F.normalize(c.momentum * self.prototypes[seen] + (1 - c.momentum) * mean, dim=1)
        return labels


def _sharded_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the classes of all ranks of (B, n_r) logits split by class: (this rank's probabilities, the
    all-reduced max and the all-reduced sum of exp(logits - max))."""
    top = dist.all_reduce_max(logits.max(1).values if logits.shape[1] else logits.new_full((len(logits),), -torch.inf))
    p = (logits - top[:, None]).exp_()
    total = dist.all_reduce_sum(p.sum(1))
    return p.div_(total[:, None]), top, total


@dataclass
class LabelCorrection:
    """Prototype-guided label correction of noisy labels (Zhu et al. 2022, "Large-Scale Pre-training for Person
    Re-identification with Noisy Labels", PNL; their `pnl_builder.py`): from step `start_step` on, a sample's label
    becomes the class c* of

        s = alpha softmax(z) + (1 - alpha) softmax(<f, P> / t),   c* = argmax_c s_c,   if s_c* > threshold

    with z the classifier's logits over all classes and P the class prototypes, each the moving average (`momentum`)
    of the L2-normalised embeddings labelled with its class, renormalised. PNL's values: alpha 0.5, threshold 0.8,
    t 0.07, momentum 0.999, from epoch 11. PNL updates a prototype once per sample of the batch; here once per class
    with the mean of its samples. The corrected labels train the classifier of that step and move the prototypes.
    """

    start_step: int = 0
    alpha: float = 0.5
    threshold: float = 0.8
    t: float = 0.07
    momentum: float = 0.999


def _seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step + 1]).generate_state(1, np.uint64)[0] % 2**63)
