"""Continued pre-training: stage 1 starts from an official DINO checkpoint, a DINO backbone-only release and a
DINOv2-format file (patch 14, LayerScale, registers, mask token, chunked blocks); before any step the student's and
the teacher's features are the loaded network's."""

import logging
from pathlib import Path

import pytest
import torch

from dino_recog import config as C
from dino_recog.checkpoint import CheckpointError
from dino_recog.models import build_backbone
from dino_recog.tasks import build_dino_task
from dino_recog.weights import load_backbone_weights

ROOT = Path(__file__).resolve().parents[1]
HEAD = ["model.out_dim=32", "model.hidden_dim=16", "model.bottleneck_dim=8"]


def stage1(path: Path, *extra: str) -> C.DinoConfig:
    return C.load(ROOT / "cfg_dino.yaml", ["model.arch=vit_small", "model.depth=2", "model.embed_dim=32",
                                           "model.num_heads=2", *HEAD, "crops.global_crops_size=[28,28]",
                                           "crops.local_crops_size=[14,14]", f"model.pretrained={path}", *extra],
                  cls=C.DinoConfig)  # fmt: skip


def same_features(task, reference, size=(28, 28)) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference.eval()(x)
        for net in (task.student, task.teacher):
            assert torch.allclose(net.backbone.eval()(x), expected, atol=1e-5)


def test_official_dino_checkpoint_and_backbone_release_start_stage1(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dino_recog.tasks.dino")
    torch.manual_seed(0)
    reference, _ = build_backbone("vit_small", img_size=(28, 28), patch_size=14, depth=2, embed_dim=32, num_heads=2)
    source = build_dino_task(stage1("", "model.patch_size=14"))  # a head of the same shapes, with other weights
    head = {k: torch.randn_like(v) for k, v in source.teacher.head.state_dict().items()}
    official_head = {k.replace("parametrizations.weight.original0", "weight_g")
                      .replace("parametrizations.weight.original1", "weight_v"): v for k, v in head.items()}
    backbone = reference.state_dict()
    # facebookresearch/dino main_dino.py: the student under DDP (`module.`), the teacher bare
    torch.save({"student": {**{f"module.backbone.{k}": v for k, v in backbone.items()},
                            **{f"module.head.{k}": v for k, v in official_head.items()}},
                "teacher": {**{f"backbone.{k}": v for k, v in backbone.items()},
                            **{f"head.{k}": v for k, v in official_head.items()}},
                "epoch": 100, "args": None}, tmp_path / "checkpoint.pth")  # fmt: skip
    task = build_dino_task(stage1(tmp_path / "checkpoint.pth", "model.patch_size=14"))
    same_features(task, reference)
    assert all(torch.equal(task.student.head.state_dict()[k], v) for k, v in head.items())
    assert f"model.pretrained: head loaded from {tmp_path / 'checkpoint.pth'}" in caplog.text
    # the released backbone-only file (dino_deitsmall16_pretrain.pth): timm names, no head: the head starts fresh
    torch.save(backbone, tmp_path / "dino_pretrain.pth")
    task = build_dino_task(stage1(tmp_path / "dino_pretrain.pth", "model.patch_size=14"))
    same_features(task, reference)
    assert not torch.equal(task.student.head.state_dict()["mlp.0.weight"], head["mlp.0.weight"])
    assert "model.pretrained: head starts fresh (not in the file)" in caplog.text
    with pytest.raises(CheckpointError, match="2 of the model's .* tensors are missing|missing from the weights"):
        build_dino_task(stage1(tmp_path / "dino_pretrain.pth", "model.patch_size=14", "model.depth=3"))
    with pytest.raises(FileNotFoundError, match="model.pretrained: .*nothing.pth not found"):
        build_dino_task(stage1(tmp_path / "nothing.pth", "model.patch_size=14"))


def dinov2_layout(state: dict, registers: int, chunks: bool) -> dict:
    """A timm ViT's state dict in facebookresearch/dinov2's names: registers apart and without position
    embeddings (`register_tokens`), `pos_embed` over CLS + patches, blocks in BlockChunks when `chunks`."""
    out = {}
    for k, v in state.items():
        if k == "reg_token":
            out["register_tokens"] = v
        elif k == "pos_embed":
            out[k] = torch.cat([v[:, :1], v[:, 1 + registers :]], dim=1)
        elif k.startswith("blocks.") and chunks:
            i = int(k.split(".")[1])
            out[f"blocks.{i // 2}.{k.removeprefix('blocks.')}"] = v  # two blocks a chunk: blocks.<c>.<i>.*
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("chunks", [False, True])
def test_dinov2_format_starts_stage1_with_its_registers_layerscale_and_mask_token(tmp_path, chunks):
    torch.manual_seed(0)
    kw = dict(img_size=(28, 28), patch_size=14, depth=2, embed_dim=32, num_heads=2, layerscale=1e-5,
              num_register_tokens=2)  # fmt: skip
    reference, _ = build_backbone("vit_small", **kw)
    with torch.no_grad():  # nothing at its initial value: a slot loaded in the wrong place shows
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        reference.pos_embed[:, 1:3] = 0  # DINOv2's registers have no position embedding
    state = dinov2_layout(reference.state_dict(), 2, chunks)
    assert state["pos_embed"].shape == (1, 1 + 4, 32) and "register_tokens" in state
    assert ("blocks.0.1.ls1.gamma" if chunks else "blocks.1.ls1.gamma") in state
    mask_token = torch.randn(1, 32)
    torch.save({**state, "mask_token": mask_token}, tmp_path / "dinov2.pth")  # as the hub files
    cfg = stage1(tmp_path / "dinov2.pth", "model.patch_size=14", "model.layerscale=1e-5",
                 "model.num_register_tokens=2", "dino.version=v2")  # fmt: skip
    task = build_dino_task(cfg)
    same_features(task, reference)
    assert torch.equal(task.student.mask_token, mask_token) and torch.equal(task.teacher.mask_token, mask_token)


def test_dinov2_registers_into_timm_s_own_dinov2_model(tmp_path):
    """timm's DINOv2 ViTs with registers keep no position slot for CLS (`no_embed_class`): DINOv2's CLS position is
    added to the CLS token, exactly."""
    torch.manual_seed(0)
    reference, dim = build_backbone("timm:vit_small_patch14_reg4_dinov2", img_size=(28, 28))
    assert reference.no_embed_class and reference.num_prefix_tokens == 5
    state = {k: v + torch.randn_like(v) * 0.05 for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    cls_pos = torch.randn(1, 1, dim) * 0.1
    dinov2 = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    dinov2.update(register_tokens=state["reg_token"], cls_token=state["cls_token"] - cls_pos,
                  pos_embed=torch.cat([cls_pos, state["pos_embed"]], dim=1), mask_token=torch.zeros(1, dim))
    torch.save(dinov2, tmp_path / "dinov2_reg.pth")
    model, _ = build_backbone("timm:vit_small_patch14_reg4_dinov2", img_size=(28, 28))
    load_backbone_weights(model, tmp_path / "dinov2_reg.pth")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-4)


def test_our_stage1_checkpoint_continues_with_its_heads_and_must_match_model_keys(tmp_path):
    torch.manual_seed(0)
    cfg = stage1("", "model.patch_size=14")
    source = build_dino_task(cfg)
    with torch.no_grad():
        for p in source.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save({"student": source.student.state_dict(), "teacher": source.teacher.state_dict(),
                "config": C.to_dict(cfg)}, tmp_path / "checkpoint.pth")  # fmt: skip
    task = build_dino_task(stage1(tmp_path / "checkpoint.pth", "model.patch_size=14"))
    same_features(task, source.teacher.backbone)
    assert all(torch.equal(task.student.head.state_dict()[k], v) for k, v in source.teacher.head.state_dict().items())
    with pytest.raises(CheckpointError, match=r"checkpoint.pth holds another backbone; set model.depth=2 \(now 3\)"):
        build_dino_task(stage1(tmp_path / "checkpoint.pth", "model.patch_size=14", "model.depth=3"))
