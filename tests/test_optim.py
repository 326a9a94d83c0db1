import pytest
import torch

from dino_recog.models import BNNeckHead, ReIDModel, build_backbone
from dino_recog.optim import build_optimizer, param_groups, reid_param_groups, set_schedule, vit_layer_id


def model():
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    return ReIDModel(backbone, BNNeckHead(32, 5))


def scale_of(groups, param):
    (g,) = [g for g in groups if any(p is param for p in g["params"])]
    return g["lr_scale"], g["apply_wd"]


def test_dino_groups_no_decay_on_bias_and_1d():
    m = model()
    decay, no_decay = param_groups(m)
    assert any(p is m.backbone.cls_token for p in decay["params"])  # 3-D: decayed, as in DINO
    assert any(p is m.backbone.blocks[0].norm1.weight for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_reid_groups_scales():
    m = model()
    groups = reid_param_groups(m, bias_lr_factor=2.0, head_lr_factor=10.0, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())
    # L = 2 blocks: patch_embed depth 0 -> 0.5^3, block 1 -> 0.5^1, final norm -> 0.5^0
    assert scale_of(groups, m.backbone.patch_embed.proj.weight) == (0.125, True)
    assert scale_of(groups, m.backbone.blocks[1].attn.qkv.weight) == (0.5, True)
    assert scale_of(groups, m.backbone.blocks[1].attn.qkv.bias) == (1.0, False)  # 0.5 x bias factor 2
    assert scale_of(groups, m.backbone.norm.weight) == (1.0, False)
    assert scale_of(groups, m.head.classifier.weight) == (10.0, True)
    assert vit_layer_id("blocks.0.mlp.fc1.weight", 2) == 1 and vit_layer_id("head.x", 2) == 3


def test_set_schedule_applies_scale_and_weight_decay():
    m = model()
    opt = build_optimizer("sgd", reid_param_groups(m, bias_lr_factor=2.0), lr=0.1, weight_decay=1e-4)
    set_schedule(opt, 0.01, weight_decay=5e-4)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.01 * g["lr_scale"])
        assert g["weight_decay"] == (5e-4 if g["apply_wd"] else 0.0)
    with pytest.raises(ValueError, match="optimizer 'lamb'"):
        build_optimizer("lamb", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 0.1, 0.0)


def test_dino_groups_with_layer_decay_and_patch_embed_lr():
    from dino_recog.models import DINOHead, MaskedMultiCropNet

    net = MaskedMultiCropNet(model().backbone, DINOHead(32, 8, hidden_dim=16, bottleneck_dim=8))
    assert len(param_groups(net)) == 2  # DINO: no lr scales
    groups = param_groups(net, layer_decay=0.5, patch_embed_lr_mult=0.2)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in net.parameters())
    # L = 2 blocks, as DINOv2's get_params_groups_with_decay: depth 0 -> 0.5^3, block i -> 0.5^(2 - i), rest 1
    assert scale_of(groups, net.backbone.patch_embed.proj.weight) == (pytest.approx(0.125 * 0.2), True)
    assert scale_of(groups, net.backbone.patch_embed.proj.bias) == (pytest.approx(0.125 * 0.2), False)
    assert scale_of(groups, net.backbone.cls_token) == (0.125, True)
    assert scale_of(groups, net.mask_token) == (0.125, True)
    assert scale_of(groups, net.backbone.blocks[0].attn.qkv.weight) == (0.25, True)
    assert scale_of(groups, net.backbone.blocks[1].norm1.weight) == (0.5, False)
    assert scale_of(groups, net.backbone.norm.weight) == (1.0, False)
    assert scale_of(groups, net.head.mlp[0].weight) == (1.0, True)
