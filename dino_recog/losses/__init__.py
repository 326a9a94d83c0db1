"""Losses: DINO self-distillation (stage 1) and metric-learning losses (stage 2)."""

from .dino import DINOLoss, collapse_stats
from .metric import ArcFaceLoss, CenterLoss, CosFaceLoss, CrossEntropyLabelSmooth, DistillationLoss, TripletLoss

__all__ = [
    "DINOLoss",
    "collapse_stats",
    "ArcFaceLoss",
    "CenterLoss",
    "CosFaceLoss",
    "CrossEntropyLabelSmooth",
    "DistillationLoss",
    "TripletLoss",
]
