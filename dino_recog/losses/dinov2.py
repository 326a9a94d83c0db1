"""What DINOv2 (Oquab et al. 2023) adds to the DINO loss: iBOT masked-patch loss, KoLeo, Sinkhorn-Knopp centring."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dist
from .center import CENTERINGS, CenteredLoss

__all__ = ["CENTERINGS", "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets that spread the samples of the global batch evenly over the prototypes.

    The Sinkhorn-Knopp normalisation of SwAV (Caron et al. 2020, section 3.1 and its appendix A.1), which DINOv2
    (Oquab et al. 2023, section 4) uses instead of centring the teacher. With Q = exp(t / tau)^T of shape (K, B), B the
    samples of all processes together:

        Q <- Q / sum(Q)
        `iterations` times:
            Q <- Q / (K * row sums)      every prototype gets the total weight 1/K   (rows span processes: all-reduced)
            Q <- Q / (B * column sums)   every sample gets the total weight 1/B      (a column lives on one process)
        return (B * Q)^T                 one distribution over the prototypes per sample

    The global maximum of t is subtracted before the exponential: a constant factor of Q that the first normalisation
    removes, so large logits cannot overflow. A row or column that underflows to zero stays zero instead of
    becoming NaN.

    Args:
        teacher_logits: (n, K) teacher outputs on this process; n may differ between processes (and be 0).
        temperature: tau, the teacher temperature.
        iterations: alternations of row and column normalisation (3 in SwAV and DINOv2).

    Returns:
        (n, K) float32 targets: each row sums to 1; summed over the rows of all processes, each column approaches
        B / K as the iterations grow.
    """
    logits = teacher_logits.float()
    n_local, k = logits.shape
    n_total = dist.all_reduce_sum(logits.new_tensor([float(n_local)]))  # B: samples of all processes
    local_max = logits.max().reshape(1) if n_local else logits.new_full((1,), float("-inf"))
    q = torch.exp((logits - dist.all_reduce_max(local_max)) / temperature).t()  # (K, n)
    q = q / dist.all_reduce_sum(q.sum().reshape(1))
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = q / (dist.all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny) * k)  # rows: 1/K each
        q = q / (q.sum(dim=0, keepdim=True).clamp_min(tiny) * n_total)  # columns: 1/B each
    return (q * n_total).t()  # (n, K)


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser: pushes every feature of a batch away from its nearest neighbour.

    From "Spreading vectors for similarity search" (Sablayrolles et al. 2019, eq. 5), which DINOv2 (Oquab et al.
    2023, section 4) applies with weight 0.1 to the student's backbone CLS features, each global crop separately:

        L = -1/n * sum_i log(d_i + eps),   d_i = min_{j != i} || x_i / |x_i| - x_j / |x_j| ||_2

    Computed in float32 with autocast off, over this process's batch only (no all-gather, as the official code).

    Shapes:
        features: (n, D) with n >= 2.
        returns: scalar.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs (n >= 2, D) features to find neighbours, got {tuple(features.shape)}")
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=self.eps)  # (n, D)
            with torch.no_grad():  # the neighbour's index is a choice, not a function to differentiate
                sim = x @ x.t()  # (n, n); the largest cosine is the smallest distance on the sphere
                sim.fill_diagonal_(float("-inf"))
                nearest = sim.argmax(dim=1)  # (n,)
            distances = (x - x[nearest]).norm(dim=-1)  # (n,), differentiable in both ends
            return -torch.log(distances + self.eps).mean()


class IBOTPatchLoss(CenteredLoss):
    """Cross-entropy between teacher and student patch distributions at the patches masked in the student's input.

    The masked-image-modelling loss of iBOT (Zhou et al. 2022, eq. 2) with DINOv2's weighting (Oquab et al. 2023,
    section 4; official `iBOTPatchLoss.forward_masked`):

        P_s(p) = softmax(g_s(masked x)_p / tau_s),   P_t(p) = softmax((g_t(x)_p - c) / tau_t)   (or Sinkhorn-Knopp)
        L = -1/n_images * sum_i 1/m_i * sum_{p masked in image i} sum_k P_t(p)_k log P_s(p)_k
        c <- m * c + (1 - m) * mean of the teacher outputs at the masked patches of all processes   (after the loss)

    The teacher sees the unmasked image; m_i is the number of masked patches of image i, so every masked image weighs
    the same whatever its mask size, and n_images counts all images, the unmasked ones too. The centre is this loss's
    own buffer (:class:`CenteredLoss`, saved in checkpoints); with Sinkhorn-Knopp it is not used.

    Shapes:
        student_patch_out: (M, K) head outputs at the masked patches, image by image (the order of `masks[masks]`).
        teacher_patch_out: (M, K) the teacher's outputs at the same patches.
        masks: (n_images, N) bool, True where the student's patch was replaced by the mask token; M = masks.sum().
        returns: scalar loss.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "center"
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.student_temp = student_temp

    def forward(
        self,
        student_patch_out: torch.Tensor,
        teacher_patch_out: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
    ) -> torch.Tensor:
        per_image = masks.sum(dim=1)  # (n_images,)
        n_masked = student_patch_out.shape[0]
        if teacher_patch_out.shape[0] != n_masked or masks.ndim != 2:
            raise ValueError(
                f"student {tuple(student_patch_out.shape)} and teacher {tuple(teacher_patch_out.shape)} patch outputs "
                f"must have one row per masked patch of the (n_images, N) masks {tuple(masks.shape)}"
            )
        t = teacher_patch_out.detach().float()
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(t, teacher_temp)
        else:
            q = F.softmax((t - self.center) / teacher_temp, dim=-1)  # (M, K)
        log_p = F.log_softmax(student_patch_out.float() / self.student_temp, dim=-1)  # (M, K)
        ce = -(q * log_p).sum(dim=-1)  # (M,)
        weights = (1.0 / per_image.clamp_min(1).float()).unsqueeze(1).expand_as(masks)[masks]  # (M,): 1 / m_i
        loss = (ce * weights).sum() / masks.shape[0]
        self.observe(t)
        return loss
