"""Issue 13 end to end: a DINOv2 teacher with register tokens, exported by stage 1, is used by every tool (stage 2,
eval_reid, eval_knn, extract, attention maps) with no architecture flag: its BackboneSpec travels with the weights."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog.extract import FeatureExtractor
from dino_recog.extract import main as extract_main
from dino_recog.models import BackboneSpec
from dino_recog.visualize import main as visualize_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval_knn  # noqa: E402
import eval_reid  # noqa: E402
import train_dino  # noqa: E402
import train_recog  # noqa: E402

# Stage 1: a 2-block vit_tiny (its own 3 heads) of width 48, patch 8, 4 register tokens, LayerScale, DINOv2 losses.
STAGE1 = [
    "dino.version=v2", "model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48", "model.patch_size=8",
    "model.num_register_tokens=4", "model.layerscale=1e-5", "model.out_dim=64", "model.hidden_dim=32",
    "model.bottleneck_dim=16", "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]",
    "crops.local_crops_number=2", "crops.mean=[0.5,0.45,0.4]", "crops.std=[0.25,0.25,0.25]",
    "data.batch_size_per_gpu=16", "data.num_workers=0", "train.epochs=1", "train.warmup_epochs=0",
    "run.log_every=1", "run.amp=fp32", "eval.eval_every=0",
]  # fmt: skip
# What the later tools are told: data, speed and training length; not a word about the architecture.
RUN = ["data.num_workers=0", "run.device=cpu", "run.amp=fp32"]
STAGE2 = [
    "aug.size=[32,16]", "aug.padding=2", "data.num_identities=8", "data.num_instances=4", "data.test_batch_size=64",
    "train.optimizer=adamw", "train.lr=0.001", "train.epochs=1", "train.warmup_epochs=0", "eval.eval_every=1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is much faster than two spinning OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_stage1_export_with_registers_is_used_by_every_tool_without_architecture_flags(small_demo, tmp_path, caplog):
    market = small_demo / "market"
    test_set = f"{{name: market1501, root: {market}}}"
    dino_out = tmp_path / "dino"
    train_dino.main(C.load(ROOT / "cfg_dino.yaml", STAGE1 + [
        f"data.train={{name: image_folder, root: {small_demo / 'lup' / 'images'}}}", f"run.output_dir={dino_out}"],
        cls=C.DinoConfig))  # fmt: skip
    export = dino_out / "teacher_backbone.pth"
    spec = ckpt.read_backbone_spec(export)
    assert spec == BackboneSpec("vit_tiny", (32, 16), 8, 2, 48, 3, 4, 1e-5, 2, "cls", (0.5, 0.45, 0.4), (0.25,) * 3)
    stage1_ckpt = ckpt.load_checkpoint(dino_out / "checkpoint_0001.pth")
    assert ckpt.read_backbone_spec(stage1_ckpt) == spec  # a stage-1 training checkpoint gives it from its config

    # stage 2 from the export: the configured model.* (cfg_recog.yaml: vit_small, patch 16) gives way, logged
    recog_out = tmp_path / "recog"
    cfg = C.load(ROOT / "cfg_recog.yaml", STAGE2 + RUN + [
        f"data.train=[{test_set}]", f"data.test={test_set}", f"model.pretrained={export}",
        f"run.output_dir={recog_out}"], cls=C.RecogConfig)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dino_recog"):
        train_recog.main(cfg)
    assert "carries its own architecture, which replaces model.*: arch vit_small -> vit_tiny, patch_size 16 -> 8" \
        in caplog.text  # fmt: skip
    model = ckpt.load_reid_model(recog_out / "model.pth")
    assert model.backbone_spec.architecture() == spec.architecture() and model.backbone.num_reg_tokens == 4
    assert model.backbone_spec.img_size == (32, 16) and model.backbone_spec.mean == C.IMAGENET_MEAN  # stage 2's own
    assert ckpt.read_backbone_spec(recog_out / "checkpoint_0001.pth") == model.backbone_spec

    # eval_reid on the export and on the stage-2 model, cfg_recog.yaml's model.* untouched
    eval_cfg = C.load(ROOT / "cfg_recog.yaml", RUN + [f"data.test={test_set}"], cls=C.RecogConfig)
    reid = eval_reid.main(eval_cfg, str(export), json_path=str(tmp_path / "reid.json"))
    assert 0 < reid["rank1"] <= 1 and json.loads((tmp_path / "reid.json").read_text())["mAP"] == reid["mAP"]
    assert 0 < eval_reid.main(eval_cfg, str(recog_out / "model.pth"))["mAP"] <= 1

    # eval_knn with cfg_dino.yaml (vit_small, 256x128 crops by default)
    knn_cfg = C.load(ROOT / "cfg_dino.yaml", RUN + [f"data.eval_set={test_set}"], cls=C.DinoConfig)
    knn = eval_knn.main(knn_cfg, str(export), [1, 5], 0.07)
    assert 0 < knn["k5_top5"] <= 1

    # python -m dino_recog.extract and FeatureExtractor: the export's size and normalisation
    images = market / "query"
    out = tmp_path / "feats.npy"
    assert extract_main(["--checkpoint", str(export), "--images", str(images), "--out", str(out),
                         "--num-workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    extractor = FeatureExtractor(export, "cpu")
    assert (extractor.image_size, extractor.mean, extractor.std, extractor.dim) == ((32, 16), spec.mean, spec.std, 48)
    names = out.with_suffix(".txt").read_text().splitlines()
    expected = extractor([str(images / n) for n in names[:3]]).numpy()
    np.testing.assert_allclose(np.load(out)[:3], expected, rtol=0, atol=1e-5)

    # python -m dino_recog.visualize attention: 3 heads, the 4 registers skipped
    pictures = tmp_path / "attention"
    visualize_main(["attention", "--checkpoint", str(export), "--images", str(images / names[0]),
                    "--out", str(pictures), "--scale", "1"])  # fmt: skip
    assert (pictures / "attention.png").is_file()
