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


def test_missing_keys_are_reported(tmp_path, trained, caplog):
    state = trained.backbone.state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    report = ckpt.load_backbone_weights(tiny_vit(), tmp_path / "partial.pth")
    assert report == {"missing": ["norm.weight"], "unexpected": ["extra.weight"]}


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
