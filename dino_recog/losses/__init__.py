"""Losses: DINO self-distillation (stage 1) and metric-learning losses (stage 2)."""

from .dino import DINOLoss, collapse_stats

__all__ = ["DINOLoss", "collapse_stats"]
