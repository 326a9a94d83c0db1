"""Losses: DINO self-distillation with the DINOv2 terms (stage 1), metric-learning losses (stage 2) and cluster
contrast (the unsupervised stage 2)."""

from .cluster_contrast import ClusterMemory, cluster_centroids
from .dino import DINOLoss, collapse_stats
from .dinov2 import IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from .metric import (
    ArcFaceLoss,
    CenterLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CrossEntropyLabelSmooth,
    DistillationLoss,
    TripletLoss,
)
from .partial_fc import PartialFC

__all__ = [
    "ClusterMemory",
    "cluster_centroids",
    "DINOLoss",
    "collapse_stats",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "sinkhorn_knopp",
    "ArcFaceLoss",
    "CenterLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "CrossEntropyLabelSmooth",
    "DistillationLoss",
    "PartialFC",
    "TripletLoss",
]
