"""The DINO student/teacher pair: backbone + head, multi-crop forward, EMA update of the teacher; the DINOv2 variant
with a mask token and patch outputs."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import checkpoint_seq

__all__ = ["MaskedMultiCropNet", "MultiCropNet", "update_teacher"]


def backbone_by_size(backbone: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """The backbone's features of a crop-major list, consecutive crops of one size batched into one call (as the
    official `MultiCropWrapper`): [(n_same * B, D), ...] in crop order."""
    feats, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        feats.append(backbone(torch.cat(crops[start:end])))  # (n_same * B, D)
        start = end
    return feats


class MultiCropNet(nn.Module):
    """Backbone followed by a head, run on a list of crops of different sizes.

    Crops of the same size are batched into one backbone call (global crops together, local crops together), the
    features concatenated and passed through the head in one call, as the official `MultiCropWrapper` does.
    The output is crop-major: crop 0's batch, then crop 1's, ...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = backbone_by_size(self.backbone, crops)
        return self.head(torch.cat(feats))  # (n_crops * B, out_dim)


class MaskedMultiCropNet(MultiCropNet):
    """DINOv2's student or teacher (Oquab et al. 2023): a timm ViT, the DINO head, an optional separate iBOT head and
    a learnable mask token.

    The global crops go through the backbone once, giving CLS and patch tokens after the final norm; with
    `mask_inputs` (the student) the embeddings of the masked patches are replaced by the mask token before the
    position embeddings are added, as in iBOT and DINOv2. The local crops give their CLS token only. One head call
    maps the CLS tokens of all crops and the patch tokens at the masked positions (or two calls with a separate iBOT
    head). The teacher runs the same network without `mask_inputs` and picks its patch outputs at the same positions.

    The mask token lives here, not in the backbone, so the exported backbone stays a plain timm ViT.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: nn.Module | None = None) -> None:
        super().__init__(backbone, head)
        if not hasattr(backbone, "patch_embed"):
            raise ValueError("the masked multi-crop network needs a ViT backbone (patch tokens to mask)")
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))  # zeros, as DINOv2 starts it

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: (B, 3, H, W) -> (B, 1 + registers + N, D), patch tokens last.

        Args:
            masks: (B, N) bool; True replaces that patch embedding by the mask token. None: the plain ViT forward.
        """
        vit = self.backbone
        x = vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size defers the flattening to the position embedding
        if masks is not None:
            if masks.shape != (x.shape[0], x.shape[1] * x.shape[2]):
                raise ValueError(
                    f"masks {tuple(masks.shape)}: the crops have {x.shape[0]} x {x.shape[1] * x.shape[2]} patches"
                )
            x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))  # (B, P + N, D)
        x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing else vit.blocks(x)
        return vit.norm(x)

    def forward(
        self, crops: list[torch.Tensor], masks: torch.Tensor, mask_inputs: bool = True
    ) -> dict[str, torch.Tensor]:
        """Head outputs of all crops' CLS tokens and of the global crops' masked patch tokens.

        Args:
            crops: the global crops first (all of one size), then the local crops; each (B, 3, H, W).
            masks: (n_global * B, N) bool over the patches of the global crops, crop-major like the crops.
            mask_inputs: show the mask token at the masked patches (student) or the image (teacher).

        Returns:
            cls: (n_crops * B, K) head outputs of the CLS tokens, crop-major (global crops first), as MultiCropNet's.
            cls_features: (n_global * B, D) backbone CLS features of the global crops (KoLeo's input).
            patch: (M, K') head outputs of the patch tokens at the M = masks.sum() masked positions, image by image.
        """
        batch = crops[0].shape[0]
        if masks.ndim != 2 or masks.shape[0] % batch:
            raise ValueError(f"masks {tuple(masks.shape)}: expected (n_global * {batch}, N)")
        n_global = masks.shape[0] // batch
        tokens = self.forward_tokens(torch.cat(crops[:n_global]), masks if mask_inputs else None)
        patch_tokens = tokens[:, self.backbone.num_prefix_tokens :]  # (n_global * B, N, D)
        feats = [tokens[:, 0], *backbone_by_size(self.backbone, crops[n_global:])]
        cls, masked = torch.cat(feats), patch_tokens[masks]  # (n_crops * B, D), (M, D)
        if self.ibot_head is None:  # one head call for both, as DINOv2 does with a shared head
            out = self.head(torch.cat([cls, masked]))
            # copies, not views of `out`: FSDP2 hooks its backward on what a sharded network returns, and an in-place
            # op on a returned view would drop that hook (torch warns at every forward)
            cls_out, patch_out = (t.clone() for t in out.split([cls.shape[0], masked.shape[0]]))
        else:
            cls_out, patch_out = self.head(cls), self.ibot_head(masked)
        return {"cls": cls_out, "cls_features": tokens[:, 0].clone(), "patch": patch_out}  # a copy, as above


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an FSDP-sharded parameter (a DTensor; in place updates reach the parameter), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Buffers (BatchNorm statistics) are not averaged; the teacher keeps its own, as in the official code.
    Sharded by FSDP (`parallel.wrap_fsdp`, both the same way), each rank updates its own slice of the teacher
    from the same slice of the student: no communication.
    """
    for net in (student, teacher):
        if hasattr(net, "reshard"):  # FSDP keeps a root's weights gathered after forward: back to this rank's slice
            net.reshard()
    s_params = [_local(p.detach()) for p in student.parameters()]
    t_params = [_local(p) for p in teacher.parameters()]
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters, teacher {len(t_params)}; not the same architecture")
    for (name, s), t in zip(student.named_parameters(), t_params):
        if getattr(s, "placements", None) is not None and _local(s).shape != t.shape:
            raise ValueError(f"student and teacher are not sharded alike ({name}: this rank holds "
                             f"{tuple(_local(s).shape)} of the student, {tuple(t.shape)} of the teacher)")
    # one fused multi-tensor kernel, t + (1 - m) (s - t): reads t and s once and writes t once (a foreach mul then a
    # foreach add read and write the teacher twice)
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
