"""The teacher-output centre that the DINO and iBOT losses share: its EMA step, immediate or deferred."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as dist

__all__ = ["CENTERINGS", "CenteredLoss"]

CENTERINGS = ("center", "sinkhorn_knopp")


class CenteredLoss(nn.Module):
    """Base of a loss whose teacher targets are centred: the `center` buffer (saved in checkpoints) and its EMA.

    c <- m c + (1 - m) mean(teacher outputs of all processes), taken after each forward pass, or with `defer_center`
    (gradient accumulation) once per optimiser step by `apply_center()`, with the mean over every micro-batch since
    the last one: the loss of each micro-batch then uses the centre the whole batch would have. A step with no
    teacher outputs at all (an iBOT batch without masked patches) leaves the centre as it is. With
    `centering="sinkhorn_knopp"` the centre is neither used nor updated.

    Args:
        out_dim: K, the width of the teacher outputs.
        center_momentum: m.
        centering: "center" or "sinkhorn_knopp".
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "center") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering {centering!r}: expected one of {', '.join(CENTERINGS)}")
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.defer_center = False
        # with defer_center: this process's sum of the teacher outputs since the last EMA step, and their count
        self.register_buffer("pending", torch.zeros(out_dim + 1), persistent=False)

    def observe(self, teacher_out: torch.Tensor) -> None:
        """After a forward pass: the EMA step now, or with `defer_center` the outputs added to the pending sum."""
        if self.centering != "center":
            return
        if self.defer_center:
            self.pending += _center_stats(teacher_out)
        else:
            self.update_center(teacher_out)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the mean of the (n, K) teacher outputs over all processes; unchanged when there are none."""
        self._ema(_center_stats(teacher_out))

    @torch.no_grad()
    def apply_center(self) -> None:
        """With `defer_center`: the EMA step with the mean of the teacher outputs since the last one (all processes);
        called once per optimiser step."""
        if self.centering == "center" and self.defer_center:
            stats = self.pending.clone()
            self.pending.zero_()
            self._ema(stats)

    def _ema(self, stats: torch.Tensor) -> None:
        stats = dist.all_reduce_sum(stats)
        count = stats[-1]
        batch_center = (stats[:-1] / count.clamp_min(1)).unsqueeze(0)  # (1, K)
        # one fused kernel, no host sync: c + w (b - c) with w = 1 - m, or w = 0 (c exactly) when nothing was seen
        self.center.lerp_(batch_center, (count > 0).to(self.center.dtype) * (1 - self.center_momentum))


@torch.no_grad()
def _center_stats(teacher_out: torch.Tensor) -> torch.Tensor:
    """(K + 1,): the sum of the teacher outputs over the batch and their number."""
    return torch.cat([teacher_out.float().sum(0), teacher_out.new_tensor([teacher_out.shape[0]]).float()])
