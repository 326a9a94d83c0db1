"""dino_recog: DINO pretraining and re-identification fine-tuning in one toolkit.

The names below are imported on first use (PEP 562), so that `import dino_recog.config` does not load torch, and
`python -m dino_recog.extract` does not find its own module already imported by the package.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "evaluate_rank": "evaluation", "extract_features": "evaluation", "knn_classify": "evaluation",
    "FeatureExtractor": "extract",
    "ArcFaceLoss": "losses", "CenterLoss": "losses", "CosFaceLoss": "losses", "CrossEntropyLabelSmooth": "losses",
    "DINOLoss": "losses", "DistillationLoss": "losses", "TripletLoss": "losses",
    "BackboneSpec": "models", "build_backbone": "models", "build_reid_model": "models",
    "load_backbone_weights": "weights", "load_reid_model": "weights", "save_backbone": "weights",
    "DINOConf": "wrapper", "DINOWrapper": "wrapper",
}  # fmt: skip

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
