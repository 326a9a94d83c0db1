"""Backbones, heads and the DINO student/teacher pair."""

from .backbones import build_backbone
from .dino import MultiCropNet, update_teacher
from .heads import DINOHead

__all__ = ["build_backbone", "DINOHead", "MultiCropNet", "update_teacher"]
