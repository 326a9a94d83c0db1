"""Export a model to ONNX: a stage-2 recognition model, or the backbone of a stage-1 teacher.

    python -m dino_recog.export --checkpoint output/recog/model.pth --out model.onnx [--verify]
    python -m dino_recog.export --checkpoint output/dino/teacher_backbone.pth --out teacher.onnx

The graph takes images as a user has them and returns what evaluation and `FeatureExtractor` compute (without flip
averaging): input `images`, uint8 (batch, 3, H, W), RGB, 0-255, already resized to the model's (H, W); in the graph
x / 255, (x - mean) / std, the model, L2 normalisation; output `embeddings`, float32 (batch, D), rows of unit length.
`--input float` takes float32 in [0, 1] instead; `--raw` is the bare model (input normalised with the model's
mean/std, output not L2-normalised). Resizing stays outside the graph: evaluation resizes with PIL's bicubic filter.
The contract is written into the file's metadata_props (see `contract`). The batch axis is dynamic; H and W are fixed.

`--verify` runs the query/gallery evaluation of the run's test set twice after writing, with the PyTorch model and
through onnxruntime on the same resized images, and fails when rank-1 or mAP differ by more than 0.1 point.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .atomic import atomic_write
from .models.spec import BackboneSpec
from .user_errors import check_output_paths, user_errors

__all__ = ["PIXELS", "EmbeddingGraph", "OnnxEmbedding", "VerifyError", "contract", "export_onnx", "main", "verify_onnx"]

log = logging.getLogger(__name__)

PIXELS = ("uint8", "float", "raw")  # the graph's input: 0-255 | 0-1 | normalised with mean/std (and raw output)
TOLERANCE = 0.1  # points (percent) of rank-1 and mAP that --verify allows between PyTorch and onnxruntime


class VerifyError(RuntimeError):
    """The exported graph does not reproduce the model's evaluation (--verify)."""


class EmbeddingGraph(nn.Module):
    """What the ONNX file computes: pixels -> the evaluation's normalisation -> model -> L2-normalised embedding.

    Args:
        model: maps normalised (B, 3, H, W) images to (B, D) features.
        mean, std: the RGB normalisation the model was trained with.
        pixels: "uint8" (0-255), "float" (0-1), or "raw" (already normalised input, output not L2-normalised).
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], pixels: str = "uint8"):
        super().__init__()
        if pixels not in PIXELS:
            raise ValueError(f"pixels {pixels!r}: expected one of {', '.join(PIXELS)}")
        self.model, self.pixels = model, pixels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pixels == "raw":
            return self.model(images)
        x = images.float()
        if self.pixels == "uint8":
            x = x * (1.0 / 255)  # as ToDtype(scale=True) of the evaluation transform: the same float32 values
        x = (x - self.mean) / self.std  # as Normalize
        return F.normalize(self.model(x), dim=1)  # as embedding.embed: (B, D), unit rows


def contract(spec: BackboneSpec, pixels: str, what: str) -> dict[str, str]:
    """The input/output contract of an exported graph, as the string pairs stored in its metadata_props.

    Args:
        spec: the backbone's description (input size, normalisation).
        pixels: one of `PIXELS`.
        what: what the embedding is, e.g. "stage-2 embedding".
    """
    h, w = spec.img_size
    dtype = "uint8" if pixels == "uint8" else "float32"
    value_range = {"uint8": "0-255", "float": "0-1", "raw": "normalised: (x / 255 - mean) / std"}[pixels]
    return {
        "input": f"images: {dtype} (batch, 3, {h}, {w}), RGB, {value_range}; resized to {h}x{w} outside the graph "
                 "(dino_recog evaluation: PIL bicubic)",
        "input_dtype": dtype,
        "input_range": value_range,
        "channel_order": "RGB",
        "img_size": json.dumps(list(spec.img_size)),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "normalisation_in_graph": str(pixels != "raw").lower(),
        "output": f"embeddings: float32 (batch, D), {'L2-normalised rows' if pixels != 'raw' else 'not normalised'}",
        "output_l2_normalised": str(pixels != "raw").lower(),
        "embedding": what,
        "backbone_spec": json.dumps(spec.to_dict()),
        "producer": f"dino_recog {__version__}",
    }  # fmt: skip


def _spec_of(model: nn.Module) -> BackboneSpec | None:
    spec = getattr(model, "backbone_spec", None)  # a ReIDModel's
    return spec if isinstance(spec, BackboneSpec) else None


def _reid_what(model: nn.Module) -> str:
    """A stage-2 model's embedding as the metadata says it: the BN-neck output or the feature before it."""
    return f"stage-2 embedding, {model.spec.get('test_feature', 'after_neck')}"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: tuple[int, int] | None = None,
    opset: int = 17,
    *,
    spec: BackboneSpec | None = None,
    pixels: str = "uint8",
    what: str = "",
) -> Path:
    """Write `model` as an ONNX graph with a dynamic batch axis and its contract in metadata_props, atomically.

    Args:
        model: maps normalised images to embeddings; left in the mode it was in.
        path: the .onnx file.
        img_size: (H, W) of the graph's input; default the spec's.
        spec: input size and normalisation; default the model's own (`ReIDModel.backbone_spec`).
        pixels: the input contract, one of `PIXELS` (see `EmbeddingGraph`).
        what: what the embedding is, for the metadata; default from the kind of model.

    Raises:
        ValueError: no spec given and none on the model.
    """
    import onnx

    spec = spec or _spec_of(model)
    if spec is None:
        raise ValueError(f"export_onnx: {type(model).__name__} carries no BackboneSpec; pass spec=")
    if img_size is not None and tuple(img_size) != spec.img_size:
        spec = BackboneSpec(**{**spec.to_dict(), "img_size": tuple(img_size)})
    what = what or (_reid_what(model) if _spec_of(model) else "backbone global feature")
    graph = EmbeddingGraph(model, spec.mean, spec.std, pixels).eval()
    was_training = model.training
    model.eval()
    example = torch.zeros(2, 3, *spec.img_size, dtype=torch.uint8 if pixels == "uint8" else torch.float32)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant for a fixed size
            torch.onnx.export(
                graph, (example,), buffer, input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
            )  # fmt: skip
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, contract(spec, pixels, what))
    path = atomic_write(path, lambda fh: fh.write(proto.SerializeToString()), "ONNX model")
    log.info("exported %s: %s", path, proto.metadata_props[0].value)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# --verify: the query/gallery evaluation with PyTorch and through onnxruntime


class OnnxEmbedding(nn.Module):
    """An exported graph as a module that `evaluation.extract_features` can run: it takes the evaluation transform's
    images without normalisation (mean 0, std 1: the resized pixels / 255; for a raw graph, normalised ones)."""

    def __init__(self, path: str | os.PathLike, pixels: str) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.pixels = pixels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pixels == "uint8":  # back to the decoded bytes: ToDtype's x * (1/255) times 255 rounds to x exactly
            images = (images * 255).round().to(torch.uint8)
        out = self.session.run(None, {"images": images.cpu().contiguous().numpy()})[0]  # (B, D)
        return torch.from_numpy(out)


def _test_config(checkpoint: str, config: str | None, overrides: list[str]) -> tuple[Any, Any, dict, str]:
    """The test set and protocol options of the config that `--verify` uses: `--config`, else the config.yaml of the
    run beside the checkpoint; a stage-2 config gives `data.test` and `eval.*`, a stage-1 one `data.eval_set`.

    Returns:
        (DatasetSpec, config, query_gallery_metrics keyword arguments, the config's path).

    Raises:
        ConfigError: no config, or one without a test set (one line naming what to pass).
    """
    from . import config as C
    from .cli import eval_options
    from .config.yaml_file import read_yaml

    beside = Path(checkpoint).parent / "config.yaml"
    path = Path(config) if config else beside if beside.is_file() else None
    if path is None:
        raise C.ConfigError(f"--verify: no test set: no --config and no config.yaml beside {checkpoint}; pass "
                            "--config with data.test (stage 2) or data.eval_set (stage 1)")  # fmt: skip
    if not path.is_file():
        raise C.ConfigError(f"--config {path}: config file not found")
    values = read_yaml(path)
    stage1 = isinstance(values, dict) and ("crops" in values or "dino" in values)  # sections only DinoConfig has
    cfg = C.load(path, overrides, cls=C.DinoConfig if stage1 else C.RecogConfig)
    if stage1:
        if cfg.data.eval_set is None:
            raise C.ConfigError(f"--verify: {path} has no test set (data.eval_set is null); set data.eval_set or pass "
                                "--config with one")  # fmt: skip
        return cfg.data.eval_set, cfg, {}, str(path)  # stage 1 monitors with the cosine protocol, no options
    return cfg.data.test, cfg, {"metric": cfg.eval.metric, **eval_options(cfg.eval)}, str(path)


def verify_onnx(
    model: nn.Module,
    spec: BackboneSpec,
    onnx_path: str | os.PathLike,
    test: Any,
    pixels: str = "uint8",
    batch_size: int = 256,
    num_workers: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """The query/gallery metrics of `model` with PyTorch and of the exported graph with onnxruntime, on the CPU.

    Both go through the same data sets, transform, `extract_features` and `query_gallery_metrics`; the graph is
    fed the resized images before normalisation. Flip averaging is off: the graph embeds the image it is given.

    Args:
        model: the exported PyTorch model (normalised images to features).
        spec: its input size and normalisation.
        test: the `DatasetSpec` of the query/gallery set.
        options: `query_gallery_metrics` keyword arguments (metric, rerank, aqe, topk).

    Returns:
        {"pytorch": metrics, "onnx": metrics, "max_feature_diff": float, "num_query": int, "num_gallery": int}.
    """
    from .data.build import query_gallery
    from .data.datasets import ImageDataset
    from .data.transforms import reid_test_transform
    from .evaluation import extract_features, query_gallery_metrics

    cpu = torch.device("cpu")
    data, query, gallery = query_gallery(test, spec.img_size, spec.mean, spec.std)
    query_px, gallery_px = query, gallery
    if pixels != "raw":  # the same records and resize, without the normalisation the graph does itself
        tf = reid_test_transform(spec.img_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        query_px, gallery_px = (ImageDataset(records, tf, train=False) for records in (data.query, data.gallery))
    graph = OnnxEmbedding(onnx_path, pixels)
    out: dict[str, Any] = {"num_query": len(query), "num_gallery": len(gallery)}
    feats = {}
    for name, net, q, g in (("pytorch", model.to(cpu), query, gallery), ("onnx", graph, query_px, gallery_px)):
        qf, q_pids, q_cams = extract_features(net, q, cpu, batch_size, num_workers)
        gf, g_pids, g_cams = extract_features(net, g, cpu, batch_size, num_workers)
        out[name] = query_gallery_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, **options)
        feats[name] = torch.cat([qf, gf])
    out["max_feature_diff"] = float((feats["pytorch"] - feats["onnx"]).abs().max()) if len(feats["onnx"]) else 0.0
    return out


def _report(result: dict, onnx_path: Path, checkpoint: str, source: str) -> None:
    """Print both evaluations; raise VerifyError when rank-1 or mAP differ by more than TOLERANCE points."""
    pt, ox = result["pytorch"], result["onnx"]
    print(f"verify: {source} ({result['num_query']} queries, {result['num_gallery']} gallery), CPU fp32, no flip")
    print(f"{'':>10} {'rank-1':>7} {'mAP':>7}")
    for name, r in (("PyTorch", pt), ("ONNX", ox)):
        print(f"{name:>10} {100 * r['rank1']:7.2f} {100 * r['mAP']:7.2f}")
    diff = max(abs(pt[k] - ox[k]) for k in ("rank1", "mAP")) * 100
    if diff > TOLERANCE:
        raise VerifyError(f"--verify: {onnx_path} does not reproduce {checkpoint}: rank-1 {100 * ox['rank1']:.2f} / "
                          f"mAP {100 * ox['mAP']:.2f} through onnxruntime against {100 * pt['rank1']:.2f} / "
                          f"{100 * pt['mAP']:.2f} with PyTorch ({diff:.2f} points apart, more than {TOLERANCE}); the "
                          "file is written but not verified")  # fmt: skip
    print(f"verified: {onnx_path} (rank-1 and mAP within {diff:.2f} point of PyTorch; largest feature difference "
          f"{result['max_feature_diff']:.1e})")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _open_model(checkpoint: str) -> tuple[nn.Module, BackboneSpec, str]:
    """The model that evaluation and extraction use for `checkpoint`, its spec and what its embedding is."""
    from .checkpoint import CheckpointError
    from .weights import open_feature_model, peek_checkpoint, read_backbone_spec

    if read_backbone_spec(peek_checkpoint(checkpoint), checkpoint) is None:
        raise CheckpointError(f"{checkpoint}: weights without a BackboneSpec (official DINO, timm, an older export); "
                              "export takes what dino_recog writes: model.pth / best.pth, teacher_backbone.pth or a "
                              "stage-1 checkpoint")  # fmt: skip
    model, spec = open_feature_model(checkpoint)  # what eval_reid.py and FeatureExtractor build from it
    what = _reid_what(model) if _spec_of(model) else f"backbone global feature ({spec.feature})"
    return model.eval(), spec, what


EPILOG = """\
input contract (default): images uint8 (batch, 3, H, W), RGB, 0-255, already resized to the model's H x W
(the evaluation uses PIL bicubic; resizing is not in the graph); the graph divides by 255, normalises with the
model's mean/std and L2-normalises the output embeddings (batch, D). --input float: float32 0-1 instead of uint8.
--raw: the bare model (input normalised with mean/std, output not normalised). The contract (mean, std, img_size,
input range, output normalisation) is in the file's metadata_props.
--verify: after writing, evaluate the run's query/gallery (from --config, else the config.yaml beside the
checkpoint; key=value overrides apply to it) with PyTorch and with onnxruntime; rank-1 or mAP more than 0.1 point
apart is an error (exit 1; the file stays).
"""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export a stage-2 model or a stage-1 teacher backbone to ONNX",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="model.pth, best.pth, a stage-2 checkpoint, "
                        "teacher_backbone.pth or a stage-1 checkpoint")  # fmt: skip
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--input", choices=("uint8", "float"), help="pixels the graph takes: uint8 0-255 (default) "
                        "or float32 0-1")  # fmt: skip
    parser.add_argument("--raw", action="store_true", help="no normalisation in the graph: normalised input, "
                        "embeddings not L2-normalised")  # fmt: skip
    parser.add_argument("--verify", action="store_true", help="check the file against PyTorch on the run's test set")
    parser.add_argument("--config", help="--verify: the config whose test set to use (default: the run's)")
    parser.add_argument("overrides", nargs="*", help="--verify: key.sub=value overrides of that config")
    args = parser.parse_args(argv)
    if args.raw and args.input:
        parser.error("--raw takes normalised float input; --input does not apply")
    if not args.verify and (args.config or args.overrides):
        parser.error("--config and key=value overrides choose the test set of --verify; add --verify")
    pixels = "raw" if args.raw else args.input or "uint8"
    with user_errors():
        check_output_paths({"--out": args.out})
        if args.verify:  # a missing test set fails before the export, not after it
            test, cfg, options, source = _test_config(args.checkpoint, args.config, args.overrides)
        model, spec, what = _open_model(args.checkpoint)
        path = export_onnx(model, args.out, opset=args.opset, spec=spec, pixels=pixels, what=what)
        if not args.verify:
            return path
        batch = getattr(cfg.data, "test_batch_size", 256)  # stage 1 evaluates in batches of 256
        result = verify_onnx(model, spec, path, test, pixels, batch, cfg.data.num_workers, **options)
    try:
        _report(result, path, args.checkpoint, f"{test.name} {test.root} from {source}")
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
