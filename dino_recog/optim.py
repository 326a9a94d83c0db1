"""Optimisers and their parameter groups."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["param_groups", "reid_param_groups", "vit_layer_id", "build_optimizer", "set_schedule"]


def param_groups(model: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Weights with weight decay, and biases / 1-D parameters (norms, LayerScale gammas) without.

    As in DINO's `get_params_groups`: `cls_token` and `pos_embed` (not 1-D) are decayed. Frozen parameters are left
    out. Each group carries `apply_wd` so the weight-decay schedule only touches the decayed ones.

    With the defaults there are exactly these two groups (DINO). Otherwise, as DINOv2's `get_params_groups_with_decay`,
    the groups also carry `lr_scale`: a parameter of the ViT `model.backbone` (or of `model` itself when it has no
    `backbone`) at depth l (`vit_layer_id`; the DINOv2 mask token at 0) gets layer_decay^(L + 1 - l), the heads
    (depth L + 1) 1, and the patch embedding another factor `patch_embed_lr_mult`.

    Args:
        layer_decay: layer-wise lr decay (DINOv2 0.9; BEiT, MAE).
        patch_embed_lr_mult: lr factor of the patch embedding (DINOv2 0.2).
    """
    if layer_decay != 1.0 or patch_embed_lr_mult != 1.0:
        return _scaled_param_groups(model, layer_decay, patch_embed_lr_mult)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def _scaled_param_groups(model: nn.Module, layer_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    prefix = "backbone." if hasattr(model, "backbone") else ""
    blocks = getattr(model.backbone if prefix else model, "blocks", None)
    num_layers = len(blocks) if blocks is not None else 0
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix):
            layer = vit_layer_id(name.removeprefix(prefix), num_layers)
        else:  # the heads, and DINOv2's mask token, which stands in for a patch embedding
            layer = 0 if name == "mask_token" else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - layer)
        if name.removeprefix(prefix).startswith("patch_embed."):
            scale *= patch_embed_lr_mult
        decay = not (name.endswith(".bias") or p.ndim <= 1)
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr_scale": scale, "apply_wd": decay, **({} if decay else {"weight_decay": 0.0})}
        for (scale, decay), ps in groups.items()
    ]


def vit_layer_id(name: str, num_layers: int) -> int:
    """Depth of a timm ViT parameter for layer-wise lr decay (BEiT, MAE): embeddings 0, block i -> i + 1, rest L + 1."""
    if name.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def reid_param_groups(model: nn.Module, bias_lr_factor: float = 1.0, head_lr_factor: float = 1.0,
                      layer_decay: float = 1.0) -> list[dict]:  # fmt: skip
    """Parameter groups of a ReIDModel (`backbone` + `head`) with per-group `lr_scale`.

    - biases get lr x `bias_lr_factor` (the TransReID family uses 2) and, like 1-D parameters, no weight decay;
    - the new head (neck, classifier, embedding) gets lr x `head_lr_factor`;
    - with `layer_decay` < 1 a ViT backbone's parameter at depth l gets lr x layer_decay^(L + 1 - l).
    """
    blocks = getattr(model.backbone, "blocks", None)
    num_layers = len(blocks) if blocks is not None else 0
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("backbone.") and layer_decay < 1.0 and num_layers:
            scale *= layer_decay ** (num_layers + 1 - vit_layer_id(name.removeprefix("backbone."), num_layers))
        if not name.startswith("backbone."):
            scale *= head_lr_factor
        no_decay = name.endswith(".bias") or p.ndim <= 1
        if name.endswith(".bias"):
            scale *= bias_lr_factor
        groups.setdefault((scale, not no_decay), []).append(p)
    return [
        {"params": ps, "lr_scale": scale, "apply_wd": decay, **({} if decay else {"weight_decay": 0.0})}
        for (scale, decay), ps in groups.items()
    ]


def build_optimizer(
    name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (default betas, as DINO), SGD with momentum, or Adam.

    Args:
        fused: use the fused CUDA kernel (one launch for all parameters); only when every parameter is on a CUDA
            device, otherwise PyTorch's default multi-tensor (foreach) implementation is used.
    """
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    fused = fused and all(p.is_cuda for g in groups for p in g["params"])
    kw = {"fused": True} if fused else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kw)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, **kw)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kw)
    raise ValueError(f"optimizer {name!r}: expected adamw, adam or sgd")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this iteration's lr (times each group's `lr_scale`) and weight decay (groups with `apply_wd`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g.get("apply_wd", False):
            g["weight_decay"] = weight_decay
