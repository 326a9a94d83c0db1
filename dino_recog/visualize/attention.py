"""Self-attention maps of a ViT: the CLS token's attention over the patches in the last block, per head.

The fused attention kernels used for training (`F.scaled_dot_product_attention`) never materialise the attention
matrix, so this module recomputes the last block explicitly from its own weights (`attn.qkv`, q/k norms, scale); the
training path is untouched. The thresholding follows the official DINO `visualize_attention.py`: keep the patches
holding the top x% of a head's attention mass.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

from .. import checkpoint as ckpt
from .. import weights
from ..data.datasets import read_image
from ..data.transforms import reid_test_transform
from ..models.backbones import RESNETS, VIT_SPECS
from ..models.spec import BackboneSpec
from ._draw import grid, labelled, save_png

__all__ = [
    "AttentionError",
    "block_forward_explicit",
    "last_self_attention",
    "cls_attention_maps",
    "threshold_mass",
    "load_vit",
    "attention_rows",
    "save_attention_maps",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class AttentionError(ValueError):
    """A checkpoint or input the attention maps cannot be drawn from; the message says why."""


# ---------------------------------------------------------------------------------------------------------------------
# The attention matrix


def block_forward_explicit(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT `Block` computed with an explicit softmax attention instead of the fused kernel.

    Mirrors `timm.layers.Attention.forward` (non-fused branch) and `Block.forward` in eval mode, so the returned
    output equals `block(x)`; the tests hold it to that.

    Args:
        block: a timm `Block` (pre-norm, `attn.qkv`, optional q/k norms, layer scale).
        x: (B, N, D) tokens entering the block.

    Returns:
        (block output (B, N, D), attention probabilities (B, heads, N, N), each row summing to 1).
    """
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise AttentionError("gated attention blocks are not supported")
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
    y = attn.proj(attn.norm(y))
    x = x + block.drop_path1(block.ls1(y))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probs


@torch.no_grad()
def last_self_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block of a timm VisionTransformer, as DINO's `get_last_selfattention`.

    Position embeddings are resampled to the input's patch grid by the model itself (`dynamic_img_size`), so any
    height and width divisible by the patch size work (256x128 person crops included).

    Args:
        vit: a timm VisionTransformer (e.g. from `build_backbone`), in eval mode.
        images: (B, 3, H, W) normalised images.

    Returns:
        (B, heads, N, N) float32 attention; token 0 is CLS, then `num_prefix_tokens - 1` register tokens, then the
        patches row by row.
    """
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)  # timm's own position handling: dynamic resampling for rectangular / other sizes
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    return block_forward_explicit(vit.blocks[-1], x)[1]


def cls_attention_maps(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention over the patches, per head, on the patch grid.

    Returns:
        (B, heads, H / patch, W / patch) attention weights (each head's map sums to 1 minus CLS's attention to the
        prefix tokens).
    """
    ph, pw = vit.patch_embed.patch_size
    h, w = images.shape[-2:]
    if h % ph or w % pw:
        raise AttentionError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    attn = last_self_attention(vit, images)
    cls = attn[:, :, 0, vit.num_prefix_tokens :]
    return cls.reshape(*cls.shape[:2], h // ph, w // pw)


def threshold_mass(maps: torch.Tensor, keep: float) -> torch.Tensor:
    """Mask of the largest attention weights that together hold a `keep` fraction of each map's mass.

    The official DINO rule (`visualize_attention.py`): sort ascending, normalise, cumulative sum, keep the entries whose
    cumulative mass exceeds 1 - keep.

    Args:
        maps: (..., h, w) non-negative maps.
        keep: fraction of the mass to keep, in (0, 1].

    Returns:
        Boolean (..., h, w) mask.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"threshold {keep}: expected a fraction of the attention mass in (0, 1]")
    flat = maps.flatten(-2)
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    kept_sorted = torch.cumsum(val, dim=-1) > (1.0 - keep)
    mask = torch.empty_like(kept_sorted).scatter_(-1, idx, kept_sorted)  # back to the original positions
    return mask.reshape(maps.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Which ViT a checkpoint holds


def _hints(obj: dict, path: Path) -> dict:
    """What the file (or the run's config.yaml beside it) says about the model: arch, heads, input size, mean/std."""
    if isinstance(obj.get("spec"), dict):  # stage-2 model.pth / checkpoint
        s = obj["spec"]
        return {"arch": s.get("arch"), "embed_dim": s.get("embed_dim"), "num_heads": s.get("num_heads"),
                "size": s.get("img_size"), "mean": s.get("mean"), "std": s.get("std")}  # fmt: skip
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if cfg is None and (path.parent / "config.yaml").is_file():  # an export beside the config of its run
        try:
            cfg = yaml.safe_load((path.parent / "config.yaml").read_text())
        except yaml.YAMLError:
            cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        return {}
    m = cfg["model"]
    pre = cfg.get("crops") or cfg.get("aug") or {}  # stage 1 or stage 2 config
    return {"arch": m.get("arch"), "embed_dim": m.get("embed_dim"), "num_heads": m.get("num_heads"),
            "size": pre.get("global_crops_size") or pre.get("size"), "mean": pre.get("mean"),
            "std": pre.get("std")}  # fmt: skip


def _resnet_name(state: dict, hints: dict) -> str:
    if hints.get("arch") in RESNETS:
        return hints["arch"]
    blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    bottleneck = any(".conv3." in k for k in state)
    names = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101",
             (36, True): "resnet152"}  # fmt: skip
    return names.get((blocks, bottleneck), "ResNet")


def load_vit(
    path: str | os.PathLike, key: str = "teacher", num_heads: int = 0, size: Sequence[int] | None = None
) -> tuple[nn.Module, tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """Build the ViT held by any backbone checkpoint and load its weights.

    A file with a `spec` (backbone export, stage-2 model) is rebuilt from its BackboneSpec. For the others, embedding
    width, depth, patch size and register tokens are read from the weights; the number of heads (which weights
    cannot tell) from `num_heads`, else the file's config, else the run's `config.yaml` beside the file, else the
    standard ViT of that width (192: 3, 384: 6, 768: 12 heads).

    Args:
        path: stage-1 checkpoint or export, stage-2 model, official DINO checkpoint, timm state dict.
        key: network of a student/teacher checkpoint.
        num_heads: override the number of heads (0: find it as above).
        size: input (height, width); default: the model's training size, else 256x128.

    Returns:
        (model in eval mode, input size, normalisation mean, std).

    Raises:
        AttentionError: the file holds a ResNet or no ViT; the number of heads cannot be found.
    """
    path = Path(path)
    obj = ckpt.load_checkpoint(path)
    hints = _hints(obj, path)
    state = weights.extract_backbone_state(obj, key)
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        if any(k.startswith("layer4.") or k == "conv1.weight" for k in state):
            raise AttentionError(f"attention maps need a ViT; {path} holds a {_resnet_name(state, hints)}")
        raise AttentionError(f"attention maps need a ViT; {path} holds no ViT weights (no cls_token / patch_embed)")
    spec = weights.read_backbone_spec(obj, path) if isinstance(obj.get("spec"), dict) else None
    if spec is None:
        spec = _spec_from_weights(state, hints, path, num_heads)
    elif num_heads:
        spec = dataclasses.replace(spec, num_heads=num_heads)
    if size:
        spec = dataclasses.replace(spec, img_size=tuple(size))
    model, _ = spec.build()
    missing = weights.load_backbone_weights(model, path, key)["missing"]
    if missing:
        raise AttentionError(f"{path}: the ViT lacks weights for {', '.join(missing[:8])}; maps would be random")
    log.info("%s: ViT %d blocks, %d dim, %d heads, patch %d, %d registers, input %dx%d", path, spec.depth,
             spec.embed_dim, spec.num_heads, spec.patch_size, spec.num_register_tokens, *spec.img_size)  # fmt: skip
    return model.eval(), spec.img_size, spec.mean, spec.std


def _spec_from_weights(state: dict, hints: dict, path: Path, num_heads: int) -> BackboneSpec:
    """The BackboneSpec of ViT weights without one: sizes from the tensors, heads and preprocessing from hints."""
    dim = state["cls_token"].shape[-1]
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    patch = state["patch_embed.proj.weight"].shape[-1]
    hint_dim = hints.get("embed_dim") or VIT_SPECS.get(hints.get("arch"), (None,))[0]
    heads = num_heads or (hints.get("num_heads") if hint_dim == dim else 0)
    heads = heads or (VIT_SPECS.get(hints.get("arch"), (0, 0, 0))[2] if hint_dim == dim else 0)
    heads = heads or {d: h for d, _, h in VIT_SPECS.values()}.get(dim, 0)
    if not heads:
        raise AttentionError(f"{path}: cannot tell the number of heads of a {dim}-dim ViT; pass --num-heads")
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    return BackboneSpec("vit_small", img_size=tuple(hints.get("size") or (256, 128)), patch_size=patch, depth=depth,
                        embed_dim=dim, num_heads=heads, num_register_tokens=registers,
                        mean=tuple(hints.get("mean") or IMAGENET_MEAN), std=tuple(hints.get("std") or IMAGENET_STD))


# ---------------------------------------------------------------------------------------------------------------------
# Pictures


def _overlay(image: np.ndarray, att: np.ndarray, mask: np.ndarray | None) -> Image.Image:
    """A heat map of `att` (min-max scaled per panel) over the grey image, so that the colours of clothes are not
    mistaken for attention; with a mask, the kept part is shown so and the rest dimmed."""
    from matplotlib import colormaps  # imported here: the package is importable without matplotlib installed

    span = att.max() - att.min()
    heat = colormaps["inferno"]((att - att.min()) / span if span > 0 else np.zeros_like(att))[..., :3]
    grey = image.mean(axis=-1, keepdims=True)
    blend = 0.4 * grey + 0.6 * heat
    if mask is not None:
        blend = np.where(mask[..., None], blend, 0.3 * grey)
    return Image.fromarray(np.clip(blend * 255, 0, 255).round().astype(np.uint8))


def attention_rows(
    image: Image.Image, maps: torch.Tensor, patch: tuple[int, int], scale: int, keep: float | None = None
) -> list[list[Image.Image]]:
    """Labelled panels for one image: [input, head 0, ..., head h-1, mean], and a second, thresholded row with `keep`.

    Args:
        image: the RGB input, any size (shown resized to the input resolution times `scale`).
        maps: (heads, gh, gw) CLS attention of this image.
        patch: (ph, pw) patch size in input pixels.
        scale: display magnification of the input resolution (integer, so patches stay whole pixel blocks).
        keep: also draw the top-`keep` mass masks.
    """
    maps = torch.cat([maps, maps.mean(0, keepdim=True)]).float()
    gh, gw = maps.shape[-2:]
    ph, pw = patch[0] * scale, patch[1] * scale
    shown = np.asarray(image.convert("RGB").resize((gw * pw, gh * ph), Image.BICUBIC), dtype=np.float64) / 255
    names = [f"head {i}" for i in range(len(maps) - 1)] + ["mean"]
    up = maps.numpy().repeat(ph, axis=1).repeat(pw, axis=2)  # nearest upsampling, as the official script
    row = [labelled(Image.fromarray((shown * 255).round().astype(np.uint8)), "input")]
    row += [labelled(_overlay(shown, a, None), n) for a, n in zip(up, names)]
    rows = [row]
    if keep is not None:
        masks = threshold_mass(maps, keep).numpy().repeat(ph, axis=1).repeat(pw, axis=2)
        pct = f"{100 * keep:g}%"
        rows.append([labelled(Image.fromarray((shown * 255).round().astype(np.uint8)), f"top {pct} mass")]
                    + [labelled(_overlay(shown, a, m), f"{n} {pct}") for a, m, n in zip(up, masks, names)])  # fmt: skip
    return rows


def save_attention_maps(
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    threshold: float | None = None,
    size: Sequence[int] | None = None,
    key: str = "teacher",
    num_heads: int = 0,
    scale: int = 0,
) -> list[Path]:
    """Draw the last-block CLS attention of a ViT checkpoint on each image.

    Writes OUT/<image stem>.png for each image and OUT/attention.png with all of them, one row per image (two with a
    threshold: the maps, then the patches holding `threshold` of the mass).

    Args:
        checkpoint: any ViT backbone checkpoint (see `load_vit`).
        images: image files.
        out: output folder.
        threshold: fraction of the attention mass to keep in the masks (DINO uses 0.6); None: no masks.
        size: input (height, width), multiples of the patch size; default: the model's training size.
        key: network of a student/teacher checkpoint.
        num_heads: override the number of heads.
        scale: display magnification; 0 picks the smallest making panels at least 192 pixels high.

    Returns:
        The written files, the combined picture last.
    """
    model, size, mean, std = load_vit(checkpoint, key, num_heads, size)
    patch = tuple(model.patch_embed.patch_size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise AttentionError(f"input size {size[0]}x{size[1]} is not a multiple of the patch size {patch[0]}")
    scale = scale or max(1, -(-192 // size[0]))
    tf = reid_test_transform(size, mean, std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, all_rows, stems = [], [], set()
    for p in images:
        pil = read_image(p)
        maps = cls_attention_maps(model, tf(pil).unsqueeze(0))[0]
        rows = attention_rows(pil, maps, patch, scale, threshold)
        stem = Path(p).stem
        while stem in stems or stem == "attention":  # two inputs with one name must not overwrite each other
            stem += "_"
        stems.add(stem)
        written.append(save_png(grid(rows)[0], out / f"{stem}.png"))
        all_rows += rows
    written.append(save_png(grid(all_rows)[0], out / "attention.png"))
    return written
