"""dino_recog: DINO pretraining and re-identification fine-tuning in one toolkit."""

__version__ = "0.1.0"

from .evaluation import evaluate_rank, extract_features, knn_classify  # noqa: E402
from .extract import FeatureExtractor  # noqa: E402
from .losses import (  # noqa: E402
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    CrossEntropyLabelSmooth,
    DINOLoss,
    DistillationLoss,
    TripletLoss,
)
from .models import BackboneSpec, build_backbone, build_reid_model  # noqa: E402
from .weights import load_backbone_weights, load_reid_model, save_backbone  # noqa: E402
from .wrapper import DINOConf, DINOWrapper  # noqa: E402

__all__ = [
    "__version__",
    "BackboneSpec",
    "build_backbone",
    "build_reid_model",
    "load_backbone_weights",
    "load_reid_model",
    "save_backbone",
    "evaluate_rank",
    "extract_features",
    "FeatureExtractor",
    "DINOConf",
    "DINOWrapper",
    "knn_classify",
    "DINOLoss",
    "ArcFaceLoss",
    "CenterLoss",
    "CosFaceLoss",
    "CrossEntropyLabelSmooth",
    "DistillationLoss",
    "TripletLoss",
]
