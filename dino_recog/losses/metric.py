"""Re-identification / metric-learning losses for stage 2.

Every loss is an `nn.Module` with `forward(features, labels) -> scalar` (distillation also takes the teacher's
logits); those with class weights keep them as `.weight` of shape (num_classes, in_features). None of them changes
its inputs in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CrossEntropyLabelSmooth",
    "TripletLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "CenterLoss",
    "DistillationLoss",
    "margin_target",
    "pairwise_distances",
]


class CrossEntropyLabelSmooth(nn.Module):
    """Softmax cross-entropy with label smoothing (Szegedy et al. 2016; used for re-id by Luo et al. 2019, "Bag of
    Tricks and a Strong Baseline for Deep Person Re-identification").

        q_i = (1 - eps) * [i == y] + eps / N,    L = -sum_i q_i log softmax(z)_i

    Shapes: logits (B, N), labels (B,) -> scalar. With eps = 0 it is the plain cross-entropy.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.epsilon)


def pairwise_distances(x: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean (not squared) or cosine (1 - cos) distances, differentiable."""
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        return 1.0 - x @ x.t()
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()  # clamp: sqrt has an infinite gradient at 0


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss for Person Re-Identification").

    For each anchor a in the batch, the hardest positive (farthest same-label sample) and hardest negative (closest
    other-label sample):

        L = mean_a [ d(a, p*) - d(a, n*) + margin ]_+            (margin > 0)
        L = mean_a log(1 + exp(d(a, p*) - d(a, n*)))            (margin = 0: soft margin)

    Shapes: features (B, D), labels (B,) -> scalar. Anchors without a positive or a negative are left out.
    """

    def __init__(self, margin: float = 0.3, metric: str = "euclidean") -> None:
        super().__init__()
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric {metric!r}: expected 'euclidean' or 'cosine'")
        self.margin = margin
        self.metric = metric

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pairwise_distances(features.float(), self.metric)  # (B, B)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos_mask, neg_mask = same & ~eye, ~same
        valid = pos_mask.any(1) & neg_mask.any(1)
        if not valid.any():
            return features.sum() * 0.0  # no triplet in this batch; keeps the graph connected
        hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).max(1).values[valid]
        hardest_neg = dist.masked_fill(~neg_mask, float("inf")).min(1).values[valid]
        if self.margin > 0:
            return F.relu(hardest_pos - hardest_neg + self.margin).mean()
        return F.softplus(hardest_pos - hardest_neg).mean()


class _MarginSoftmax(nn.Module):
    """Shared part of CosFace / ArcFace: cosines between L2-normalised features and class weights."""

    def __init__(self, in_features: int, num_classes: int, s: float, m: float) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight.float(), dim=1))  # (B, N)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scaled logits with the margin on the target class (a new tensor)."""
        cos = self.cosine(features)
        target = F.one_hot(labels, cos.shape[1]).bool()
        return self.s * torch.where(target, self.margin_logits(cos, labels), cos)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features, labels), labels)


class CosFaceLoss(_MarginSoftmax):
    """CosFace / additive margin softmax (Wang et al. 2018, "CosFace: Large Margin Cosine Loss"; "Additive Margin
    Softmax for Face Verification").

        L = -log( e^{s (cos t_y - m)} / (e^{s (cos t_y - m)} + sum_{j != y} e^{s cos t_j}) ),
        cos t_j = <f / |f|, W_j / |W_j|>

    Shapes: features (B, D), labels (B,) -> scalar; weight (N, D). Defaults s = 30, m = 0.35.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.35) -> None:
        super().__init__(in_features, num_classes, s, m)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class ArcFaceLoss(_MarginSoftmax):
    """ArcFace / additive angular margin (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss").

        target logit s * cos(t_y + m);  where t_y + m > pi (cos t_y < cos(pi - m)) the standard fallback
        s * (cos t_y - m sin m) keeps the logit decreasing in t_y (insightface's `easy_margin=False`).

    Shapes: features (B, D), labels (B,) -> scalar; weight (N, D). Defaults s = 30, m = 0.5.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__(in_features, num_classes, s, m)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_target(cos, 1.0, self.m, 0.0)


class CombinedMarginLoss(_MarginSoftmax):
    """The combined margin of insightface's arcface_torch: SphereFace (m1), ArcFace (m2) and CosFace (m3) in one
    formula (Deng et al. 2019, "ArcFace", section 3.3):

        target logit s * (cos(m1 t_y + m2) - m3)

    (1, 0, m) is CosFace, (1, m, 0) ArcFace, exactly; where m1 t_y + m2 > pi see `margin_target`.
    Shapes: features (B, D), labels (B,) -> scalar; weight (N, D). Defaults (arcface_torch's) s = 64, (1, 0.5, 0).
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0) -> None:  # fmt: skip
        super().__init__(in_features, num_classes, s, m2)
        self.m1, self.m2, self.m3 = m1, m2, m3

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_target(cos, self.m1, self.m2, self.m3)


def margin_target(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The target cosine with the combined margin, cos(m1 t + m2) - m3 with t = arccos(cos), elementwise.

    Where m1 t + m2 would pass pi (t > t* = (pi - m2) / m1) the cosine would rise again; there the value is the
    ArcFace fallback (insightface's `easy_margin=False`) moved to start at t*:

        cos t - cos t* - m3 - (cos m2 + m2 sin m2)

    which is decreasing in t, and for m1 = 1 is ArcFace's `cos t - m2 sin m2 - m3` exactly. m1 = 1 uses
    cos(t + m2) = cos t cos m2 - sin t sin m2 (no arccos, whose gradient is infinite at +-1).
    Shapes: any; the margin constants are floats.
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3  # CosFace: no clamp, no fallback (t* = pi)
    cos = cos.clamp(-1.0, 1.0)
    if m1 == 1.0:
        sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
        inside = cos * math.cos(m2) - sin * math.sin(m2)
    else:
        # in float64, where the clamp that keeps arccos's gradient finite moves t by only ~1e-6
        t = torch.acos(cos.double().clamp(-1.0 + 1e-12, 1.0 - 1e-12))
        inside = torch.cos(m1 * t + m2).to(cos.dtype)
    t_star = (math.pi - m2) / m1
    if t_star >= math.pi:  # m1 t + m2 never passes pi
        return inside - m3
    fallback = cos - math.cos(t_star) - (math.cos(m2) + m2 * math.sin(m2))
    return torch.where(cos > math.cos(t_star), inside, fallback) - m3


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face Recognition").

        L = 1/2 * mean_i |f_i - c_{y_i}|^2

    The centres `.weight` (N, D) are learned with their own optimiser (BoT: SGD, lr 0.5). Shapes: (B, D), (B,).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * (features.float() - self.weight[labels]).pow(2).sum(1).mean()


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

        L = CE(y, p) + alpha * T^2 * KL(q_T || p_T),   p_T = softmax(z_s / T), q_T = softmax(z_t / T)

    with z_t the logits of a frozen teacher recognition model (detached here: no gradient reaches it). T^2 keeps the
    soft term's gradient scale independent of T. Shapes: student logits (B, N), labels (B,), teacher logits (B, N).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 4.0, epsilon: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.temperature, self.epsilon = alpha, temperature, epsilon

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.epsilon)
        log_p = F.log_softmax(logits.float() / t, dim=1)
        log_q = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        return ce + self.alpha * t * t * kl
