"""`BackboneSpec`: the one description of a backbone, saved in every checkpoint and export and read back by every
tool (stage 2, the evaluation scripts, feature extraction, the attention maps).

A spec holds what is needed to rebuild the network and to feed it: the architecture (arch, patch size, depth, width,
heads, register tokens, LayerScale, ResNet last stride), the input size it was trained at, how its global feature is
pooled and the normalisation of its inputs. Training options (stochastic depth) are not part of it: `build` takes
them. `to_dict` gives plain values only (str, int, float, lists), so a checkpoint holding it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..config import IMAGENET_MEAN, IMAGENET_STD
from .backbones import ARCH_HELP, RESNETS, VIT_SPECS, build_backbone
from .timm_backbones import TIMM_PREFIX, timm_info

__all__ = ["ARCH_FIELDS", "BackboneSpec"]

# The fields that decide the weights' shapes and meaning: what a stage-1 export imposes on stage 2.
ARCH_FIELDS = ("arch", "patch_size", "depth", "embed_dim", "num_heads", "num_register_tokens", "layerscale")
VIT_FEATURES = ("cls", "cls_mean")  # CLS token | CLS + mean patch token
RESNET_FEATURES = ("avg", "gem")  # average | generalised-mean pooling


def _get(section: Any, name: str, default: Any) -> Any:
    """A field of a config section: a dataclass or the plain dict a checkpoint stores it as."""
    if isinstance(section, Mapping):
        value = section.get(name, default)
    else:
        value = getattr(section, name, default)
    return default if value is None else value


def _section(cfg: Any, name: str) -> Any:
    section = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
    return section if section is not None else {}


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone and preprocess its inputs.

    Zero for depth, embed_dim or num_heads means the architecture's own value; it is resolved on construction, so a
    spec always states the real numbers (a ResNet has none of the ViT fields: they are 0). `feature` "" is the
    architecture's default global feature: "cls" for a ViT, "avg" for a ResNet.

    Attributes:
        arch: vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101 | resnet50_ibn_a | timm:<name>. A timm
            model's ViT fields are read from the model (patch size, depth, width, heads, register tokens); its
            LayerScale is the model's own (0 here).
        img_size: (height, width) the network was trained at (ViT position embeddings are made for it).
        patch_size, depth, embed_dim, num_heads: the ViT's size.
        num_register_tokens: ViT register tokens after the CLS token (Darcet et al. 2024).
        layerscale: ViT LayerScale initial gamma (DINOv2 1e-5); 0 = none. The trained gammas are in the weights.
        last_stride: ResNet stride of the last stage (1 for re-identification, 2 as in ImageNet models).
        feature: global feature pooled from `forward_features`: ViT cls | cls_mean, ResNet avg | gem.
        mean, std: RGB normalisation of the inputs.
    """

    arch: str
    img_size: tuple[int, int] = (256, 128)
    patch_size: int = 16
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    num_register_tokens: int = 0
    layerscale: float = 0.0
    last_stride: int = 2
    feature: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("img_size", self._numbers("img_size", self.img_size, 2, int))
        if self.is_timm:
            self._resolve_timm(put)
        elif self.arch not in VIT_SPECS and self.arch not in RESNETS:
            raise ValueError(f"BackboneSpec.arch: {self.arch!r} is not one of {ARCH_HELP}")
        put("mean", self._numbers("mean", self.mean, 3, float))
        put("std", self._numbers("std", self.std, 3, float))
        if min(self.img_size) <= 0 or min(self.std) <= 0:
            raise ValueError(f"BackboneSpec: img_size {list(self.img_size)} and std {list(self.std)} must be positive")
        for name in ("patch_size", "depth", "embed_dim", "num_heads", "num_register_tokens", "last_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BackboneSpec.{name}: {value!r}; expected an integer >= 0")
        if isinstance(self.layerscale, bool) or not isinstance(self.layerscale, int | float) or self.layerscale < 0:
            raise ValueError(f"BackboneSpec.layerscale: {self.layerscale!r}; expected a number >= 0")
        put("layerscale", float(self.layerscale))
        if self.last_stride not in (1, 2):
            raise ValueError(f"BackboneSpec.last_stride: {self.last_stride}; expected 1 or 2")
        if self.is_timm and self.is_vit:
            allowed = VIT_FEATURES
        elif self.arch in VIT_SPECS:
            dim, depth, heads = VIT_SPECS[self.arch]
            put("depth", self.depth or depth)
            put("embed_dim", self.embed_dim or dim)
            put("num_heads", self.num_heads or heads)
            if not self.patch_size:
                raise ValueError("BackboneSpec.patch_size: 0; a ViT needs a patch size")
            if self.embed_dim % self.num_heads:
                raise ValueError(f"BackboneSpec: embed_dim {self.embed_dim} is not divisible by num_heads "
                                 f"{self.num_heads}")  # fmt: skip
            allowed = VIT_FEATURES
        else:
            if self.layerscale or self.num_register_tokens:
                raise ValueError(f"BackboneSpec: {self.arch} with layerscale or num_register_tokens, which are ViT "
                                 "options")  # fmt: skip
            for name in ("patch_size", "depth", "embed_dim", "num_heads"):
                put(name, 0)  # not a ResNet's: kept out so that two descriptions of one ResNet compare equal
            allowed = RESNET_FEATURES
        put("feature", self.feature or allowed[0])
        if self.feature not in allowed:
            raise ValueError(f"BackboneSpec.feature: {self.feature!r} is not one of {', '.join(allowed)} for "
                             f"{self.arch}")  # fmt: skip

    def _resolve_timm(self, put: Any) -> None:
        """A timm model's sizes are the model's: a value given that differs from it is an error (another model was
        meant), 0 takes it."""
        try:
            info = timm_info(self.arch, self.img_size)
        except ValueError as e:
            raise ValueError(f"BackboneSpec.arch: {e}") from None
        if self.layerscale:
            raise ValueError(f"BackboneSpec.layerscale: {self.layerscale} with {self.arch}; a timm model has its own")
        own = {"depth": info.depth, "embed_dim": info.dim if info.vit else 0, "num_heads": info.num_heads,
               "num_register_tokens": max(0, info.num_prefix_tokens - 1)}  # fmt: skip
        for name, value in own.items():
            if getattr(self, name) not in (0, value):
                raise ValueError(f"BackboneSpec.{name}: {getattr(self, name)} for {self.arch}, which has {value}; "
                                 "set 0 (a timm model's sizes come from its name)")  # fmt: skip
            put(name, value)
        put("patch_size", info.patch_size)  # the model's (configs default to 16, which need not be it)

    @staticmethod
    def _numbers(name: str, value: Any, n: int, kind: type) -> tuple:
        if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) != n:
            raise ValueError(f"BackboneSpec.{name}: {value!r}; expected {n} numbers")
        if kind is int and any(isinstance(v, bool) or int(v) != v for v in value):
            raise ValueError(f"BackboneSpec.{name}: {value!r}; expected {n} integers")
        return tuple(kind(v) for v in value)

    # -- use -----------------------------------------------------------------------------------------------------------

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)

    @property
    def is_vit(self) -> bool:
        """CLS + patch tokens (cls / cls_mean features); False: a pooled feature map (avg / gem)."""
        return self.arch in VIT_SPECS or (self.is_timm and timm_info(self.arch, self.img_size).vit)

    def build(self, drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
        """The backbone (random weights) and its feature dimension, as `build_backbone` makes it.

        Args:
            drop_path_rate: ViT stochastic depth, a training option (0 for evaluation).
        """
        return build_backbone(
            self.arch, img_size=self.img_size, patch_size=self.patch_size or 16, drop_path_rate=drop_path_rate,
            depth=self.depth or None, embed_dim=self.embed_dim or None, num_heads=self.num_heads or None,
            last_stride=self.last_stride, layerscale=self.layerscale, num_register_tokens=self.num_register_tokens,
        )  # fmt: skip

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights (`ARCH_FIELDS`), as plain values."""
        return {k: v for k, v in self.to_dict().items() if k in ARCH_FIELDS}

    def with_architecture_of(self, other: BackboneSpec) -> BackboneSpec:
        """This spec with `other`'s architecture fields (`ARCH_FIELDS`); input size, feature, normalisation and
        last stride stay this spec's. The feature must suit both families (a ViT's cls / cls_mean, a ResNet's
        avg / gem), so both must be ViTs or both ResNets."""
        if other.is_vit != self.is_vit:
            raise ValueError(f"{other.arch} and {self.arch} are not of one family (ViT / ResNet)")
        return dataclasses.replace(self, **{k: getattr(other, k) for k in ARCH_FIELDS})

    # -- plain values --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain values (str, int, float, lists): safe for `torch.load(weights_only=True)`, JSON and YAML."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}  # fmt: skip

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "backbone spec") -> BackboneSpec:
        """The inverse of `to_dict`: every field must be there and no other.

        Raises:
            ValueError: naming `source` and the unknown or missing fields, or the invalid value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a dict of BackboneSpec fields, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        missing = [k for k in names if k not in values]
        if unknown or missing:
            parts = ([f"unknown field(s) {', '.join(map(str, unknown))}"] if unknown else []) + (
                [f"missing field(s) {', '.join(missing)}"] if missing else [])  # fmt: skip
            raise ValueError(f"{source}: {'; '.join(parts)} (a BackboneSpec has {', '.join(names)})")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> BackboneSpec:
        """From `build_backbone`-style keyword arguments (`name` for `arch`; None = the default), the older way
        of describing backbone weights (e.g. `--backbone name=vit_small img_size=[256,128]`). Any BackboneSpec field
        may be given; the rest take their defaults (256x128 input, ImageNet normalisation); `drop_path_rate`, a
        training option, is accepted and ignored.

        Raises:
            ValueError: no name, or an unknown key (named).
        """
        values = {("arch" if k == "name" else k): v for k, v in kwargs.items() if v is not None}
        values.pop("drop_path_rate", None)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(f"backbone: unknown key(s) {', '.join(unknown)} (expected name or {', '.join(names)})")
        if "arch" not in values:
            raise ValueError(f"backbone: missing name (one of {ARCH_HELP})")
        return cls(**values)

    # -- from the configs ----------------------------------------------------------------------------------------------

    @classmethod
    def from_dino_config(cls, cfg: Any) -> BackboneSpec:
        """The stage-1 backbone of a `DinoConfig`, or of the plain dict of one that a checkpoint stores (missing
        keys take the config's defaults): `model.*`, `crops.global_crops_size`, `crops.mean` / `std`. Its feature is
        the backbone's own global feature (ViT CLS token, ResNet average pool), which is what stage 1 trains."""
        m, crops = _section(cfg, "model"), _section(cfg, "crops")
        return cls(
            arch=_get(m, "arch", "vit_small"), img_size=_get(crops, "global_crops_size", (256, 128)),
            patch_size=_get(m, "patch_size", 16), depth=_get(m, "depth", 0), embed_dim=_get(m, "embed_dim", 0),
            num_heads=_get(m, "num_heads", 0), num_register_tokens=_get(m, "num_register_tokens", 0),
            layerscale=_get(m, "layerscale", 0.0), last_stride=2,
            mean=_get(crops, "mean", IMAGENET_MEAN), std=_get(crops, "std", IMAGENET_STD),
        )  # fmt: skip

    @classmethod
    def from_recog_config(cls, cfg: Any) -> BackboneSpec:
        """The stage-2 backbone of a `RecogConfig` (or its plain dict): `model.*` (feature, last_stride included),
        `aug.size`, `aug.mean` / `std`. Stage 2 has no register tokens or LayerScale of its own: those come from a
        stage-1 export (see `with_architecture_of`)."""
        m, aug = _section(cfg, "model"), _section(cfg, "aug")
        return cls(
            arch=_get(m, "arch", "vit_small"), img_size=_get(aug, "size", (256, 128)),
            patch_size=_get(m, "patch_size", 16), depth=_get(m, "depth", 0), embed_dim=_get(m, "embed_dim", 0),
            num_heads=_get(m, "num_heads", 0), num_register_tokens=_get(m, "num_register_tokens", 0),
            layerscale=_get(m, "layerscale", 0.0), last_stride=_get(m, "last_stride", 1),
            feature=_get(m, "feature", ""), mean=_get(aug, "mean", IMAGENET_MEAN), std=_get(aug, "std", IMAGENET_STD),
        )  # fmt: skip
