"""The DINO self-distillation loss (Caron et al. 2021) and its collapse monitors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .center import CenteredLoss
from .dinov2 import sinkhorn_knopp

__all__ = ["DINOLoss", "collapse_stats"]


class DINOLoss(CenteredLoss):
    """Cross-entropy between the centred, sharpened teacher and the student over pairs of different views.

    From "Emerging Properties in Self-Supervised Vision Transformers" (Caron et al. 2021), eq. 3 and 4:

        P_t(x) = softmax((g_t(x) - c) / tau_t),   P_s(x') = softmax(g_s(x') / tau_s)
        L = 1 / n_pairs * sum_{x in globals} sum_{x' in all crops, x' != x} mean_batch H(P_t(x), P_s(x'))
        c <- m * c + (1 - m) * mean over the global-crop teacher outputs of all processes   (after the loss)

    with H(a, b) = -sum_k a_k log b_k and n_pairs = n_global * n_crops - n_global (18 for 2 global + 8 local).

    Shapes:
        student_out: (n_crops * B, K), crop-major (crop 0's batch, then crop 1's, ...; the global crops first).
        teacher_out: (n_global * B, K), the global crops in the same order.
        returns: scalar loss.

    The centre and its EMA, immediate or deferred to the optimiser step (`defer_center`, `apply_center()`), are
    :class:`CenteredLoss`'s. The teacher temperature is passed in by the caller, which owns its schedule. Runs in a
    single process without a process group.

    With `centering="sinkhorn_knopp"` (DINOv2's alternative) P_t is `sinkhorn_knopp(g_t(x), tau_t)` over the global
    crops of all processes instead, and the centre is neither used nor updated.
    """

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ) -> None:
        super().__init__(out_dim, center_momentum, centering)
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        n_global = self.n_global_crops
        if teacher_out.shape[0] % n_global:
            raise ValueError(f"teacher_out has {teacher_out.shape[0]} rows, not a multiple of {n_global} global crops")
        batch = teacher_out.shape[0] // n_global
        if student_out.shape[0] % batch:
            raise ValueError(f"student_out has {student_out.shape[0]} rows, not a multiple of the batch {batch}")
        n_crops = student_out.shape[0] // batch
        if n_crops < n_global or n_crops * n_global - n_global == 0:
            raise ValueError(f"{n_crops} student crops and {n_global} teacher crops leave no pair of different views")

        log_p = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(n_crops, batch, -1)
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(teacher_out.detach(), teacher_temp).view(n_global, batch, -1)
        else:
            q = F.softmax((teacher_out.float().detach() - self.center) / teacher_temp, dim=-1).view(n_global, batch, -1)
        # sum_{v != i} H(q_i, p_v) = -q_i . (sum_v log p_v - log p_i): one pass over the crops instead of a double loop.
        total = -(q * (log_p.sum(0, keepdim=True) - log_p[:n_global])).sum(-1)  # (n_global, B)
        loss = total.mean(1).sum() / (n_crops * n_global - n_global)
        self.observe(teacher_out)
        return loss


@torch.no_grad()
def collapse_stats(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    centering: str = "center",
) -> dict[str, float]:
    """Monitors of the two collapse modes (paper section 5.3): H(P_t, P_s) = h(P_t) + KL(P_t || P_s).

    P_t is the target the loss uses: softmax((g_t - c) / tau_t), or with `centering="sinkhorn_knopp"` the
    Sinkhorn-Knopp targets (the centre is then unused; with more than one process this takes the loss's collectives,
    so every rank must call it).

    Returns:
        teacher_entropy: mean entropy h(P_t) of the teacher's per-image distributions;
        kl: mean KL(P_t || P_s) between teacher and student on the same global crops (-> 0 with h -> log K is the
            uniform collapse: both output the same flat distribution);
        teacher_batch_entropy: entropy of the batch-averaged teacher distribution (-> 0 is the one-dimension
            collapse: every image goes to the same prototype);
        entropy_ratio: teacher_entropy / log K; center_norm: the norm of the centre.
    """
    k = teacher_out.shape[-1]
    if centering == "sinkhorn_knopp":
        q = sinkhorn_knopp(teacher_out, teacher_temp)  # (n_global * B, K)
    else:
        q = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)  # (n_global * B, K)
    log_q = torch.log(q.clamp_min(1e-30))
    log_p = F.log_softmax(student_out[: teacher_out.shape[0]].float() / student_temp, dim=-1)
    entropy = -(q * log_q).sum(-1).mean().item()
    kl = (q * (log_q - log_p)).sum(-1).mean().item()
    q_mean = q.mean(0)
    batch_entropy = -(q_mean * torch.log(q_mean.clamp_min(1e-30))).sum().item()
    return {
        "teacher_entropy": entropy,
        "kl": kl,
        "teacher_batch_entropy": batch_entropy,
        "entropy_ratio": entropy / math.log(k),
        "center_norm": center.norm().item(),
    }
