"""Backbone weights from any source, the backbone export, and the recognition model file.

Every file that dino_recog writes carries the `BackboneSpec` of its backbone, so every tool rebuilds it without
architecture flags:

- backbone export (`teacher_backbone.pth`, `save_backbone`):
  `{"format_version", "kind": "backbone", "spec": BackboneSpec.to_dict(), "state_dict": {timm / torchvision keys}}`;
- stage-2 model (`model.pth`, `best.pth`, and the stage-2 training checkpoints, `save_reid_model`):
  `{"format_version", "kind": "reid_model", "spec": ReIDModel.spec, "state_dict": {...}}`, the spec being the
  BackboneSpec fields plus the head's (see `models.reid`);
- stage-1 training checkpoint: `teacher` / `student` networks and the run's `config`, from which the spec is made.

Read as well, without a spec (the architecture then comes from the caller, e.g. the config's `model.*`): the older
export (a bare state dict), official DINO checkpoints (`teacher` / `student`, `module.` / `backbone.` prefixes),
DINOv2 files (registers, LayerScale, chunked blocks) and timm / torchvision state dicts (their key layouts:
`weight_formats`); stage-2 specs written before the BackboneSpec (no register / LayerScale fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .models.backbones import ARCH_HELP
from .models.reid import ReIDModel, backbone_spec_of_reid, build_reid_model
from .models.spec import BackboneSpec
from .weight_formats import extract_backbone_state, to_model_layout

__all__ = [
    "extract_backbone_state",
    "load_backbone_weights",
    "peek_checkpoint",
    "save_backbone",
    "read_backbone_spec",
    "pretrained_backbone_spec",
    "open_feature_model",
    "load_feature_model",
    "save_reid_model",
    "load_reid_model",
]

log = logging.getLogger(__name__)

_ARCH_HELP = ARCH_HELP


# ---------------------------------------------------------------------------------------------------------------------
# Reading a file's description


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's top-level dict without reading its tensors (memory-mapped) where the format allows it;
    otherwise (an old-format file, or one that is missing, foreign or unsafe) what `load_checkpoint` says."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-format file cannot be mapped; a missing or bad one gets its CheckpointError here
        return load_checkpoint(path)
    version = state.get("format_version") if isinstance(state, dict) else None
    known = version is None or (isinstance(version, int) and 1 <= version <= FORMAT_VERSION)
    if not isinstance(state, dict) or not known:
        return load_checkpoint(path)  # names what is wrong
    return state


def _is_reid_model(state: Mapping) -> bool:
    return "spec" in state and "state_dict" in state and state.get("kind") != "backbone"


def read_backbone_spec(
    source: str | os.PathLike | Mapping, path: str | os.PathLike | None = None
) -> BackboneSpec | None:
    """The BackboneSpec a file carries: a backbone export's `spec`, a stage-2 model's (or checkpoint's) `spec`, or
    the `config` of a stage-1 training checkpoint; None for files without one (bare state dicts, official DINO, timm).

    Args:
        source: a path, or the already loaded top-level dict.
        path: the file's name for messages, when `source` is a dict.

    Raises:
        CheckpointError: the file's description is broken (the message names the file and the field).
    """
    if isinstance(source, Mapping):
        obj, where = source, path or "checkpoint"
    else:
        obj, where = peek_checkpoint(source), source
    try:
        spec = obj.get("spec")
        if isinstance(spec, Mapping):
            if obj.get("kind") == "backbone":
                return BackboneSpec.from_dict(spec, "spec")
            return backbone_spec_of_reid(spec)
        cfg = obj.get("config")
        if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) and "arch" in cfg["model"]:
            return BackboneSpec.from_recog_config(cfg) if "aug" in cfg else BackboneSpec.from_dino_config(cfg)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return None


def save_backbone(backbone: nn.Module, spec: BackboneSpec, path: str | os.PathLike,
                  state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write a backbone export (atomically): `{"format_version", "kind": "backbone", "spec", "state_dict"}`.

    `load_backbone_weights` reads its `state_dict`; every tool rebuilds the network from its `spec`.

    Args:
        state_dict: the backbone's weights when not its own `state_dict()` (an FSDP-sharded backbone's, gathered by
            `parallel.full_state_dict`).
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"save_backbone: spec must be a BackboneSpec, got {type(spec).__name__}")
    state = backbone.state_dict() if state_dict is None else dict(state_dict)
    return save_checkpoint({"kind": "backbone", "spec": spec.to_dict(), "state_dict": state}, path)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone weights from our checkpoints and exports, official DINO / DINOv2 checkpoints and timm state dicts
# (their key layouts: weight_formats)


def _resize_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Interpolate a ViT position embedding to the model's patch grid (e.g. 224x224 DINO weights to 256x128)."""
    grid = tuple(model.patch_embed.grid_size)  # (gh, gw) of the model
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens  # prefix tokens' slots
    n_old = pos_embed.shape[1] - prefix
    side = math.isqrt(n_old)
    if side * side == n_old:
        old = (side, side)
    else:  # non-square: assume the model's aspect (our own 256x128 exports)
        gh = math.isqrt(round(n_old * grid[0] / grid[1]))
        if gh == 0 or n_old % gh:
            raise CheckpointError(
                f"pos_embed has {n_old} patch positions, which is neither a square grid nor "
                f"of the model's aspect {grid[0]}x{grid[1]}"
            )
        old = (gh, n_old // gh)
    log.info("interpolating position embeddings from a %dx%d to a %dx%d patch grid", *old, *grid)
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(old), num_prefix_tokens=prefix)


def _match_layerscale(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Make ViT LayerScale agree between the weights and the model, exactly (in place on `state`).

    LayerScale multiplies the output of the block's last linear layer (attention `proj`, MLP `fc2`) by gamma, so
    a gamma the model has no place for is folded into that layer's weight and bias (DINOv2 weights into a plain ViT);
    a model with LayerScale loading weights without it gets gamma = 1.
    """
    folded = 0
    for key in [k for k in state if k.endswith((".ls1.gamma", ".ls2.gamma")) and k not in own]:
        block, branch = key.rsplit(".", 2)[:2]
        linear = f"{block}.attn.proj" if branch == "ls1" else f"{block}.mlp.fc2"
        if f"{linear}.weight" not in state:
            continue  # not a timm block; reported as an unexpected key
        gamma = state.pop(key)  # (D,)
        state[f"{linear}.weight"] = state[f"{linear}.weight"] * gamma.unsqueeze(1)  # (D, D_in): scale each output
        if f"{linear}.bias" in state:
            state[f"{linear}.bias"] = state[f"{linear}.bias"] * gamma
        folded += 1
    ones = [k for k in own if k.endswith((".ls1.gamma", ".ls2.gamma")) and k not in state]
    for key in ones:
        state[key] = torch.ones_like(own[key])
    if folded:
        log.info("folded %d LayerScale gammas into the linear layers before them (the model has no LayerScale)", folded)
    if ones:
        log.info("set %d LayerScale gammas to 1 (the weights have no LayerScale)", len(ones))


def _key_groups(keys: list[str], limit: int = 12) -> str:
    """`blocks.1.norm1.weight, blocks.1.attn.qkv.weight, ..., norm.weight` -> `blocks.1.* (12 tensors), norm.weight`:
    the keys of one block or stage (`blocks.N`, `layerK.N`) together, in model order."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        group = ".".join(parts[:2]) + ".*" if len(parts) > 2 and parts[1].isdigit() else k
        groups[group] = groups.get(group, 0) + 1
    shown = [g if n == 1 and not g.endswith("*") else f"{g} ({n} tensors)" for g, n in groups.items()]
    return ", ".join(shown[:limit]) + (f", ... ({len(shown) - limit} more)" if len(shown) > limit else "")


def load_backbone_weights(
    model: nn.Module,
    path: str | os.PathLike,
    key: str = "teacher",
    allow_missing: bool = False,
    switch: str | None = "allow_missing=True (the tools' --allow-missing)",
) -> dict[str, list[str]]:
    """Load backbone weights into `model` from any supported file (see `extract_backbone_state`).

    Position embeddings are interpolated to the model's input size. LayerScale (DINOv2) in the weights but not in
    the model is folded into the layers before it, exactly. A model key the file lacks (a 1-block teacher loaded into
    a 2-block model) is an error listing the missing keys, before anything is loaded: the network would keep random
    values there and every feature and score from it would be meaningless. Unexpected keys are logged and returned;
    a tensor whose shape differs (another architecture) is an error listing every mismatched key with both shapes,
    and so are a file that shares no key with the model and another number of register tokens.

    Args:
        allow_missing: load anyway, leaving the missing tensors as initialised (logged as a warning).
        switch: how the caller's user sets `allow_missing`, named in the error; None when the caller offers no
            such switch (stage-2 training).

    Returns:
        {"missing": [...], "unexpected": [...]}

    Raises:
        CheckpointError: missing keys (unless allowed), mismatched shapes, no shared key, other register tokens.
    """
    state = extract_backbone_state(load_checkpoint(path), key)
    to_model_layout(state, model)
    own = model.state_dict()
    if "pos_embed" in own:
        n_file = state["reg_token"].shape[1] if "reg_token" in state else 0
        n_model = own["reg_token"].shape[1] if "reg_token" in own else 0
        if n_file != n_model:
            raise CheckpointError(f"{path}: the weights have {n_file} register tokens, the model {n_model}; build the "
                                  f"backbone with num_register_tokens={n_file}")  # fmt: skip
        _match_layerscale(state, own)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = _resize_pos_embed(state["pos_embed"], model)
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path}: weights are for another architecture; mismatched keys:\n  " + "\n  ".join(mismatched)
        )
    shared = [k for k in state if k in own]
    if not shared:
        raise CheckpointError(
            f"{path}: no key matches the model ({len(state)} tensors in the file, e.g. "
            f"{', '.join(list(state)[:3]) or 'none'}); is this a backbone checkpoint?"
        )
    # BatchNorm's step counter is not a weight: old-format files (torchvision's first ResNet releases) lack it, and
    # load_state_dict fills it in for them
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    if missing and not allow_missing:
        override = f"; {switch} keeps them random" if switch else ""
        raise CheckpointError(
            f"{path}: {len(missing)} of the model's {len(own)} tensors are missing from the weights: "
            f"{_key_groups(missing)}; expected weights of the same architecture (fewer blocks or another model in "
            f"the file?){override}"
        )
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    log.info("loaded %d backbone tensors from %s (key %r)", len(shared), path, key)
    if missing:
        log.warning("%d model keys missing from %s, left as initialised (allowed): %s", len(missing), path,
                    _key_groups(missing))  # fmt: skip
    if unexpected:
        log.warning("%d keys of %s not used: %s", len(unexpected), path, ", ".join(unexpected[:20]))
    return {"missing": missing, "unexpected": unexpected}



def pretrained_backbone_spec(
    spec: BackboneSpec, path: str | os.PathLike, what: str = "model.pretrained"
) -> BackboneSpec:
    """The spec of a backbone that is to start from the weights in `path`: `spec` (the configured one) with the
    architecture fields (`ARCH_FIELDS`) of the file's own spec, when it has one; input size, feature, normalisation
    and last stride stay the configured ones. Every field the file overrides is logged (a warning): the file is what
    the weights fit, so it wins.

    Args:
        what: the setting naming the file, for messages (stage 2: model.pretrained).

    Raises:
        CheckpointError: the file holds a ViT and the configured backbone is a ResNet or the other way round (the
            configured feature and layer decay would not fit), or the configured input size is no whole number of
            the file's patches.
    """
    own = read_backbone_spec(path)
    if own is None:  # a bare state dict, official DINO, timm: the configuration describes it
        return spec
    if own.is_vit != spec.is_vit:
        raise CheckpointError(
            f"{what}: {path} holds a {own.arch} backbone, but model.arch is {spec.arch} (another family, with other "
            f"features); set model.arch={own.arch} and model.feature to one of "
            f"{'cls, cls_mean' if own.is_vit else 'avg, gem'}"
        )
    merged = spec.with_architecture_of(own)
    before, after = spec.architecture(), merged.architecture()
    changed = [f"{k} {before[k]} -> {after[k]}" for k in after if before[k] != after[k]]
    if changed:
        log.warning("%s: %s carries its own architecture, which replaces model.*: %s", what, path, ", ".join(changed))
    if merged.is_vit and any(v % merged.patch_size for v in merged.img_size):
        raise CheckpointError(f"{what}: {path} has patch size {merged.patch_size}; the input size "
                              f"{list(merged.img_size)} is not a multiple of it")  # fmt: skip
    return merged


def open_feature_model(
    path: str | os.PathLike,
    fallback: BackboneSpec | None = None,
    key: str = "teacher",
    override: BackboneSpec | None = None,
    allow_missing: bool = False,
) -> tuple[nn.Module, BackboneSpec]:
    """A model mapping images to features, from any checkpoint, and the BackboneSpec that says how to feed it.

    A stage-2 model gives its embedding, rebuilt from its spec. Backbone weights (export, stage-1 checkpoint,
    official DINO, timm) give the backbone's global feature (ViT CLS token, ResNet average pool); the backbone is
    built from `override` if given, else from the file's own spec, else from `fallback`.

    Backbone weights that lack some of the model's tensors are refused unless `allow_missing` (see
    `load_backbone_weights`).

    Raises:
        CheckpointError: unreadable file; backbone weights with neither a spec of their own nor one passed, or
            without some of the model's tensors.
    """
    state = peek_checkpoint(path)
    if _is_reid_model(state):
        model = load_reid_model(path)
        return model, model.backbone_spec
    own = read_backbone_spec(state, path)
    spec = override or own or fallback
    if spec is None:
        raise CheckpointError(
            f"{path}: backbone weights without a description of the architecture; pass "
            f"backbone=dict(name=..., img_size=(H, W), ...) with the keyword arguments of "
            f"dino_recog.models.build_backbone (missing: name, one of {_ARCH_HELP})"
        )
    if own is not None and spec is not own and spec.architecture() != own.architecture():
        log.warning("%s carries the architecture %s; using %s instead, as asked", path, own.architecture(),
                    spec.architecture())  # fmt: skip
    spec = dataclasses.replace(spec, feature="")  # backbone weights: the backbone's own global feature
    model, _ = spec.build()
    load_backbone_weights(model, path, key, allow_missing)
    return model, spec


def load_feature_model(
    path: str | os.PathLike, backbone: BackboneSpec | Mapping[str, Any] | None = None, key: str = "teacher"
) -> nn.Module:
    """The model of `open_feature_model`; `backbone` (a BackboneSpec, or `build_backbone` keyword arguments)
    describes backbone weights that carry no spec of their own."""
    if isinstance(backbone, Mapping):
        backbone = BackboneSpec.from_kwargs(backbone) if backbone else None
    return open_feature_model(path, backbone, key)[0]


# ---------------------------------------------------------------------------------------------------------------------
# The exported recognition model (stage 2): weights + the plain description needed to rebuild it


def save_reid_model(model: ReIDModel, path: str | os.PathLike) -> Path:
    """Write `model.pth`: {"format_version", "kind": "reid_model", "spec": {...}, "state_dict": {...}}."""
    return save_checkpoint({"kind": "reid_model", "spec": dict(model.spec), "state_dict": model.state_dict()}, path)


def load_reid_model(path: str | os.PathLike) -> ReIDModel:
    """Rebuild a ReIDModel from `model.pth` (or from a stage-2 training checkpoint, which carries the same keys)."""
    state = load_checkpoint(path)
    if not _is_reid_model(state):
        what = "a backbone export" if state.get("kind") == "backbone" else f"found {', '.join(sorted(state)[:8])}"
        raise CheckpointError(f"{path}: not a recognition model (expected 'spec' and 'state_dict', {what})")
    try:
        model = build_reid_model(state["spec"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the described model: {e}") from None
    return model
