import ast
import os
import re
import shutil

import pytest
import torch
from conftest import ROOT, dino_cfg, recog_cfg

import train_dino
import train_recog
from dino_recog import checkpoint as ckpt
from dino_recog.models import DINOHead, MultiCropNet, build_backbone


def tiny_vit(img_size=(32, 16)):
    return build_backbone("vit_small", img_size=img_size, patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]


@pytest.fixture
def trained():
    torch.manual_seed(0)
    net = MultiCropNet(tiny_vit(), DINOHead(32, 10, hidden_dim=16, bottleneck_dim=8))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init, so loading is visible
    return net


def features(model, x):
    return model.eval()(x)


def test_export_and_official_dino_checkpoint_give_identical_features(tmp_path, trained):
    x = torch.randn(3, 3, 32, 16)
    ref = features(trained.backbone, x)
    # our export: the teacher backbone as a plain state dict
    ckpt.save_checkpoint(trained.backbone.state_dict(), tmp_path / "teacher_backbone.pth")
    # an official DINO checkpoint: teacher with backbone./head. keys, student with module. prefix
    import argparse

    official = {  # as main_dino.py saves its *_full_checkpoint.pth, with the run's argparse.Namespace
        "teacher": trained.state_dict(),
        "student": {"module." + k: v + 1 for k, v in trained.state_dict().items()},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
    }
    torch.save(official, tmp_path / "dino_official.pth")
    # our stage-1 checkpoint
    ckpt.save_checkpoint(
        {"teacher": trained.state_dict(), "student": trained.state_dict(), "epoch": 3}, tmp_path / "checkpoint_0003.pth"
    )
    for name in ("teacher_backbone.pth", "dino_official.pth", "checkpoint_0003.pth"):
        model = tiny_vit()
        report = ckpt.load_backbone_weights(model, tmp_path / name)
        assert report == {"missing": [], "unexpected": []}, name
        torch.testing.assert_close(features(model, x), ref)
    student = tiny_vit()
    ckpt.load_backbone_weights(student, tmp_path / "dino_official.pth", key="student")
    assert not torch.allclose(features(student, x), ref)


def test_position_embeddings_are_interpolated_to_another_input_size(tmp_path, trained):
    ckpt.save_checkpoint(trained.backbone.state_dict(), tmp_path / "b.pth")  # a 4x2 patch grid
    big = tiny_vit(img_size=(64, 32))  # an 8x4 grid
    ckpt.load_backbone_weights(big, tmp_path / "b.pth")
    assert big.pos_embed.shape == (1, 1 + 32, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], trained.backbone.pos_embed[:, 0])  # CLS position kept
    square = tiny_vit(img_size=(16, 16))
    square_state = square.state_dict()
    torch.save({"model": square_state}, tmp_path / "timm.pth")  # a timm-style wrapper, square grid
    ckpt.load_backbone_weights(tiny_vit(), tmp_path / "timm.pth")


def test_other_architecture_is_refused_with_the_mismatched_keys(tmp_path):
    other = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=48, num_heads=2)[0]
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"another architecture.*\n.*cls_token: file \(1, 1, 48\) vs model "
        r"\(1, 1, 32\)",
    ):
        ckpt.load_backbone_weights(tiny_vit(), tmp_path / "other.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ckpt.CheckpointError, match="no key matches the model"):
        ckpt.load_backbone_weights(tiny_vit(), tmp_path / "foreign.pth")


def test_unexpected_keys_are_reported(tmp_path, trained):
    state = trained.backbone.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    report = ckpt.load_backbone_weights(tiny_vit(), tmp_path / "extra.pth")
    assert report == {"missing": [], "unexpected": ["extra.weight"]}


def test_weights_with_missing_blocks_are_refused_listing_them(tmp_path, trained):
    """A 1-block teacher into a 2-block model: was a warning, then features from a network with a random block."""
    one_block = {k: v for k, v in trained.state_dict().items() if not k.startswith("backbone.blocks.1.")}
    del one_block["backbone.norm.weight"]
    path = ckpt.save_checkpoint({"teacher": one_block, "student": one_block}, tmp_path / "one_block.pth")
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_backbone_weights(model, path)
    n_block = sum(k.startswith("blocks.1.") for k in before)
    assert str(e.value) == (
        f"{path}: {n_block + 1} of the model's {len(before)} tensors are missing from the weights: "
        f"blocks.1.* ({n_block} tensors), norm.weight; expected weights of the same architecture (fewer blocks or "
        "another model in the file?); allow_missing=True (the tools' --allow-missing) keeps them random"
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before loading anything
    report = ckpt.load_backbone_weights(model, path, allow_missing=True)
    assert report["missing"] == [k for k in before if k.startswith("blocks.1.")] + ["norm.weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, trained.backbone.blocks[0].attn.qkv.weight)


def test_atomic_save_and_safe_load(tmp_path):
    path = ckpt.save_checkpoint({"w": torch.ones(2), "epoch": 1}, tmp_path / "c.pth")
    assert ckpt.load_checkpoint(path)["format_version"] == ckpt.FORMAT_VERSION
    assert os.listdir(tmp_path) == ["c.pth"]  # no temp file left behind

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match="evil.pth: not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "trunc.pth").write_bytes(path.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError, match="trunc.pth: not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(ckpt.CheckpointError, match="nope.pth: checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")


def test_latest_skips_a_corrupt_newest_checkpoint_and_pruning(tmp_path, caplog):
    for epoch in range(1, 6):
        ckpt.save_checkpoint({"epoch": epoch}, tmp_path / f"checkpoint_{epoch:04d}.pth")
    (tmp_path / "checkpoint_0005.pth").write_bytes(b"garbage")
    path, state = ckpt.latest_checkpoint(tmp_path, required=("epoch",))
    assert path.name == "checkpoint_0004.pth" and state["epoch"] == 4
    assert "checkpoint_0005.pth" in caplog.text
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_0002.pth",
        "checkpoint_0004.pth",
        "checkpoint_0005.pth",
    ]


def test_shards_are_named_beside_their_checkpoint_never_listed_and_pruned_with_it(tmp_path):
    shard = ckpt.shard_path(tmp_path / "checkpoint_0003_000010.pth", 1, 4)
    assert shard.name == "checkpoint_0003_000010.rank1-of-4.pth"
    for epoch in (1, 2, 3):
        for name in [f"checkpoint_{epoch:04d}.pth", *(f"checkpoint_{epoch:04d}.rank{r}-of-2.pth" for r in (0, 1))]:
            ckpt.save_checkpoint({"epoch": epoch}, tmp_path / name)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"checkpoint_000{e}.pth" for e in (3, 2, 1)]
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0003.pth", "checkpoint_0003.rank0-of-2.pth",
                                                          "checkpoint_0003.rank1-of-2.pth"]  # fmt: skip


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "r.pth")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def dinov2_teacher(registers=0):
    from dino_recog.models import MaskedMultiCropNet

    torch.manual_seed(0)
    vit = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2,
                         layerscale=1e-5, num_register_tokens=registers)[0]  # fmt: skip
    net = MaskedMultiCropNet(vit, DINOHead(32, 10, hidden_dim=16, bottleneck_dim=8), DINOHead(32, 10, hidden_dim=16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # gammas far from 1e-5 and different per channel
    return net


def test_dinov2_layerscale_is_folded_into_a_plain_vit_exactly(tmp_path):
    net = dinov2_teacher()
    x = torch.randn(3, 3, 32, 16)
    ckpt.save_checkpoint({"teacher": net.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    plain = tiny_vit()
    result = ckpt.load_backbone_weights(plain, tmp_path / "checkpoint.pth")
    assert result == {"missing": [], "unexpected": []}  # mask token and iBOT head are not backbone weights
    torch.testing.assert_close(features(plain, x), features(net.backbone, x), rtol=1e-5, atol=1e-5)
    # The other way: plain weights into a LayerScale model, whose gammas become 1.
    scaled = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2,
                            layerscale=1e-5)[0]  # fmt: skip
    ckpt.save_checkpoint(plain.state_dict(), tmp_path / "plain.pth")
    assert ckpt.load_backbone_weights(scaled, tmp_path / "plain.pth")["missing"] == []
    torch.testing.assert_close(features(scaled, x), features(plain, x), rtol=1e-5, atol=1e-5)


def test_register_tokens_must_match_and_come_with_the_stage1_config(tmp_path):
    from dino_recog import config as C
    from dino_recog.extract import load_model

    net = dinov2_teacher(registers=2)
    overrides = ["dino.version=v2", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
                 "model.layerscale=1e-5", "model.num_register_tokens=2", "crops.global_crops_size=[32,16]",
                 "crops.local_crops_size=[16,8]"]  # fmt: skip
    cfg = C.load(None, overrides, cls=C.DinoConfig)
    ckpt.save_checkpoint({"teacher": net.state_dict(), "config": C.to_dict(cfg)}, tmp_path / "checkpoint.pth")
    with pytest.raises(ckpt.CheckpointError, match="the weights have 2 register tokens, the model 0"):
        ckpt.load_backbone_weights(tiny_vit(), tmp_path / "checkpoint.pth")
    model, prep = load_model(tmp_path / "checkpoint.pth")  # built from the checkpoint's config, registers included
    x = torch.randn(2, 3, 32, 16)
    assert prep["img_size"] == (32, 16) and model.num_reg_tokens == 2
    torch.testing.assert_close(features(model, x), features(net.backbone, x))


# ---------------------------------------------------------------------------------------------------------------------
# The backbone export with its BackboneSpec, and the older formats


def spec_with_registers():
    from dino_recog.models import BackboneSpec

    return BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2, num_register_tokens=2, layerscale=1e-5,
                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))  # fmt: skip


def test_backbone_export_carries_its_spec_and_every_reader_takes_it(tmp_path):
    from dino_recog import weights

    spec = spec_with_registers()
    net = dinov2_teacher(registers=2)
    path = ckpt.save_backbone(net.backbone, spec, tmp_path / "teacher_backbone.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format_version", "kind", "spec", "state_dict"} and raw["kind"] == "backbone"
    assert raw["spec"] == spec.to_dict() and "mask_token" not in raw["state_dict"]
    assert ckpt.read_backbone_spec(path) == spec
    # load_backbone_weights reads the new format (the built model must agree; here it does)
    model = spec.build()[0]
    assert ckpt.load_backbone_weights(model, path) == {"missing": [], "unexpected": []}
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(features(model, x), features(net.backbone, x))
    # without any description passed: built from the file's spec, registers included
    opened, got = weights.open_feature_model(path)
    assert got == spec and opened.num_reg_tokens == 2
    torch.testing.assert_close(features(opened, x), features(net.backbone, x))
    assert ckpt.load_feature_model is weights.load_feature_model  # the old names still reach the moved functions
    with pytest.raises(ckpt.CheckpointError, match="not a recognition model .*a backbone export"):
        ckpt.load_reid_model(path)
    torch.save({**raw, "spec": {**raw["spec"], "heads": 2}}, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointError, match="bad.pth: spec: unknown field\\(s\\) heads"):
        weights.open_feature_model(tmp_path / "bad.pth")


def test_old_export_a_bare_state_dict_still_loads(tmp_path, trained):
    from dino_recog import weights
    from dino_recog.models import BackboneSpec

    torch.save(trained.backbone.state_dict(), tmp_path / "old.pth")  # the export as written before the spec
    assert ckpt.read_backbone_spec(tmp_path / "old.pth") is None
    assert ckpt.load_backbone_weights(tiny_vit(), tmp_path / "old.pth") == {"missing": [], "unexpected": []}
    described = BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2)
    model, spec = weights.open_feature_model(tmp_path / "old.pth", fallback=described)
    assert spec == described
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(features(model, x), features(trained.backbone, x))
    with pytest.raises(ckpt.CheckpointError, match="backbone weights without a description of the architecture"):
        weights.open_feature_model(tmp_path / "old.pth")


def test_old_model_pth_still_loads(tmp_path):
    """A model.pth as the code before BackboneSpec wrote it: its flat spec without registers / LayerScale."""
    from dino_recog.models import build_backbone
    from dino_recog.models.heads import BNNeckHead

    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    head = BNNeckHead(32, 5, pool="cls_mean")
    state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"head.{k}": v for k, v in head.state_dict().items()}}  # fmt: skip
    old_spec = {"arch": "vit_small", "img_size": [32, 16], "patch_size": 8, "drop_path_rate": 0.1, "depth": 2,
                "embed_dim": 32, "num_heads": 2, "last_stride": 1, "feature": "cls_mean", "embedding_dim": 0,
                "neck": "bnneck", "num_classes": 5, "classifier": True, "mean": [0.5, 0.5, 0.5],
                "std": [0.2, 0.2, 0.2]}  # fmt: skip
    ckpt.save_checkpoint({"kind": "reid_model", "spec": old_spec, "state_dict": state}, tmp_path / "model.pth")
    model = ckpt.load_reid_model(tmp_path / "model.pth").eval()
    assert {k: model.spec[k] for k in old_spec} == old_spec  # every old key readable, same values
    spec = model.backbone_spec
    assert (spec.num_register_tokens, spec.layerscale, spec.feature, spec.mean) == (0, 0.0, "cls_mean", (0.5,) * 3)
    assert ckpt.read_backbone_spec(tmp_path / "model.pth") == spec
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(model.backbone(x), backbone.eval()(x))


def test_stage2_takes_the_architecture_of_a_pretrained_file(tmp_path, caplog):
    from dino_recog.models import BackboneSpec

    export = ckpt.save_backbone(dinov2_teacher(registers=2).backbone, spec_with_registers(), tmp_path / "e.pth")
    configured = BackboneSpec("vit_small", (64, 32), 16, feature="cls_mean", last_stride=1)
    with caplog.at_level("WARNING"):
        spec = ckpt.pretrained_backbone_spec(configured, export)
    assert spec.architecture() == spec_with_registers().architecture()
    assert (spec.img_size, spec.feature, spec.mean) == ((64, 32), "cls_mean", configured.mean)
    assert "carries its own architecture, which replaces model.*: patch_size 16 -> 8, depth 12 -> 2" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="holds a vit_small backbone, but model.arch is resnet50"):
        ckpt.pretrained_backbone_spec(BackboneSpec("resnet50"), export)
    with pytest.raises(ckpt.CheckpointError, match="patch size 8; the input size \\[36, 16\\] is not a multiple"):
        ckpt.pretrained_backbone_spec(BackboneSpec("vit_small", (36, 16)), export)
    torch.save(tiny_vit().state_dict(), tmp_path / "bare.pth")  # no spec: the configuration describes it
    assert ckpt.pretrained_backbone_spec(configured, tmp_path / "bare.pth") == configured


# Hostile checkpoints through the training scripts (docs/reliability.md); dino_single is in conftest.py


def test_resume_with_another_architecture_lists_the_mismatched_keys(small_demo, dino_single, tmp_path):
    images = small_demo / "lup" / "images"
    out = tmp_path / "run"
    shutil.copytree(dino_single, out)
    with pytest.raises(ckpt.CheckpointError) as err:
        train_dino.main(dino_cfg(images, out, "model.embed_dim=48"))
    message = str(err.value)
    assert message.startswith(f"{out / 'checkpoint_0002.pth'}: the student weights do not fit the configured model")
    assert "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in message
    assert "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (144, 48)" in message


def test_foreign_checkpoints_are_refused_with_what_they_are(dino_single, small_demo, tmp_path):
    images = small_demo / "lup" / "images"
    stage1 = dino_single / "checkpoint_0002.pth"
    official = tmp_path / "dino_official.pth"  # teacher / student / optimizer / epoch, but not ours to resume
    state = ckpt.load_checkpoint(stage1)
    torch.save({k: state[k] for k in ("student", "teacher", "optimizer", "epoch")}, official)
    (tmp_path / "notes.pth").write_text('{"weights": "json, not torch"}')
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({**state, "format_version": 2}, tmp_path / "future.pth")
    (tmp_path / "truncated.pth").write_bytes(stage1.read_bytes()[:1000])
    cases = {
        official: "not a dino_recog training checkpoint (no format_version)",
        tmp_path / "notes.pth": "not a readable checkpoint",
        tmp_path / "list.pth": "expected a dict of tensors, got list",
        tmp_path / "future.pth": "format_version 2, but this dino_recog reads format 1 to 1",
        tmp_path / "truncated.pth": "not a readable checkpoint",
        tmp_path / "absent.pth": "checkpoint not found",
    }
    for path, message in cases.items():
        with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{path}: {message}")):
            train_dino.main(dino_cfg(images, tmp_path / "run", f"run.resume={path}"))
    # a stage-1 checkpoint handed to stage 2, and a stage-1 checkpoint loaded as a recognition model
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{stage1}: lacks state_dict; not a training checkpoint")):
        train_recog.main(recog_cfg(small_demo / "market", tmp_path / "r", f"run.resume={stage1}"))
    with pytest.raises(ckpt.CheckpointError, match=f"{stage1}: not a recognition model"):
        ckpt.load_reid_model(stage1)


def test_every_torch_load_in_the_code_is_weights_only():
    """A static guard: every torch.load passes weights_only=True, nothing calls pickle/np.load with pickles."""
    files = [*ROOT.glob("*.py"), *(ROOT / "dino_recog").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    loads = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                loads.append(where)
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{where}: torch.load without weights_only=True"
            assert not (owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler")), f"{where}: unpickles"
            if (owner, node.func.attr) == ("np", "load") and "allow_pickle" in kw:
                assert kw["allow_pickle"].value is False, f"{where}: np.load(allow_pickle=True)"
    assert len(loads) >= 2  # checkpoint.load_checkpoint and extract._peek at least: the guard sees them


def test_old_format_resnet_weights_without_batchnorm_step_counters_load(tmp_path):
    """torchvision's first ResNet files have no `num_batches_tracked`: a step counter, not a weight to refuse."""
    from dino_recog.models import build_backbone

    source = build_backbone("resnet18")[0]
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(source.state_dict())
    torch.save(state, tmp_path / "resnet18_old.pth")
    model = build_backbone("resnet18")[0]
    ckpt.load_backbone_weights(model, tmp_path / "resnet18_old.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_pruning_removes_what_a_killed_save_left_of_checkpoints_and_exports(tmp_path):
    """A run killed while writing teacher_backbone.pth (or model.pth, best.pth, a checkpoint) leaves its temporary
    file; the resumed run's next save removes it, and nothing else (a file of this process's own write stays)."""
    dead = 2**22 + 12345  # above Linux's default pid_max: no live process has it
    left = [f".teacher_backbone.pth.tmp-{dead}", f".model.pth.tmp-{dead}", f".best.pth.tmp-{dead}",
            f".checkpoint_0001_000002.pth.tmp-{dead}"]  # fmt: skip
    kept = [f".teacher_backbone.pth.tmp-{os.getpid()}", "notes.tmp-1", "config.yaml"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"x")
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
