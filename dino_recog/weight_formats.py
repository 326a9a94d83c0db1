"""The key layouts of the weight files we read, mapped to our networks' (timm / torchvision names).

- ours: stage-1 checkpoints (`teacher` / `student`: `backbone.*`, `head.*`), backbone exports, stage-2 models;
- official DINO (facebookresearch/dino): `checkpoint.pth` with `teacher` / `student` (`module.` under DDP,
  `backbone.*`, `head.*` with the old weight-norm `last_layer.weight_g` / `weight_v`), and the released
  backbone-only state dicts (`dino_deitsmall16_pretrain.pth`: timm names already);
- DINOv2 (facebookresearch/dinov2): hub state dicts (`cls_token`, `pos_embed` over CLS + patches only,
  `register_tokens`, `mask_token`, `blocks.N.ls1.gamma`), chunked blocks (`blocks.C.N.*`, FSDP training) and
  training checkpoints (`teacher` / `student` with `backbone.*`, `dino_head.*`, `ibot_head.*`);
- timm / torchvision state dicts, and `{"state_dict": ...}` / `{"model": ...}` wrappers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["extract_backbone_state", "extract_head_states", "to_model_layout"]

_HEADS = ("head.", "dino_head.", "ibot_head.", "neck.", "classifier.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\.)")  # DINOv2 BlockChunk: blocks.<chunk>.<global block index>.


def _network(obj: Mapping, key: str) -> Mapping:
    """The state dict of network `key` of a student/teacher checkpoint, or of a wrapper, or `obj` itself."""
    if key in obj and isinstance(obj[key], Mapping):
        return obj[key]
    for wrapper in ("model", "state_dict", "backbone"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return obj[wrapper]
    return obj


def extract_backbone_state(obj: Mapping, key: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's state dict out of any supported container (see the module docstring), heads, necks,
    classifiers and DINOv2's mask token left out, DINOv2's chunked blocks unchunked.

    Args:
        obj: the loaded file.
        key: which network of a student/teacher checkpoint to take.
    """
    state = {}
    for k, v in _network(obj, key).items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.")
        if k.startswith(_HEADS) or k == "mask_token":
            continue  # the DINO / iBOT head, DINOv2's mask token or a recognition head, not backbone weights
        state[_CHUNKED.sub(r"blocks.\1", k.removeprefix("backbone."))] = v
    return state


def extract_head_states(obj: Mapping, key: str = "teacher") -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """The DINO heads (and DINOv2's mask token) of a stage-1 checkpoint, ours, DINO's or DINOv2's, in our names:
    {"head": {...}, "ibot_head": {...}, "mask_token": (1, D)}, each present only when the file has it. The old
    weight-norm names (`weight_g`, `weight_v`) become the parametrization's (`original0`, `original1`)."""
    out: dict = {}
    for k, v in _network(obj, key).items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.")
        if k.removeprefix("backbone.") == "mask_token":
            out["mask_token"] = v.reshape(1, -1)
            continue
        k = k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
        k = k.replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1")
        for prefix, name in (("head.", "head"), ("dino_head.", "head"), ("ibot_head.", "ibot_head")):
            if k.startswith(prefix):
                out.setdefault(name, {})[k.removeprefix(prefix)] = v
    return out


def to_model_layout(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """DINOv2's token layout to a timm ViT's, exactly, in place: `register_tokens` -> `reg_token`; DINOv2's
    `pos_embed` covers CLS + patches (the registers get none), so a timm ViT that has position slots for all its
    prefix tokens gets zeros at the registers' slots, and one without a CLS slot (`no_embed_class`, timm's own DINOv2
    models) gets the CLS position added to the CLS token."""
    if "register_tokens" not in state or "pos_embed" not in state or not hasattr(model, "num_prefix_tokens"):
        return
    state["reg_token"] = state.pop("register_tokens")
    pos, cls_pos = state["pos_embed"], state["pos_embed"][:, :1]  # (1, 1 + N, D)
    if getattr(model, "no_embed_class", False):
        state["cls_token"] = state["cls_token"] + cls_pos
        state["pos_embed"] = pos[:, 1:]
    else:
        zeros = pos.new_zeros(1, model.num_prefix_tokens - 1, pos.shape[-1])
        state["pos_embed"] = torch.cat([cls_pos, zeros, pos[:, 1:]], dim=1)
