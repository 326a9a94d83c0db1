"""The stage-2 recognition model: backbone + BN-neck head, built from a plain, saveable description.

The description (`ReIDModel.spec`, saved as `spec` in model.pth and the stage-2 checkpoints) is one flat dict: the
fields of the backbone's `BackboneSpec` (arch, img_size, patch_size, depth, embed_dim, num_heads,
num_register_tokens, layerscale, last_stride, feature, mean, std) plus the head's (drop_path_rate, embedding_dim,
neck, num_classes, classifier, test_feature). Older files lack some fields; they read as the defaults those files
were built with (no registers, no LayerScale, last stride 1, the BN-neck output at test time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .heads import TEST_FEATURES, BNNeckHead
from .spec import BackboneSpec

__all__ = ["HEAD_FIELDS", "ReIDModel", "backbone_spec_of_reid", "build_reid_model", "reid_spec", "set_test_feature"]

HEAD_FIELDS = ("drop_path_rate", "embedding_dim", "neck", "num_classes", "classifier", "test_feature")
# What a spec written before BackboneSpec existed means by a missing field (build_reid_model's old defaults).
_LEGACY_DEFAULTS = {"patch_size": 16, "last_stride": 1, "num_register_tokens": 0, "layerscale": 0.0}


class ReIDModel(nn.Module):
    """Backbone + BNNeckHead. Eval mode maps images (B, 3, H, W) to embeddings (B, D); train mode returns the head's
    dict of features and logits."""

    def __init__(self, backbone: nn.Module, head: BNNeckHead, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec or {}  # how to rebuild this model (saved beside its weights)

    def set_test_feature(self, test_feature: str) -> None:
        """Make eval mode return `test_feature` ("after_neck" | "before_neck") and record it in `spec`.

        Raises:
            ValueError: an unknown name.
        """
        if test_feature not in TEST_FEATURES:
            raise ValueError(f"test_feature {test_feature!r}: expected one of {', '.join(TEST_FEATURES)}")
        self.head.test_feature = test_feature
        self.spec = {**self.spec, "test_feature": test_feature}

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone's description (its `feature` is the head's pooling)."""
        return backbone_spec_of_reid(self.spec)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None] | torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def set_test_feature(model: nn.Module, test_feature: str, source: str = "the model") -> None:
    """Choose a stage-2 model's test-time embedding (`ReIDModel.set_test_feature`), for a tool's override.

    Raises:
        ValueError: `model` is no ReIDModel (backbone weights have no neck to be before or after), or an unknown name.
    """
    if not isinstance(model, ReIDModel):
        raise ValueError(f"test_feature {test_feature}: {source} holds backbone weights, without a BN neck; it applies "
                         "to a stage-2 model (model.pth, best.pth)")  # fmt: skip
    model.set_test_feature(test_feature)


def backbone_spec_of_reid(spec: Mapping[str, Any], source: str = "spec") -> BackboneSpec:
    """The BackboneSpec inside a recognition model's flat spec, old ones (without registers / LayerScale) included.

    Raises:
        ValueError: the spec has no arch or img_size, or an invalid value (named, with `source`).
    """
    names = [f.name for f in dataclasses.fields(BackboneSpec)]
    missing = [k for k in ("arch", "img_size") if k not in spec]
    if missing:
        raise ValueError(f"{source}: not a recognition model's spec (missing {', '.join(missing)})")
    values = {**_LEGACY_DEFAULTS, **{k: v for k, v in spec.items() if k in names and v is not None}}
    try:
        return BackboneSpec(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def reid_spec(
    backbone: BackboneSpec,
    num_classes: int,
    *,
    embedding_dim: int = 0,
    neck: str = "bnneck",
    classifier: bool = True,
    drop_path_rate: float = 0.0,
    test_feature: str = "after_neck",
) -> dict[str, Any]:
    """The flat, plain-valued spec of a recognition model (see the module docstring)."""
    return {**backbone.to_dict(), "drop_path_rate": float(drop_path_rate), "embedding_dim": int(embedding_dim),
            "neck": neck, "num_classes": int(num_classes), "classifier": bool(classifier),
            "test_feature": test_feature}  # fmt: skip


def build_reid_model(spec: Mapping[str, Any] | BackboneSpec, num_classes: int | None = None, **head: Any) -> ReIDModel:
    """Build a ReIDModel (random weights) from its flat spec, or from a BackboneSpec and the head's options.

    Args:
        spec: a flat spec (`ReIDModel.spec`, as saved: the BackboneSpec fields plus drop_path_rate, embedding_dim,
            neck, num_classes, classifier; missing backbone fields take the old defaults) or a BackboneSpec, whose
            `feature` is the head's pooling.
        num_classes: with a BackboneSpec, the identities of the classifier.
        head: with a BackboneSpec, the keyword arguments of `reid_spec` (embedding_dim, neck, classifier,
            drop_path_rate, test_feature).

    The model's `spec` is the complete flat spec (every BackboneSpec field stated), so it rebuilds the same model.
    """
    if isinstance(spec, BackboneSpec):
        if num_classes is None:
            raise TypeError("build_reid_model(BackboneSpec, num_classes, ...): num_classes is missing")
        spec = reid_spec(spec, num_classes, **head)
    elif num_classes is not None or head:
        raise TypeError("build_reid_model(spec_dict): num_classes and head options belong inside the dict")
    backbone_spec = backbone_spec_of_reid(spec)
    backbone, dim = backbone_spec.build(drop_path_rate=spec.get("drop_path_rate", 0.0))
    head_module = BNNeckHead(dim, spec["num_classes"], pool=backbone_spec.feature,
                             embedding_dim=spec.get("embedding_dim", 0), neck=spec.get("neck", "bnneck"),
                             classifier=spec.get("classifier", True),
                             prefix_tokens=1 + backbone_spec.num_register_tokens,
                             test_feature=spec.get("test_feature", "after_neck"))  # fmt: skip
    if backbone_spec.is_timm:
        # The re-ID head pools `forward_features` itself (cls / cls_mean / avg / GeM, then the neck): timm's own
        # pooling head (ConvNeXt's LayerNorm after the pool, a ViT's fc_norm or attention pool) is off the path;
        # frozen, so that DDP waits for no gradient of it.
        for name in ("head", "fc_norm", "attn_pool"):
            module = getattr(backbone, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
    # older files lack test_feature: they were tested on the BN-neck output, which the spec now says
    return ReIDModel(backbone, head_module, {"test_feature": "after_neck", **spec, **backbone_spec.to_dict()})
