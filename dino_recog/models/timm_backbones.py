"""Any timm model as a backbone: `model.arch: timm:<name>`, built without weights (`pretrained=False`; weights come
only from a file the user names).

Two families, told apart by the built model:

- ViT-like (a CLS token before the patch tokens, e.g. `vit_*`, `deit_*`, `*_dinov2`): used as timm builds it, so
  `forward_features` gives the (B, prefix + N, D) tokens after the final norm and `forward` the CLS feature, as our
  own ViTs; built with `dynamic_img_size` so that crops of another size interpolate the position embeddings.
- pooled (Swin, ResNet, ConvNeXt, ...): `forward` is timm's pooled feature; `forward_features` gives (B, C, h, w)
  maps (Swin's channels-last output is permuted), which the re-ID head pools by average or GeM.

Parameter names stay timm's (the pooled adaptation changes the class, not the module tree), so timm state dicts load
directly.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache, lru_cache

import timm
import torch
import torch.nn as nn

__all__ = ["TIMM_PREFIX", "TimmInfo", "build_timm", "check_timm_sizes", "timm_info", "timm_name"]

TIMM_PREFIX = "timm:"
# keyword arguments we pass where the model's constructor takes them: the input size it is made for, position
# embeddings interpolated (ViT) or windows padded (Swin) for other sizes, stochastic depth
_OPTIONAL = ("img_size", "dynamic_img_size", "drop_path_rate")


@dataclass(frozen=True)
class TimmInfo:
    """What a timm model is, read from the model built on the meta device (no memory, no weights).

    Attributes:
        vit: CLS token + patch tokens (ViT-like); False: a pooled feature over a feature map.
        dim: the global feature's size (`num_features`).
        patch_size, depth, num_heads: the ViT's (0 for pooled models).
        num_prefix_tokens: CLS + register (+ distillation) tokens before the patches (0 for pooled models).
    """

    vit: bool
    dim: int
    patch_size: int = 0
    depth: int = 0
    num_heads: int = 0
    num_prefix_tokens: int = 0


def timm_name(arch: str) -> str:
    """`timm:<name>` -> `<name>`, checked against timm's registry.

    Raises:
        ValueError: the name is not a timm model; the message lists the closest names timm has.
    """
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise ValueError(f"{arch!r} is not a timm model (timm {timm.__version__}){hint}")
    return name


class _MapFeatures:
    """Mixed into a pooled timm model's class: `forward_features` returns (B, C, h, w) maps whatever layout the model
    keeps (Swin: channels last; token models without CLS: (B, N, D) tokens as a 1 x N map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(super().forward_features(x))  # timm's pooling reads the model's own layout

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward_features(x)
        if out.ndim == 3:  # tokens (B, prefix + N, D): the patch tokens as a (B, D, 1, N) map
            return out[:, getattr(self, "num_prefix_tokens", 0) :].transpose(1, 2).unsqueeze(2)
        if getattr(self, "output_fmt", "NCHW") == "NHWC":
            out = out.permute(0, 3, 1, 2)
        return out


@cache
def _map_class(cls: type) -> type:
    return type(cls.__name__, (_MapFeatures, cls), {"__module__": cls.__module__})


def _create(name: str, kwargs: dict) -> nn.Module:
    """timm.create_model with the optional keyword arguments the model's constructor does not take left out."""
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as e:
            rejected = [k for k in kwargs if k in _OPTIONAL and re.search(rf"\b{k}\b", str(e))]
            if not rejected:
                raise
            for k in rejected:
                kwargs.pop(k)


def _is_vit(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None and hasattr(model, "patch_embed") and hasattr(model, "blocks")


@lru_cache(maxsize=64)
def timm_info(arch: str, img_size: tuple[int, int] = (256, 128)) -> TimmInfo:
    """The family and sizes of `timm:<name>` built for `img_size` (see `TimmInfo`)."""
    with torch.device("meta"):
        model = _create(timm_name(arch), {"img_size": tuple(img_size), "dynamic_img_size": True})
    if not _is_vit(model):
        return TimmInfo(False, int(model.num_features))
    attn = getattr(model.blocks[0], "attn", None)
    return TimmInfo(True, int(model.num_features), int(model.patch_embed.patch_size[0]), len(model.blocks),
                    int(getattr(attn, "num_heads", 0)), int(model.num_prefix_tokens))  # fmt: skip


def build_timm(arch: str, img_size: tuple[int, int] = (256, 128), drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
    """The backbone `timm:<name>` (random weights) and its feature dimension.

    Args:
        img_size: (height, width) passed to models that take it (ViT position embeddings, Swin windows).
        drop_path_rate: stochastic depth, for models that have it.
    """
    model = _create(timm_name(arch), {"img_size": tuple(img_size), "dynamic_img_size": True,
                                      "drop_path_rate": drop_path_rate})  # fmt: skip
    if not _is_vit(model):
        model.__class__ = _map_class(type(model))
    return model, int(model.num_features)


def check_timm_sizes(arch: str, img_size: tuple[int, int], sizes: dict[str, tuple[int, int]]) -> None:
    """Every input size in `sizes` goes through `timm:<name>` built for `img_size`; a forward on the meta device
    (shapes only) finds the sizes the architecture refuses (a fixed input size, a window that does not tile it).

    Args:
        sizes: config key -> (height, width), named in the error.

    Raises:
        ValueError: naming the key, the size and timm's reason.
    """
    with torch.device("meta"):
        model = _create(timm_name(arch), {"img_size": tuple(img_size), "dynamic_img_size": True}).eval()  # 1 image
        for key, size in sizes.items():
            try:
                model.forward_features(torch.empty(1, 3, *size))
            except Exception as e:  # timm asserts or fails in a reshape, model by model
                raise ValueError(f"{key}: {list(size)} does not go through {arch} built for {list(img_size)} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}); "
                                 "use sizes the architecture takes, or a model with dynamic_img_size") from None
