"""The one embedding forward of evaluation and extraction: model, optional flip average, L2 normalisation.

`evaluation.extract_features` and `extract.FeatureExtractor` both call `embed`, so the features of a data set and of
the same images given to the extractor are the same to the bit; `uses_bf16` is the precision rule they (and the
feature cache's key) share.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["embed", "uses_bf16"]


def uses_bf16(device: torch.device) -> bool:
    """Whether `embed` runs under bf16 autocast on `device`: on a CUDA device that supports bf16, else fp32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """L2-normalised features of a batch of preprocessed images.

    Args:
        model: maps (B, 3, H, W) to (B, D); its mode (eval or train) is left to the caller.
        images: (B, 3, H, W), on the model's device.
        flip: average with the features of the horizontally mirrored images (summed, then normalised).

    Returns:
        (B, D) float32 on the images' device, rows of unit length.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=uses_bf16(images.device)):
        f = model(images).float()  # (B, D)
        if flip:
            f = f + model(torch.flip(images, dims=[3])).float()
    return F.normalize(f, dim=1)
