"""The DINO student/teacher pair: backbone + head, multi-crop forward, EMA update of the teacher."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MultiCropNet", "update_teacher"]


class MultiCropNet(nn.Module):
    """Backbone followed by a head, run on a list of crops of different sizes.

    Crops of the same size are batched into one backbone call (global crops together, local crops together), the
    features concatenated and passed through the head in one call, as the official `MultiCropWrapper` does.
    The output is crop-major: crop 0's batch, then crop 1's, ...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))  # (n_same * B, D)
            start = end
        return self.head(torch.cat(feats))  # (n_crops * B, out_dim)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Buffers (BatchNorm statistics) are not averaged; the teacher keeps its own, as in the official code.
    """
    s_params = [p.detach() for p in student.parameters()]
    t_params = list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters, teacher {len(t_params)}; not the same architecture")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
