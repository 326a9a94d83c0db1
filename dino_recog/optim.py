"""Optimisers and their parameter groups."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "set_schedule"]


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights with weight decay, and biases / 1-D parameters (norms, scales) without.

    As in DINO's `get_params_groups`: `cls_token` and `pos_embed` (not 1-D) are decayed. Frozen parameters are left
    out. Each group carries `apply_wd` so the weight-decay schedule only touches the first.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def build_optimizer(
    name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW (default betas, as DINO), SGD with momentum, or Adam."""
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer {name!r}: expected adamw, adam or sgd")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this iteration's lr (times each group's `lr_scale`) and weight decay (groups with `apply_wd`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g.get("apply_wd", False):
            g["weight_decay"] = weight_decay
