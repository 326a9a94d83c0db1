"""`model.arch: timm:<name>` (any timm model) and `resnet50_ibn_a`: each family runs a stage-1 and a stage-2 step,
sizes a model cannot take and unknown names are clear config errors."""

from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer

from dino_recog import config as C
from dino_recog.models import BackboneSpec, build_backbone
from dino_recog.models.ibn import IBN
from dino_recog.tasks import DinoStep, ReIDStep, build_dino_task, build_reid_task

ROOT = Path(__file__).resolve().parents[1]


@register_model
def dino_recog_test_swin(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """A two-stage, 16-wide Swin (timm has no test-sized one): windows of 4 over a patch-4 grid."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return SwinTransformer(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, **kwargs)


# timm's smallest model of each family (test_* are timm's own test-sized models)
FAMILIES = {"vit": "timm:test_vit", "swin": "timm:dino_recog_test_swin", "resnet": "timm:test_resnet",
            "convnext": "timm:test_convnext"}  # fmt: skip
GLOBAL, LOCAL = (64, 64), (32, 32)  # convnext (stride 32) needs 32 pixels a side at least
SIZES = [f"crops.global_crops_size={list(GLOBAL)}", f"crops.local_crops_size={list(LOCAL)}"]


def dino_cfg(arch: str, *extra: str) -> C.DinoConfig:
    return C.load(ROOT / "cfg_dino.yaml", [f"model.arch={arch}", "model.out_dim=32", "model.hidden_dim=16",
                                           "model.bottleneck_dim=8", "crops.local_crops_number=2", *SIZES, *extra],
                  cls=C.DinoConfig)  # fmt: skip


def recog_cfg(arch: str, *extra: str) -> C.RecogConfig:
    return C.load(ROOT / "cfg_recog.yaml", [f"model.arch={arch}", "model.pretrained=", "model.feature=avg",
                                            "aug.size=[64,32]", *extra], cls=C.RecogConfig)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_a_stage1_and_a_stage2_step(family):
    torch.manual_seed(0)
    arch = FAMILIES[family]
    feature = "model.feature=cls_mean" if family == "vit" else "model.feature=gem"
    # stage 1: two global and two local crops of another size through one network
    task = build_dino_task(dino_cfg(arch))
    crops = [torch.rand(2, 3, *GLOBAL) for _ in range(2)] + [torch.rand(2, 3, *LOCAL) for _ in range(2)]
    loss, _ = task(([(c - 0.5) / 0.25 for c in crops],), DinoStep(1e-3, 0.04, 0.996, 0.04, False))
    loss.backward()
    grads = [p.grad for p in task.student.backbone.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    task.after_step(DinoStep(1e-3, 0.04, 0.996, 0.04, False))
    # stage 2: the pooled feature of the family through the BN neck, a loss and its gradient
    reid = build_reid_task(recog_cfg(arch, feature), num_classes=3).train()
    x, labels = torch.randn(6, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, terms = reid((x, labels), ReIDStep(1e-3))
    loss.backward()
    assert torch.isfinite(loss) and "ce" in terms
    assert all(p.grad is not None for p in reid.model.backbone.parameters() if p.requires_grad)
    spec = reid.model.backbone_spec
    assert spec.is_vit == (family == "vit") and spec.feature == feature.split("=")[1]
    assert reid.model.eval()(x).shape == (6, reid.model.head.out_dim)


def test_a_timm_model_s_sizes_come_from_the_model():
    spec = BackboneSpec("timm:test_vit", img_size=(64, 32))
    model, dim = spec.build()
    assert (spec.patch_size, spec.depth, spec.embed_dim) == (model.patch_embed.patch_size[0], len(model.blocks), dim)
    assert set(model.state_dict()) == set(timm.create_model("test_vit", num_classes=0).state_dict())  # timm's names
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="BackboneSpec.depth: 3 for timm:test_vit, which has 6"):
        BackboneSpec("timm:test_vit", depth=3)
    swin, _ = build_backbone("timm:dino_recog_test_swin", img_size=(64, 32))
    assert swin.forward_features(torch.randn(1, 3, 64, 32)).shape == (1, 32, 8, 4)  # channels first, as ResNet's


def test_bad_names_and_sizes_are_config_errors():
    with pytest.raises(C.ConfigError, match=r"model.arch: 'timm:convnext_tiy' is not a timm model .*close names: "
                       r"timm:convnext_tiny"):  # fmt: skip
        dino_cfg("timm:convnext_tiy")
    with pytest.raises(C.ConfigError, match=r"crops.local_crops_size: \[16, 16\] does not go through "
                                            r"timm:test_convnext built for \[64, 64\]"):  # fmt: skip
        dino_cfg("timm:test_convnext", "crops.local_crops_size=[16,16]")
    with pytest.raises(C.ConfigError, match=r"model.depth: 2 with timm:test_vit; a timm model's sizes come from its"):
        recog_cfg("timm:test_vit", "model.depth=2", "model.feature=cls")
    with pytest.raises(C.ConfigError, match="model.feature: 'cls' is not one of 'avg', 'gem'"):
        recog_cfg("timm:test_resnet", "model.feature=cls")


def test_resnet50_ibn_a_has_instance_norm_on_half_the_channels_of_layers_1_to_3():
    model, dim = build_backbone("resnet50_ibn_a", last_stride=1)
    assert dim == 2048
    for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1):
        for block in layer:
            if i < 4:
                assert isinstance(block.bn1, IBN) and block.bn1.IN.num_features == block.conv1.out_channels // 2
                assert block.bn1.IN.affine and block.bn1.BN.num_features == block.conv1.out_channels // 2
            else:
                assert isinstance(block.bn1, torch.nn.BatchNorm2d)
            assert isinstance(block.bn2, torch.nn.BatchNorm2d) and isinstance(block.bn3, torch.nn.BatchNorm2d)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)  # the stem keeps BatchNorm (IBN-a)
    assert "layer1.0.bn1.IN.weight" in model.state_dict() and "layer3.5.bn1.BN.running_mean" in model.state_dict()
    x = torch.randn(2, 3, 64, 32, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 2048) and model.layer1[0].bn1.IN.weight.grad is not None
    # instance norm: each image's first-half channels are normalised on their own, whatever the batch holds
    ibn = model.layer1[0].bn1.eval()
    y = torch.randn(2, 64, 8, 4) * 5 + 3
    assert torch.allclose(ibn(y)[:, :32].mean((2, 3)), torch.zeros(2, 32), atol=1e-4)
