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


@pytest.mark.slow  # torch.compile: seconds of tracing
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


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2: LayerScale, registers, the masked multi-crop network


def test_layerscale_and_registers():
    vit, _ = tiny_vit(layerscale=1e-5, num_register_tokens=3)
    assert torch.equal(vit.blocks[1].ls2.gamma, torch.full((32,), 1e-5))
    assert vit.num_prefix_tokens == 4 and vit.reg_token.shape == (1, 3, 32)
    assert vit.forward_features(torch.randn(2, 3, 32, 16)).shape == (2, 4 + 8, 32)
    assert vit(torch.randn(2, 3, 16, 8)).shape == (2, 32)  # local crops: position embeddings interpolated
    assert isinstance(tiny_vit()[0].blocks[0].ls1, torch.nn.Identity)  # off by default (DINO)
    with pytest.raises(ValueError, match="ViT options"):
        build_backbone("resnet18", layerscale=1e-5)


def masked_pair(registers=0, separate=False):
    from dino_recog.models import MaskedMultiCropNet

    torch.manual_seed(0)
    vit = tiny_vit(layerscale=0.1, num_register_tokens=registers)[0]
    ibot = DINOHead(32, 12, hidden_dim=16, bottleneck_dim=8) if separate else None
    return MaskedMultiCropNet(vit, DINOHead(32, 10, hidden_dim=16, bottleneck_dim=8), ibot).eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_masked_patches_show_only_the_mask_token_plus_their_position(registers):
    net = masked_pair(registers)
    with torch.no_grad():
        net.mask_token.normal_()
    x = torch.randn(2, 3, 32, 16)
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    with torch.no_grad():
        torch.testing.assert_close(net.forward_tokens(x), net.backbone.forward_features(x))  # no mask: plain ViT
        out = net.forward_tokens(x, masks)
        # New pixels under the masked patches (8x8 patches on a 4x2 grid) change nothing ...
        y = x.clone()
        for p in (1, 2, 5):
            y[0, :, (p // 2) * 8 : (p // 2 + 1) * 8, (p % 2) * 8 : (p % 2 + 1) * 8] = 5.0
        torch.testing.assert_close(net.forward_tokens(y, masks), out)
        # ... new pixels under an unmasked patch do.
        y[0, :, :8, :8] = 5.0
        assert not torch.allclose(net.forward_tokens(y, masks)[0], out[0])
        assert torch.equal(out[1], net.backbone.forward_features(x)[1])  # the unmasked image is untouched
        # With every patch masked the input is the same token everywhere; the position embedding is added after
        # the mask token, so the outputs still differ from patch to patch.
        everything = net.forward_tokens(x, torch.ones(2, 8, dtype=torch.bool))
        torch.testing.assert_close(everything[0], everything[1])
        patches = everything[0, 1 + registers :]
        assert (patches[1:] - patches[:1]).abs().amax() > 1e-3


@pytest.mark.parametrize("separate", [False, True])
def test_masked_net_outputs_match_the_plain_multicrop_net(separate):
    net = masked_pair(registers=1, separate=separate)
    plain = MultiCropNet(net.backbone, net.head).eval()
    crops = [torch.randn(3, 3, 32, 16) for _ in range(2)] + [torch.randn(3, 3, 16, 8) for _ in range(2)]
    masks = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        teacher = net(crops[:2], masks, mask_inputs=False)
        student = net(crops, masks)
        # CLS outputs crop-major, as MultiCropNet gives them; the teacher's patch outputs at the masked positions.
        torch.testing.assert_close(teacher["cls"], plain(crops[:2]))
        torch.testing.assert_close(net(crops, masks, mask_inputs=False)["cls"], plain(crops))
        tokens = net.backbone.forward_features(torch.cat(crops[:2]))  # (6, 1 + 1 + 8, 32)
        patch_head = net.ibot_head if separate else net.head
        torch.testing.assert_close(teacher["patch"], patch_head(tokens[:, 2:][masks]))
        torch.testing.assert_close(teacher["cls_features"], tokens[:, 0])
    assert student["cls"].shape == (12, 10) and student["cls_features"].shape == (6, 32)
    assert student["patch"].shape == (int(masks.sum()), 12 if separate else 10)
    assert not torch.allclose(student["cls"][:6], teacher["cls"])  # the masks reach the student's CLS tokens
    torch.testing.assert_close(student["cls"][6:], plain(crops)[6:])  # local crops are never masked
    with pytest.raises(ValueError, match=r"masks \(6, 4\): the crops have 6 x 8 patches"):
        net(crops, masks[:, :4])


def test_masked_net_with_gradient_checkpointing_gives_the_same_gradients():
    from dino_recog.models import configure_speed

    crops = [torch.randn(2, 3, 32, 16) for _ in range(2)]
    masks = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    grads = []
    for checkpointing in (False, True):
        net = masked_pair()
        configure_speed(net.backbone, grad_checkpointing=checkpointing)
        out = net.train()(crops, masks)
        (out["cls"].square().sum() + out["patch"].square().sum()).backward()
        grads.append(net.mask_token.grad.clone())
    assert grads[0].abs().sum() > 0  # the mask token learns
    torch.testing.assert_close(grads[1], grads[0])


# ---------------------------------------------------------------------------------------------------------------------
# BackboneSpec: the one description of a backbone


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="vit_tiny", img_size=(32, 16), patch_size=8, depth=2, embed_dim=48, num_register_tokens=4,
             layerscale=1e-5, feature="cls_mean", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)),  # fmt: skip
        dict(arch="resnet18", img_size=(64, 32), last_stride=1, feature="gem"),
    ],
)
def test_spec_round_trip_through_plain_values_rebuilds_the_same_network(kw, tmp_path):
    from dino_recog.models import BackboneSpec

    spec = BackboneSpec(**kw)
    plain = spec.to_dict()
    torch.save(plain, tmp_path / "spec.pth")
    loaded = torch.load(tmp_path / "spec.pth", weights_only=True)  # plain values only
    assert all(isinstance(v, str | int | float | list) for v in loaded.values())
    again = BackboneSpec.from_dict(loaded)
    assert again == spec
    (a, dim_a), (b, dim_b) = spec.build(), again.build()
    assert shapes(a) == shapes(b) and dim_a == dim_b
    if spec.is_vit:
        assert (spec.depth, spec.embed_dim, spec.num_heads) == (2, 48, 3)  # the arch's 3 heads, resolved
        assert a.reg_token.shape == (1, 4, 48) and "blocks.1.ls2.gamma" in a.state_dict()
    else:  # ViT fields are no ResNet's
        assert (spec.patch_size, spec.depth, spec.embed_dim, spec.num_heads) == (0, 0, 0, 0) and dim_a == 512
        assert a.forward_features(torch.randn(1, 3, 64, 32)).shape[-2:] == (4, 2)  # last stride 1


def test_spec_errors_name_the_field():
    from dino_recog.models import BackboneSpec

    plain = BackboneSpec("vit_small").to_dict()
    with pytest.raises(ValueError, match="export.pth: unknown field\\(s\\) heads; missing field\\(s\\) num_heads"):
        BackboneSpec.from_dict({**{k: v for k, v in plain.items() if k != "num_heads"}, "heads": 6}, "export.pth")
    with pytest.raises(ValueError, match="spec: BackboneSpec.arch: 'vit_huge' is not one of"):
        BackboneSpec.from_dict({**plain, "arch": "vit_huge"}, "spec")
    with pytest.raises(ValueError, match="feature: 'avg' is not one of cls, cls_mean"):
        BackboneSpec("vit_small", feature="avg")
    with pytest.raises(ValueError, match="ViT options"):
        BackboneSpec("resnet50", num_register_tokens=4)
    with pytest.raises(ValueError, match="embed_dim 32 is not divisible by num_heads 6"):
        BackboneSpec("vit_small", embed_dim=32)
    with pytest.raises(ValueError, match="backbone: unknown key\\(s\\) heads"):
        BackboneSpec.from_kwargs({"name": "vit_small", "heads": 2})
    assert BackboneSpec.from_kwargs({"name": "vit_small", "depth": None, "img_size": [32, 16]}) == BackboneSpec(
        "vit_small", img_size=(32, 16)
    )


def test_spec_from_both_configs_and_their_plain_dicts():
    from dino_recog import config as C
    from dino_recog.models import BackboneSpec

    dino = C.load(None, ["dino.version=v2", "model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48",
                         "model.patch_size=8", "model.num_register_tokens=4", "model.layerscale=1e-5",
                         "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]",
                         "crops.mean=[0.5,0.5,0.5]"], cls=C.DinoConfig)  # fmt: skip
    spec = BackboneSpec.from_dino_config(dino)
    assert spec == BackboneSpec("vit_tiny", (32, 16), 8, 2, 48, 3, 4, 1e-5, 2, "cls", (0.5,) * 3, C.IMAGENET_STD)
    assert BackboneSpec.from_dino_config(C.to_dict(dino)) == spec  # as a checkpoint stores the config
    recog = C.load(None, ["model.arch=resnet50", "model.feature=gem", "aug.size=[64,32]"], cls=C.RecogConfig)
    r = BackboneSpec.from_recog_config(recog)
    assert (r.arch, r.img_size, r.last_stride, r.feature) == ("resnet50", (64, 32), 1, "gem")
    assert BackboneSpec.from_recog_config(C.to_dict(recog)) == r
    # stage 2 takes the architecture of a stage-1 export and keeps its own input, feature and normalisation
    own = BackboneSpec.from_recog_config(C.load(None, ["model.feature=cls_mean", "aug.size=[64,32]"],
                                                cls=C.RecogConfig))  # fmt: skip
    merged = own.with_architecture_of(spec)
    assert merged.architecture() == spec.architecture()
    assert (merged.img_size, merged.feature, merged.mean, merged.last_stride) == ((64, 32), "cls_mean", own.mean, 1)
    with pytest.raises(ValueError, match="not of one family"):
        r.with_architecture_of(spec)


def test_reid_model_from_a_spec_and_from_its_flat_dict_are_the_same():
    from dino_recog.models import BackboneSpec, build_reid_model

    spec = BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2, num_register_tokens=2, feature="cls_mean")
    torch.manual_seed(0)
    a = build_reid_model(spec, 7, embedding_dim=16).eval()
    torch.manual_seed(0)
    b = build_reid_model(a.spec).eval()
    assert a.spec == b.spec and a.backbone_spec == spec and a.spec["num_classes"] == 7
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(a(x), b(x))
    # cls_mean averages the patch tokens only, not the register tokens after CLS
    tokens = a.backbone.forward_features(x)  # (B, 1 + 2 + 8, D)
    pooled = a.head.pool(tokens)
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=1))
    with pytest.raises(TypeError, match="num_classes is missing"):
        build_reid_model(spec)


@pytest.mark.parametrize("arch, feature", [("vit_small", "cls_mean"), ("resnet18", "gem")])
def test_test_feature_before_neck_is_the_pooled_backbone_feature_and_after_neck_the_bn_output(arch, feature):
    from dino_recog.models import BackboneSpec, build_reid_model
    from dino_recog.models.reid import set_test_feature

    spec = BackboneSpec(arch, (32, 16), 8, 2, 32, 2, feature=feature)
    torch.manual_seed(0)
    model = build_reid_model(spec, 7, test_feature="before_neck")
    x = torch.randn(6, 3, 32, 16)
    model.train()(x)  # BN running statistics away from their init: the two features differ
    model.eval()
    assert model.spec["test_feature"] == "before_neck"
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        if feature == "cls_mean":  # (B, 1 + N, D) -> CLS beside the mean patch token
            direct = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)
        else:  # (B, C, h, w) -> generalised mean, p learned (3 at init)
            p = model.head.gem.p
            direct = tokens.clamp(min=model.head.gem.eps).pow(p).mean((2, 3)).pow(1 / p)
        torch.testing.assert_close(model(x), direct)
        bn = model.head.neck
        model.set_test_feature("after_neck")
        assert model.spec["test_feature"] == "after_neck"
        after = (direct - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after, direct, atol=1e-2)
    with pytest.raises(ValueError, match="test_feature 'before': expected one of after_neck, before_neck"):
        build_reid_model({**model.spec, "test_feature": "before"})
    with pytest.raises(ValueError, match="holds backbone weights, without a BN neck"):
        set_test_feature(model.backbone, "before_neck", "w.pth")


def test_test_feature_is_saved_and_a_spec_without_it_reads_as_after_neck(tmp_path):
    from dino_recog.checkpoint import save_reid_model
    from dino_recog.models import BackboneSpec, build_reid_model
    from dino_recog.weights import load_reid_model

    spec = BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2, feature="cls")
    model = build_reid_model(spec, 3, test_feature="before_neck")
    loaded = load_reid_model(save_reid_model(model, tmp_path / "model.pth"))
    assert loaded.spec["test_feature"] == loaded.head.test_feature == "before_neck"
    old = {k: v for k, v in model.spec.items() if k != "test_feature"}  # a model.pth written before the key
    assert build_reid_model(old).head.test_feature == "after_neck"
    assert build_reid_model(old).spec["test_feature"] == "after_neck"
