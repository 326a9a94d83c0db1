import numpy as np
import pytest
import torch

from dino_recog.checkpoint import save_reid_model
from dino_recog.export import main
from dino_recog.models import build_reid_model

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements-dev.txt)")


@pytest.mark.parametrize("arch, feature", [("vit_small", "cls_mean"), ("resnet18", "gem")])
def test_onnx_matches_pytorch_with_a_dynamic_batch(tmp_path, arch, feature):
    torch.manual_seed(0)
    spec = {"arch": arch, "img_size": [32, 16], "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2,
            "num_classes": 5, "feature": feature, "embedding_dim": 24}  # fmt: skip
    model = build_reid_model(spec)
    model.train()(torch.randn(8, 3, 32, 16))  # move the BN running statistics away from their init
    save_reid_model(model, tmp_path / "model.pth")
    onnx_path = main(["--checkpoint", str(tmp_path / "model.pth"), "--out", str(tmp_path / "model.onnx")])
    session = ort.InferenceSession(str(onnx_path))
    model.eval()
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 16)
        out = session.run(None, {"images": x.numpy()})[0]
        assert out.shape == (batch, 24)
        np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
