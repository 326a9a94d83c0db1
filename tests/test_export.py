"""ONNX export: the graph's input contract (uint8 / float pixels, normalisation and L2 in the graph, or raw), stage-2
models and stage-1 teachers, and `--verify` on the small demo set."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import dino_cfg, recog_cfg

from dino_recog import config as C
from dino_recog import export
from dino_recog.checkpoint import save_backbone, save_checkpoint, save_reid_model
from dino_recog.data.build import query_gallery
from dino_recog.evaluation import evaluate_query_gallery
from dino_recog.export import main
from dino_recog.extract import FeatureExtractor
from dino_recog.models import build_reid_model
from dino_recog.models.spec import BackboneSpec

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements.txt)")

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's: a graph that ignored the spec would show
VIT = {"arch": "vit_small", "img_size": [32, 16], "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def stage2(path, arch="vit_small", feature="cls_mean"):
    spec = {**VIT, "arch": arch, "num_classes": 5, "feature": feature, "embedding_dim": 24, "mean": MEAN, "std": STD}
    model = build_reid_model(spec)
    model.train()(torch.randn(8, 3, 32, 16))  # move the BN running statistics away from their init
    save_reid_model(model, path)
    return model.eval()


def teacher_export(path):
    spec = BackboneSpec(**VIT, mean=MEAN, std=STD)
    backbone = spec.build()[0].eval()
    save_backbone(backbone, spec, path)
    return backbone


def stage1_checkpoint(path):
    """A stage-1 training checkpoint as TrainingRun writes it: the teacher network and the run's config."""
    backbone = BackboneSpec(**VIT).build()[0].eval()
    config = {"model": {k: v for k, v in VIT.items() if k != "img_size"},
              "crops": {"global_crops_size": [32, 16], "mean": MEAN, "std": STD}}  # fmt: skip
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    save_checkpoint({"teacher": teacher, "student": {}, "config": config}, path)
    return backbone


@pytest.mark.parametrize("kind, flags", [
    ("stage2", []), ("stage2_resnet", []), ("stage2", ["--input", "float"]), ("teacher", []), ("stage1", []),
])  # fmt: skip
def test_the_graph_takes_pixels_and_gives_the_feature_extractors_features(tmp_path, kind, flags):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    make = {"stage2": stage2, "stage2_resnet": lambda p: stage2(p, "resnet18", "gem"), "teacher": teacher_export,
            "stage1": stage1_checkpoint}[kind]  # fmt: skip
    make(ckpt)
    onnx_path = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model.onnx"), *flags])
    session = ort.InferenceSession(str(onnx_path))
    meta = session.get_modelmeta().custom_metadata_map
    as_float = flags == ["--input", "float"]
    assert (meta["input_dtype"], meta["input_range"]) == (("float32", "0-1") if as_float else ("uint8", "0-255"))
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    assert json.loads(meta["img_size"]) == [32, 16] and meta["output_l2_normalised"] == "true"
    extractor = FeatureExtractor(ckpt, "cpu")  # the features evaluation and extract give for these images
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        pixels = rng.integers(0, 256, (batch, 32, 16, 3), dtype=np.uint8)  # (B, H, W, 3): already at the model's size
        images = pixels.transpose(0, 3, 1, 2).copy()  # (B, 3, H, W)
        out = session.run(None, {"images": images.astype(np.float32) / 255 if as_float else images})[0]
        expected = extractor(pixels).numpy()
        assert out.shape == expected.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_raw_keeps_the_old_contract_normalised_input_and_unnormalised_output(tmp_path):
    torch.manual_seed(0)
    model = stage2(tmp_path / "model.pth")
    onnx_path = main(["--checkpoint", str(tmp_path / "model.pth"), "--out", str(tmp_path / "model.onnx"), "--raw"])
    session = ort.InferenceSession(str(onnx_path))
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["normalisation_in_graph"], meta["output_l2_normalised"]) == ("false", "false")
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 16)
        out = session.run(None, {"images": x.numpy()})[0]
        assert out.shape == (batch, 24)
        np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(np.linalg.norm(out, axis=1) - 1).max() > 0.01  # not normalised


def test_weights_without_a_spec_and_conflicting_flags_are_refused(tmp_path, capsys):
    torch.save(BackboneSpec(**VIT).build()[0].state_dict(), tmp_path / "bare.pth")
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "m.onnx")])
    assert stop.value.code == 2 and not (tmp_path / "m.onnx").exists()
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/bare.pth: weights without a BackboneSpec (official DINO, timm, an older export); export "
        "takes what dino_recog writes: model.pth / best.pth, teacher_backbone.pth or a stage-1 checkpoint\n"
    )
    for extra, message in ((["--raw", "--input", "uint8"], "--raw takes normalised float input"),
                           (["data.test.root=x"], "add --verify")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "m.onnx"), *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def verify_run(small_demo, run, stage):
    """A stage-2 model or a stage-1 teacher export in `run`, beside the config.yaml of a run whose test set is the
    small demo's query/gallery; returns the checkpoint and the model."""
    run.mkdir()
    market = small_demo / "market"
    if stage == 2:
        C.save(recog_cfg(market, run), run / "config.yaml")
        return run / "model.pth", stage2(run / "model.pth")
    C.save(dino_cfg(small_demo, run, f"data.eval_set={{name: market1501, root: {market}}}"), run / "config.yaml")
    return run / "teacher_backbone.pth", teacher_export(run / "teacher_backbone.pth")


def printed(out):
    """{"PyTorch": (rank-1, mAP), "ONNX": (rank-1, mAP)} from --verify's table."""
    return {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"^ *(PyTorch|ONNX) +([\d.]+) +([\d.]+)$", out, re.M)}


@pytest.mark.parametrize("stage, flags", [(2, []), (1, []), (2, ["--raw"])])
def test_verify_reruns_the_runs_evaluation_through_onnxruntime(small_demo, tmp_path, capsys, stage, flags):
    torch.manual_seed(0)
    ckpt, model = verify_run(small_demo, tmp_path / "run", stage)
    onnx_path = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model.onnx"), "--verify", *flags])
    out = capsys.readouterr().out
    _, query, gallery = query_gallery(C.DatasetSpec("market1501", str(small_demo / "market")), (32, 16), MEAN, STD)
    expected = evaluate_query_gallery(model, query, gallery, torch.device("cpu"))  # what eval_reid.py computes
    rounded = (round(100 * expected["rank1"], 2), round(100 * expected["mAP"], 2))
    assert printed(out) == {"PyTorch": rounded, "ONNX": rounded}, out
    assert f"verified: {onnx_path}" in out


def test_verify_fails_in_one_line_when_onnxruntime_disagrees(small_demo, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    ckpt, _ = verify_run(small_demo, tmp_path / "run", 2)
    forward = export.OnnxEmbedding.forward
    # each image gets its neighbour's embedding: the graph of another model, as far as the ranking can tell
    monkeypatch.setattr(export.OnnxEmbedding, "forward", lambda self, x: forward(self, x).roll(1, 0))
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model.onnx"), "--verify"])
    captured = capsys.readouterr()
    assert stop.value.code == 1 and (tmp_path / "model.onnx").is_file()  # kept, for inspection
    error = captured.err.splitlines()[-1]  # after the progress bars of the feature extraction
    assert [line for line in captured.err.splitlines() if "error" in line] == [error]
    assert error.startswith(f"error: --verify: {tmp_path / 'model.onnx'} does not reproduce {ckpt}: rank-1 ")
    assert error.endswith("more than 0.1); the file is written but not verified")
    table = printed(captured.out)
    assert table["PyTorch"] != table["ONNX"]


def test_verify_without_a_test_set_fails_before_exporting(tmp_path, capsys):
    torch.manual_seed(0)
    stage2(tmp_path / "model.pth")
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "model.pth"), "--out", str(tmp_path / "model.onnx"), "--verify"])
    assert stop.value.code == 2 and not (tmp_path / "model.onnx").exists()
    assert capsys.readouterr().err == (
        f"error: --verify: no test set: no --config and no config.yaml beside {tmp_path}/model.pth; pass --config "
        "with data.test (stage 2) or data.eval_set (stage 1)\n"
    )
    C.save(C.load(None, [], cls=C.DinoConfig), tmp_path / "stage1.yaml")  # data.eval_set: null
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "model.pth"), "--out", str(tmp_path / "model.onnx"), "--verify",
              "--config", str(tmp_path / "stage1.yaml")])  # fmt: skip
    assert stop.value.code == 2 and not (tmp_path / "model.onnx").exists()
    assert "has no test set (data.eval_set is null)" in capsys.readouterr().err


def test_the_graph_gives_the_test_feature_saved_in_the_model(tmp_path):
    """A model trained to be tested before the BN neck exports that feature, as evaluation and extract use it."""
    torch.manual_seed(0)
    model = stage2(tmp_path / "after.pth")
    model.set_test_feature("before_neck")
    save_reid_model(model, tmp_path / "model.pth")
    onnx_path = main(["--checkpoint", str(tmp_path / "model.pth"), "--out", str(tmp_path / "model.onnx")])
    session = ort.InferenceSession(str(onnx_path))
    assert session.get_modelmeta().custom_metadata_map["embedding"] == "stage-2 embedding, before_neck"
    pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 16, 3), dtype=np.uint8)  # (B, H, W, 3)
    out = session.run(None, {"images": pixels.transpose(0, 3, 1, 2).copy()})[0]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        before = model.eval()(x)  # (B, D) the embedding layer's output, the BN's input
        model.set_test_feature("after_neck")
        after = model(x)
    np.testing.assert_allclose(out, torch.nn.functional.normalize(before, dim=1).numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(out, torch.nn.functional.normalize(after, dim=1).numpy(), atol=1e-2)
