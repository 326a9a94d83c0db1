import pytest
import torch

from dino_recog.models import DINOHead, MultiCropNet, build_backbone, update_teacher


def tiny_vit(**kw):
    return build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2, **kw)


def test_vit_takes_rectangular_global_and_local_crops():
    model, dim = tiny_vit()
    assert dim == 32
    assert model(torch.randn(2, 3, 32, 16)).shape == (2, 32)
    assert model(torch.randn(3, 3, 16, 8)).shape == (3, 32)  # position embeddings interpolated
    assert model.forward_features(torch.randn(2, 3, 32, 16)).shape == (2, 1 + 4 * 2, 32)


def test_standard_sizes_and_resnet():
    vit, dim = build_backbone("vit_small", img_size=(256, 128))
    assert dim == 384 and sum(p.numel() for p in vit.parameters()) == pytest.approx(21.7e6, rel=0.02)
    assert vit.pos_embed.shape == (1, 1 + 16 * 8, 384)
    resnet, dim = build_backbone("resnet18", last_stride=1)
    x = torch.randn(2, 3, 64, 32)
    assert dim == 512 and resnet(x).shape == (2, 512)
    assert resnet.forward_features(x).shape[-2:] == (4, 2)  # stride 16 with last stride 1
    assert build_backbone("resnet18")[0].forward_features(x).shape[-2:] == (2, 1)
    assert "fc.weight" not in resnet.state_dict()
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'"):
        build_backbone("vit_huge")


def test_drop_path_only_where_asked():
    student, _ = tiny_vit(drop_path_rate=0.1)
    teacher, _ = tiny_vit()
    assert student.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert not hasattr(teacher.blocks[-1].drop_path1, "drop_prob")


def test_dino_head_shapes_and_frozen_magnitude():
    head = DINOHead(32, out_dim=50, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(4, 32)).shape == (4, 50)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert DINOHead(32, 50, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    bn = DINOHead(32, 50, use_bn=True, hidden_dim=64, bottleneck_dim=16)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2


def test_multicrop_forward_is_crop_major_and_matches_separate_calls():
    torch.manual_seed(0)
    net = MultiCropNet(tiny_vit()[0], DINOHead(32, 10, hidden_dim=16, bottleneck_dim=8)).eval()
    crops = [torch.randn(2, 3, 32, 16), torch.randn(2, 3, 32, 16), torch.randn(2, 3, 16, 8)]
    out = net(crops)
    assert out.shape == (6, 10)
    for i, c in enumerate(crops):
        torch.testing.assert_close(out[2 * i : 2 * i + 2], net(c), rtol=1e-4, atol=1e-5)


def test_update_teacher_is_ema():
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.9 * t.weight.detach() + 0.1 * s.weight.detach()
    update_teacher(s, t, 0.9)
    torch.testing.assert_close(t.weight.detach(), expected)
    with pytest.raises(ValueError, match="not the same architecture"):
        update_teacher(s, torch.nn.Sequential(t, torch.nn.Linear(2, 2)), 0.9)


def test_bnneck_train_returns_both_features_and_eval_the_normalised_one():
    from dino_recog.models import BNNeckHead, ReIDModel

    torch.manual_seed(0)
    model = ReIDModel(tiny_vit()[0], BNNeckHead(32, num_classes=7, pool="cls_mean"))
    x = torch.randn(6, 3, 32, 16)
    out = model.train()(x)
    assert out["feat"].shape == (6, 64) and out["neck"].shape == (6, 64) and out["logits"].shape == (6, 7)
    bn = model.head.neck
    manual = (out["feat"] - out["feat"].mean(0)) / torch.sqrt(out["feat"].var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out["neck"], manual * bn.weight + bn.bias, rtol=1e-4, atol=1e-4)
    assert not bn.bias.requires_grad and model.head.classifier.bias is None
    emb = model.eval()(x)
    assert emb.shape == (6, 64)
    feat = model.backbone.forward_features(x)
    pooled = torch.cat([feat[:, 0], feat[:, 1:].mean(1)], 1)
    torch.testing.assert_close(emb, (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight)


def test_resnet_gem_head():
    from dino_recog.models import BNNeckHead, ReIDModel

    backbone, dim = build_backbone("resnet18", last_stride=1)
    model = ReIDModel(backbone, BNNeckHead(dim, 5, pool="gem", embedding_dim=16)).eval()
    assert model(torch.randn(2, 3, 64, 32)).shape == (2, 16)


def _speed_losses(**options) -> list[float]:
    """Three SGD steps of a tiny DINO student on fixed crops with `configure_speed(**options)`; the losses."""
    from dino_recog.losses import DINOLoss
    from dino_recog.models import configure_speed

    torch.manual_seed(0)
    net = MultiCropNet(tiny_vit()[0], DINOHead(32, 16, hidden_dim=16, bottleneck_dim=8))
    teacher = MultiCropNet(tiny_vit()[0], DINOHead(32, 16, hidden_dim=16, bottleneck_dim=8))
    teacher.load_state_dict(net.state_dict())
    configure_speed(net.backbone, **options)
    configure_speed(teacher.backbone, **{k: v for k, v in options.items() if k != "grad_checkpointing"})
    loss_fn, opt = DINOLoss(16), torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 16, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 8, generator=g)]
    losses = []
    for _ in range(3):
        with torch.no_grad():
            t = teacher(crops[:2])
        loss = loss_fn(net(crops), t, 0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_teacher(net, teacher, 0.9)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "options",
    [{"fused_attn": False}, {"grad_checkpointing": True}],
    ids=["explicit-attention", "grad-checkpointing"],
)
def test_speed_options_give_the_plain_losses(options):
    plain = _speed_losses()
    assert plain[0] != plain[-1]  # the steps change something, so equal curves mean equal updates
    torch.testing.assert_close(_speed_losses(**options), plain, rtol=1e-5, atol=1e-6)


def test_speed_options_switch_what_they_name():
    from dino_recog.models import configure_speed

    vit = configure_speed(tiny_vit()[0], fused_attn=False, grad_checkpointing=True)
    assert all(not b.attn.fused_attn for b in vit.blocks) and vit.grad_checkpointing
    torch.manual_seed(0)
    plain = build_backbone("resnet18")[0]
    resnet = build_backbone("resnet18")[0]
    resnet.load_state_dict(plain.state_dict())
    configure_speed(resnet, channels_last=True)
    assert resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 32)
    out = resnet(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-3)
    plain(x).square().sum().backward()
    out.square().sum().backward()
    g, ref = resnet.conv1.weight.grad, plain.conv1.weight.grad
    assert (g - ref).norm() / ref.norm() < 1e-3  # summation order differs between the layouts


def test_compiled_backbone_keeps_names_and_outputs():
    from dino_recog.models import configure_speed

    torch.manual_seed(0)
    plain = tiny_vit()[0].eval()
    compiled = tiny_vit()[0].eval()
    compiled.load_state_dict(plain.state_dict())
    configure_speed(compiled, compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-5)


def test_foreach_ema_equals_a_parameter_loop():
    torch.manual_seed(0)
    s, t = MultiCropNet(tiny_vit()[0], DINOHead(32, 8)), MultiCropNet(tiny_vit()[0], DINOHead(32, 8))
    expected = [0.996 * pt.detach() + (1 - 0.996) * ps.detach() for ps, pt in zip(s.parameters(), t.parameters())]
    update_teacher(s, t, 0.996)
    for e, p in zip(expected, t.parameters()):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
