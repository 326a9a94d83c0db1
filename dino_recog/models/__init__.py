"""Backbones, heads, the DINO student/teacher pair and the recognition model."""

from .backbones import build_backbone, configure_speed
from .dino import MaskedMultiCropNet, MultiCropNet, update_teacher
from .heads import BNNeckHead, DINOHead, GeM
from .reid import ReIDModel, build_reid_model, reid_spec
from .spec import BackboneSpec

__all__ = [
    "BackboneSpec",
    "build_backbone",
    "configure_speed",
    "DINOHead",
    "MaskedMultiCropNet",
    "MultiCropNet",
    "update_teacher",
    "BNNeckHead",
    "GeM",
    "ReIDModel",
    "build_reid_model",
    "reid_spec",
]
