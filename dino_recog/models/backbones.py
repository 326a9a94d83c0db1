"""Backbones: timm Vision Transformers, torchvision ResNets (ResNet-50-IBN-a included) and any timm model
(`timm:<name>`, see `timm_backbones`), as feature extractors.

Every backbone returned by `build_backbone` maps (B, 3, H, W) images to (B, D) global features with `forward` and to
the spatial features with `forward_features`: (B, 1 + N, D) tokens for a ViT (CLS first, after the final norm),
(B, C, h, w) maps for a ResNet and the other pooled models. Parameter names are those of timm / torchvision, so
their weights load directly.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torchvision
from timm.models.vision_transformer import VisionTransformer

from .ibn import add_ibn_a
from .timm_backbones import TIMM_PREFIX, build_timm, timm_info

__all__ = ["ARCH_HELP", "build_backbone", "configure_speed", "VIT_SPECS", "ResNetBackbone", "is_vit"]

# name -> (embed_dim, depth, num_heads), as in DINO's vision_transformer.py and timm
VIT_SPECS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
RESNETS = ("resnet18", "resnet50", "resnet101", "resnet50_ibn_a")
ARCH_HELP = " | ".join([*VIT_SPECS, *RESNETS, TIMM_PREFIX + "<name>"])


def is_vit(name: str) -> bool:
    """A ViT (CLS + patch tokens), ours or timm's; False for the pooled models (ResNets, Swin, ConvNeXt, ...).

    Raises:
        ValueError: an unknown name (for `timm:` names, with the close names timm has).
    """
    if name.startswith(TIMM_PREFIX):
        return timm_info(name).vit
    if name not in VIT_SPECS and name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {ARCH_HELP}")
    return name in VIT_SPECS


class ResNetBackbone(torchvision.models.ResNet):
    """A torchvision ResNet without its classifier; `forward` returns the globally average-pooled feature."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)  # (B, C)


def _resnet(name: str, last_stride: int) -> tuple[nn.Module, int]:
    block, layers = {
        "resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
        "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
        "resnet101": (torchvision.models.resnet.Bottleneck, [3, 4, 23, 3]),
        "resnet50_ibn_a": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
    }[name]
    model = ResNetBackbone(block, layers)
    if name.endswith("_ibn_a"):
        add_ibn_a(model)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    if last_stride == 1:
        # "Bag of Tricks" (Luo et al. 2019): a 2x larger last feature map for re-identification.
        first = model.layer4[0]
        (first.conv2 if hasattr(first, "conv3") else first.conv1).stride = (1, 1)
        first.downsample[0].stride = (1, 1)
    return model, dim


def build_backbone(
    name: str,
    img_size: tuple[int, int] = (256, 128),
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    last_stride: int = 2,
    layerscale: float = 0.0,
    num_register_tokens: int = 0,
) -> tuple[nn.Module, int]:
    """Build a backbone by name.

    Args:
        name: vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101 | resnet50_ibn_a | timm:<name> (any
            timm model, built by timm with its own sizes: the ViT size arguments do not apply).
        img_size: (height, width) the ViT position embeddings are made for; other sizes are interpolated at run time
            (global and local crops go through the same network).
        patch_size: ViT patch size (16 or 8).
        drop_path_rate: ViT stochastic depth, linearly increasing over the blocks (DINO student 0.1).
        depth, embed_dim, num_heads: override the ViT size (tests use a 2-block, 32-dim ViT).
        last_stride: ResNet stride of the last stage (1 for re-identification, 2 as in ImageNet models).
        layerscale: ViT LayerScale (Touvron et al. 2021), each residual branch times a learned per-channel gamma
            started at this value (DINOv2 1e-5); 0 = none.
        num_register_tokens: ViT register tokens after the CLS token (Darcet et al. 2024), 0 = none.

    Returns:
        (module, feature dimension).
    """
    if name in VIT_SPECS:
        dim0, depth0, heads0 = VIT_SPECS[name]
        dim = embed_dim or dim0
        model = VisionTransformer(
            img_size=tuple(img_size),
            patch_size=patch_size,
            embed_dim=dim,
            depth=depth or depth0,
            num_heads=num_heads or heads0,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,  # interpolate position embeddings for crops of another size
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            init_values=layerscale or None,
            reg_tokens=num_register_tokens,
        )
        return model, dim
    if name.startswith(TIMM_PREFIX):
        return build_timm(name, tuple(img_size), drop_path_rate)
    if name in RESNETS:
        if layerscale or num_register_tokens:
            raise ValueError(f"{name}: layerscale and num_register_tokens are ViT options")
        return _resnet(name, last_stride)
    raise ValueError(f"unknown backbone {name!r}; expected one of {ARCH_HELP}")


def configure_speed(
    backbone: nn.Module,
    fused_attn: bool = True,
    grad_checkpointing: bool = False,
    channels_last: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Switch a backbone's speed options in place; none of them changes what the network computes.

    Args:
        fused_attn: ViT attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)
            instead of the explicit softmax(q k^T) v, which materialises the (B, heads, N, N) matrix.
        grad_checkpointing: ViT blocks are recomputed in the backward pass instead of keeping their activations.
        channels_last: ResNet weights in channels-last layout, which cuDNN's fastest convolutions want.
        compile: `torch.compile` the module in place (`nn.Module.compile`), so parameter names and checkpoints stay
            those of the plain module; each input size is one graph.

    Returns:
        The same module.
    """
    for m in backbone.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
            m.fused_attn = fused_attn
    if hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(grad_checkpointing)
    if channels_last and isinstance(backbone, ResNetBackbone):
        backbone.to(memory_format=torch.channels_last)
    if compile:
        backbone.compile()
    return backbone
