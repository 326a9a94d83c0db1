"""The stage-2 recognition model: backbone + BN-neck head, built from a plain, saveable description."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .backbones import build_backbone
from .heads import BNNeckHead

__all__ = ["ReIDModel", "build_reid_model"]


class ReIDModel(nn.Module):
    """Backbone + BNNeckHead. Eval mode maps images (B, 3, H, W) to embeddings (B, D); train mode returns the head's
    dict of features and logits."""

    def __init__(self, backbone: nn.Module, head: BNNeckHead, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec or {}  # how to rebuild this model (saved beside its weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None] | torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def build_reid_model(spec: dict[str, Any]) -> ReIDModel:
    """Build a ReIDModel from a description with plain values.

    Keys: arch, img_size (h, w), patch_size, drop_path_rate, depth, embed_dim, num_heads (0 = the arch's), last_stride,
    feature (cls | cls_mean | avg | gem), embedding_dim, neck, num_classes, classifier (bool).
    """
    backbone, dim = build_backbone(
        spec["arch"], img_size=tuple(spec["img_size"]), patch_size=spec.get("patch_size", 16),
        drop_path_rate=spec.get("drop_path_rate", 0.0), depth=spec.get("depth") or None,
        embed_dim=spec.get("embed_dim") or None, num_heads=spec.get("num_heads") or None,
        last_stride=spec.get("last_stride", 1),
    )  # fmt: skip
    head = BNNeckHead(dim, spec["num_classes"], pool=spec.get("feature", "cls"),
                      embedding_dim=spec.get("embedding_dim", 0), neck=spec.get("neck", "bnneck"),
                      classifier=spec.get("classifier", True))  # fmt: skip
    return ReIDModel(backbone, head, dict(spec))
