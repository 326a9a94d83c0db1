"""ResNet-50-IBN-a (Pan et al., ECCV 2018), the backbone of fast-reid's and LUPerson's ResNet baselines.

IBN-a replaces the BatchNorm after the first 1x1 convolution of every bottleneck in layers 1-3 by IBN: instance
norm (affine) on the first half of the channels, batch norm on the rest; layer 4 and the stem keep BatchNorm.
Instance norm removes per-image contrast and colour statistics (camera style), batch norm keeps the content
features. The network is torchvision's ResNet-50 with those norms swapped in; the IBN's parameter names (`IN`, `BN`)
are those of the official IBN-Net and fast-reid weights, so their `resnet50_ibn_a` files load directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["IBN", "add_ibn_a"]


class IBN(nn.Module):
    """Instance norm on the first `int(channels * ratio)` channels, batch norm on the others."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)  # the official weights' names
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


def add_ibn_a(resnet: nn.Module) -> nn.Module:
    """Turn a torchvision bottleneck ResNet into its IBN-a variant, in place: `bn1` of every block of layers 1-3
    becomes an IBN over the same channels. Returns the same module."""
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3):
        for block in layer:
            block.bn1 = IBN(block.bn1.num_features)
    return resnet
