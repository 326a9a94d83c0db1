"""FeatureExtractor on every kind of input, the extract command, and the feature cache."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_sh
from PIL import Image

from dino_recog import config as C
from dino_recog import feature_cache
from dino_recog.checkpoint import CheckpointError, save_checkpoint, save_reid_model
from dino_recog.config import IMAGENET_MEAN, IMAGENET_STD
from dino_recog.data import datasets as ds
from dino_recog.data.transforms import reid_test_transform
from dino_recog.evaluation import extract_features
from dino_recog.extract import FeatureExtractor, main
from dino_recog.feature_cache import cached_features
from dino_recog.models import build_backbone, build_reid_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = dict(arch="vit_small", img_size=[32, 16], patch_size=8, depth=2, embed_dim=32, num_heads=2)
# not ImageNet's, so a test fails if the extractor ignored the model's own normalisation
SPEC = dict(TINY, num_classes=5, feature="cls_mean", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_reid_model(SPEC)
    model.train()(torch.randn(8, 3, 32, 16))  # move the BN-neck statistics away from their init
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~30x faster than two spinning OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_reid_model(tiny_model(), tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture(scope="module")
def extractor(model_path):
    return FeatureExtractor(model_path, "cpu", batch_size=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four RGB images of different sizes saved losslessly, as uint8 arrays and file paths."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 20), (64, 32), (37, 23), (40, 20))]
    paths = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"img{i}.png")
        paths.append(str(root / f"img{i}.png"))
    return arrays, paths


def test_every_kind_of_input_gives_the_features_of_the_file(extractor, images):
    arrays, paths = images
    expected = extractor(paths)  # (4, D)
    assert expected.shape == (4, extractor.dim) == (4, 64) and expected.dtype == torch.float32
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(4))
    chw = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    rgba = [Image.fromarray(np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])) for a in arrays]  # alpha dropped
    variants = {
        "Path": [Path(p) for p in paths],
        "bytes": [Path(p).read_bytes() for p in paths],
        "PIL RGB": [Image.fromarray(a) for a in arrays],
        "PIL RGBA": rgba,
        "uint8 array": arrays,
        "float array": [a / 255.0 for a in arrays],
        "uint8 tensor": chw,
        "float tensor": [t.float() / 255 for t in chw],
        "float tensor, rounded": [(t.float() - 0.3).clamp(min=0) / 255 for t in chw],  # nearest 8-bit level
        "float16 array, rounded": [(a + 0.3).clip(max=255).astype(np.float16) / 255 for a in arrays],
        "mixed": [paths[0], arrays[1], chw[2], rgba[3]],
    }
    for name, inputs in variants.items():
        torch.testing.assert_close(extractor(inputs), expected, rtol=0, atol=1e-6, msg=name)
    # batches: a (B, 3, H, W) tensor and a (B, H, W, 3) array of same-sized images; one item alone gives (1, D)
    torch.testing.assert_close(extractor(torch.stack([chw[0], chw[3]])), expected[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(np.stack([arrays[0], arrays[3]])), expected[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(arrays[2]), expected[2:3], rtol=0, atol=1e-6)
    assert extractor([]).shape == (0, 64)


def test_grayscale_inputs_agree(extractor, tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (30, 18), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")  # an L-mode file
    tensor = torch.from_numpy(gray)
    pil = Image.fromarray(gray)
    inputs = [str(tmp_path / "gray.png"), pil, pil.convert("RGB"), gray, gray[:, :, None], tensor, tensor[None],
              np.dstack([gray] * 3)]  # fmt: skip
    feats = extractor(inputs)
    for i in range(1, len(inputs)):
        torch.testing.assert_close(feats[i], feats[0], rtol=0, atol=1e-6, msg=f"inputs[{i}]")


@pytest.mark.parametrize("flip", [False, True])
def test_equals_extract_features(model_path, images, flip):
    _, paths = images
    dataset = ds.ImageDataset(paths, reid_test_transform((32, 16), SPEC["mean"], SPEC["std"]), train=False)
    expected, _, _ = extract_features(tiny_model(), dataset, CPU, batch_size=2, flip=flip)
    for workers in (0, 2):  # decoding threads change nothing
        feats = FeatureExtractor(model_path, "cpu", batch_size=2, flip=flip, num_workers=workers)(paths)
        torch.testing.assert_close(feats, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(5, 32, 16), "inputs[1]: tensor of shape (5, 32, 16): expected (3, H, W) or (1, H, W) for one "
         "image, (B, 3, H, W) or (B, 1, H, W) for a batch, or (H, W) (channels first, RGB)"),
        (torch.zeros(32, 16, 3, dtype=torch.uint8), "inputs[1]: tensor of shape (32, 16, 3): expected (3, H, W) or "
         "(1, H, W) for one image, (B, 3, H, W) or (B, 1, H, W) for a batch, or (H, W) (channels first, RGB); it "
         "looks channels-last: use .permute(2, 0, 1)"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "inputs[1]: tensor of dtype torch.int64: expected torch.uint8 "
         "(0-255) or a floating dtype (0-1)"),
        (torch.full((3, 8, 8), -1.5), "inputs[1]: float tensor with values in [-1.5, -1.5]: expected floats in "
         "[0, 1] (not normalised: FeatureExtractor normalises with the model's mean and std) or uint8 in 0-255"),
        (np.zeros((3, 32, 16), np.uint8), "inputs[1]: array of shape (3, 32, 16): expected (H, W), (H, W, C) or "
         "(B, H, W, C) with C = 1, 3 or 4 (channels last, RGB); it looks channels-first: use .transpose(1, 2, 0)"),
        (np.zeros((8, 8, 3), np.uint16), "inputs[1]: array of dtype uint16: expected uint8 (0-255) or a floating "
         "dtype (0-1)"),
    ],
)  # fmt: skip
def test_bad_arrays_and_tensors_are_named(extractor, images, bad, message):
    with pytest.raises(ValueError) as e:
        extractor([images[1][0], bad])
    assert str(e.value) == message


def test_other_bad_inputs(extractor, tmp_path):
    with pytest.raises(TypeError, match=re.escape("input: cannot use int as an image: expected a file path")):
        extractor(3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ds.CorruptImageError, match=re.escape(f"cannot read image {tmp_path / 'bad.jpg'}")):
        extractor(str(tmp_path / "bad.jpg"))


def test_backbone_weights(tmp_path, images):
    _, paths = images
    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    torch.save(backbone.state_dict(), tmp_path / "teacher_backbone.pth")
    with pytest.raises(CheckpointError) as e:
        FeatureExtractor(tmp_path / "teacher_backbone.pth", "cpu")
    assert str(e.value) == (
        f"{tmp_path / 'teacher_backbone.pth'}: backbone weights without a description of the architecture; pass "
        "backbone=dict(name=..., img_size=(H, W), ...) with the keyword arguments of dino_recog.models.build_backbone "
        "(missing: name, one of vit_tiny | vit_small | vit_base | resnet18 | resnet50 | resnet101 | resnet50_ibn_a | "
        "timm:<name>)"
    )
    arch = dict(name="vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)
    feats = FeatureExtractor(tmp_path / "teacher_backbone.pth", "cpu", backbone=arch)(paths)
    imagenet = ds.ImageDataset(paths, reid_test_transform((32, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    torch.testing.assert_close(feats, extract_features(backbone, imagenet, CPU)[0], rtol=0, atol=1e-6)

    # a stage-1 training checkpoint carries its config: architecture, crop size and normalisation come from it
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    config = {"model": {"arch": "vit_small", "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
              "crops": {"global_crops_size": [32, 16], "mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}}  # fmt: skip
    save_checkpoint({"teacher": teacher, "student": {}, "config": config}, tmp_path / "checkpoint.pth")
    stage1 = FeatureExtractor(tmp_path / "checkpoint.pth", "cpu")
    assert (stage1.image_size, stage1.mean, stage1.std) == ((32, 16), (0.5, 0.5, 0.5), (0.3, 0.3, 0.3))
    half = ds.ImageDataset(paths, reid_test_transform((32, 16), (0.5,) * 3, (0.3,) * 3))
    torch.testing.assert_close(stage1(paths), extract_features(backbone, half, CPU)[0], rtol=0, atol=1e-6)


def image_folder(root):
    rng = np.random.default_rng(2)
    for name in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.bmp", ".hidden.png", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            (root / name).write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.mark.slow  # a fresh interpreter (about 9 s of start-up on 2 cores)
def test_cli_writes_features_and_file_list(model_path, tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    out = tmp_path / "out" / "feats.npy"
    args = ["--checkpoint", str(model_path), "--images", str(root), "--out", str(out), "--batch-size", "2"]
    assert main([*args, "--device", "cpu"]) == 0  # the CPU on a GPU machine too: compared with CPU features below
    names = (tmp_path / "out" / "feats.txt").read_text().splitlines()
    assert names == ["a.jpg", "b.png"]
    feats = np.load(out, allow_pickle=False)
    assert feats.dtype == np.float32 and feats.shape == (2, 64)
    expected = FeatureExtractor(model_path, "cpu")([str(root / n) for n in names])
    np.testing.assert_allclose(feats, expected.numpy(), rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["feats.npy", "feats.txt"]  # no temp files left

    # backbone weights described on the command line
    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    arch = ["name=vit_small", "img_size=[32, 16]", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2"]
    assert main(["--checkpoint", str(tmp_path / "backbone.pth"), "--images", str(root), "--out", str(out),
                 "--backbone", *arch]) == 0  # fmt: skip
    imagenet = ds.ImageDataset(
        [str(root / n) for n in names], reid_test_transform((32, 16), IMAGENET_MEAN, IMAGENET_STD)
    )
    np.testing.assert_allclose(np.load(out), extract_features(backbone, imagenet, CPU)[0].numpy(), rtol=0, atol=1e-6)

    # --recursive, --flip, as a module in a fresh interpreter
    cmd = [sys.executable, "-m", "dino_recog.extract", "--checkpoint", model_path, "--images", root, "--out", out,
           "--recursive", "--flip"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    names = (tmp_path / "out" / "feats.txt").read_text().splitlines()
    assert names == ["a.jpg", "b.png", "sub/c.png", "sub/deeper/d.bmp"]
    expected = FeatureExtractor(model_path, "cpu", flip=True)([str(root / n) for n in names])
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=0, atol=1e-6)


def test_cli_errors(model_path, tmp_path, capsys):
    def fails(images, out="f.npy"):
        status = main(["--checkpoint", str(model_path), "--images", str(images), "--out", str(tmp_path / out)])
        err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar, if it started
        assert status == 2, err
        return err

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert fails(tmp_path / "empty") == (f"error: no images (.jpg, .jpeg, .png, .bmp, .webp) in {tmp_path / 'empty'}; "
                                         "it has subfolders: add --recursive to search them")  # fmt: skip
    assert fails(tmp_path / "nope") == f"error: --images {tmp_path / 'nope'}: no such folder"
    root = image_folder(tmp_path / "imgs")
    torch.save(build_backbone("resnet18")[0].state_dict(), tmp_path / "backbone.pth")
    status = main(
        ["--checkpoint", str(tmp_path / "backbone.pth"), "--images", str(root), "--out", str(tmp_path / "f.npy")]
    )
    assert status == 2 and capsys.readouterr().err.startswith(
        f"error: {tmp_path / 'backbone.pth'}: backbone weights without a description of the architecture; pass "
    )
    assert fails(root, "f.txt") == f"error: --out {tmp_path / 'f.txt'}: expected a .npy file name (the file list is " \
                                   "written beside it as .txt)"  # fmt: skip
    (root / "b.png").write_bytes(b"\x89PNG truncated")
    assert fails(root).startswith(f"error: cannot read image {root / 'b.png'}: ")
    assert not (tmp_path / "f.npy").exists()


def test_feature_cache(model_path, images, tmp_path, monkeypatch):
    _, paths = images
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(feature_cache, "extract_features", spy)
    records = [ds.Record(p, i // 2, i % 2) for i, p in enumerate(paths)]
    tf = reid_test_transform((32, 16), SPEC["mean"], SPEC["std"])
    dataset = ds.ImageDataset(records, tf, train=False)
    cache = tmp_path / "cache"

    def run(model, data=dataset, flip=False):
        return cached_features(model, data, CPU, cache, flip=flip, batch_size=3)

    first = run(tiny_model())
    assert len(calls) == 1 and len(list(cache.glob("features-*.npz"))) == 1
    again = run(tiny_model())  # a fresh model with the same weights: a hit, identical to the extraction
    assert len(calls) == 1
    assert torch.equal(again[0], first[0]) and again[0].dtype == torch.float32
    for a, b in zip(again[1:], first[1:]):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert np.array_equal(first[1], [0, 0, 1, 1]) and np.array_equal(first[2], [0, 1, 0, 1])

    run(tiny_model(), flip=True)  # flip misses
    assert len(calls) == 2
    save_reid_model(tiny_model(seed=1), model_path.parent / "other.pth")  # other weights miss
    from dino_recog.checkpoint import load_reid_model

    run(load_reid_model(model_path.parent / "other.pth").eval())
    assert len(calls) == 3
    run(tiny_model(), data=ds.ImageDataset(records[:3], tf, train=False))  # another image list misses
    assert len(calls) == 4
    run(tiny_model(), data=ds.ImageDataset(records, reid_test_transform((32, 16), (0.5,) * 3, SPEC["std"])))
    assert len(calls) == 5  # another normalisation misses
    assert len(list(cache.glob("features-*.npz"))) == 5 and not list(cache.glob(".*tmp*"))

    # a truncated cache file is a miss (and rewritten), never an error
    files = sorted(cache.glob("features-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    files[0].write_bytes(files[0].read_bytes()[:100])
    assert torch.equal(run(tiny_model())[0], first[0]) and len(calls) == 6
    run(tiny_model())
    assert len(calls) == 6


def market_folder(root, arrays):
    """A tiny query/gallery set in Market-1501 layout."""
    splits = {
        "bounding_box_train": ["0001_c1s1_000001_00.jpg"],
        "query": ["0001_c1s1_000002_00.jpg", "0002_c1s1_000003_00.jpg"],
        "bounding_box_test": ["0001_c2s1_000004_00.jpg", "0002_c2s1_000005_00.jpg", "0002_c3s1_000006_00.jpg"],
    }
    for split, names in splits.items():
        (root / split).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(arrays[i % 4]).save(root / split / name)
    return root


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    monkeypatch.setattr(feature_cache, "extract_features", lambda *a, **k: calls.append(1) or extract_features(*a, **k))
    sys.path.insert(0, str(ROOT))  # the eval scripts
    return calls


def test_eval_reid_cache_misses_when_the_checkpoint_is_rewritten(tmp_path, images, count_extractions):
    import eval_reid

    market = market_folder(tmp_path / "market", images[0])
    cfg = C.load(ROOT / "cfg_recog.yaml", [f"data.test={{name: market1501, root: {market}}}", "data.num_workers=0",
                                           "run.device=cpu"], cls=C.RecogConfig)  # fmt: skip
    path, cache = tmp_path / "model.pth", str(tmp_path / "cache")
    save_reid_model(tiny_model(), path)
    first = eval_reid.main(cfg, str(path), cache_dir=cache)
    assert len(count_extractions) == 2  # query and gallery
    assert eval_reid.main(cfg, str(path), cache_dir=cache) == first and len(count_extractions) == 2
    assert eval_reid.main(cfg, str(path)) == first and len(count_extractions) == 4  # no cache: always extracts
    save_reid_model(tiny_model(seed=1), path)  # rewritten in place with other weights
    eval_reid.main(cfg, str(path), cache_dir=cache)
    assert len(count_extractions) == 6


def test_eval_knn_cache(tmp_path, images, count_extractions):
    import eval_knn

    market = market_folder(tmp_path / "market", images[0])
    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    torch.save(backbone.state_dict(), tmp_path / "teacher_backbone.pth")
    overrides = [f"data.eval_set={{name: market1501, root: {market}}}", "crops.global_crops_size=[32,16]",
                 "crops.local_crops_size=[16,8]", "data.num_workers=0", "run.device=cpu", "model.arch=vit_small",
                 "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8"]  # fmt: skip
    cfg = C.load(ROOT / "cfg_dino.yaml", overrides, cls=C.DinoConfig)
    args = (str(tmp_path / "teacher_backbone.pth"), [1, 2], 0.07)
    first = eval_knn.main(cfg, *args, cache_dir=str(tmp_path / "cache"))
    assert eval_knn.main(cfg, *args, cache_dir=str(tmp_path / "cache")) == first
    assert len(count_extractions) == 2
    cfg = C.load(ROOT / "cfg_dino.yaml", [*overrides, "model.num_heads=4"], cls=C.DinoConfig)
    eval_knn.main(cfg, *args, cache_dir=str(tmp_path / "cache"))  # same weights, other attention heads: a miss
    assert len(count_extractions) == 4


@pytest.mark.slow
def test_cache_under_torchrun_two_cpu_processes(images, tmp_path):
    """Rank 0 writes; a hit only when every rank finds the file, so the ranks never disagree (and never hang)."""
    folder = str(Path(images[1][0]).parent)
    r = train_sh("cpu", 2, "tests/scripts/cache_check.py", folder, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for rank in ranks:
        assert rank["counts"] == [1, 1, 2]  # extracted, loaded, extracted again
        assert len(set(rank["digests"])) == 1  # all three calls return the same features
        assert len(rank["files"]) == 1 and rank["files"][0].startswith("features-")  # one file, no temp left
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert not (tmp_path / "elsewhere").exists()  # only rank 0 writes


def test_cli_with_file_names_that_are_not_utf8_writes_a_list_that_reads_back(model_path, tmp_path, capsys):
    """A name with the bytes \\xff \\xfe: `extract` used to write f.npy and fail on f.txt (UnicodeEncodeError)."""
    root = image_folder(tmp_path / "imgs")
    odd = os.fsdecode(os.fsencode(root) + b"/\xff\xfe.jpg")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 12, 3), dtype=np.uint8)).save(odd, format="JPEG")
    out = tmp_path / "out" / "f.npy"
    assert main(["--checkpoint", str(model_path), "--images", str(root), "--out", str(out), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "f.txt").read_bytes() == b"a.jpg\nb.png\n\xff\xfe.jpg\n"  # the bytes on disk
    names = (tmp_path / "out" / "f.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    paths = [os.path.join(root, n) for n in names]
    assert paths[-1] == odd and all(os.path.isfile(p) for p in paths)
    np.testing.assert_allclose(np.load(out), FeatureExtractor(model_path, "cpu")(paths).numpy(), rtol=0, atol=1e-6)


def test_cli_never_leaves_new_features_beside_an_old_file_list(model_path, tmp_path, capsys, monkeypatch):
    """f.npy and f.txt are one result: a failure while writing either, or between the renames, never leaves a
    f.npy beside the f.txt of another run (which would give every feature the wrong name)."""
    from dino_recog import atomic

    root = image_folder(tmp_path / "imgs")
    out = tmp_path / "out" / "f.npy"
    argv = ["--checkpoint", str(model_path), "--images", str(root), "--out", str(out), "--device", "cpu"]
    (tmp_path / "out").mkdir()
    np.save(out, np.zeros((5, 64), np.float32))  # an older result of 5 images
    (tmp_path / "out" / "f.txt").write_text("old1\nold2\nold3\nold4\nold5\n")

    def old_result_intact():
        return np.load(out).shape == (5, 64) and (tmp_path / "out" / "f.txt").read_text().startswith("old1")

    def disk_full(fh, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:  # the features cannot be written: the old pair stays as it was
        m.setattr(np, "save", disk_full)
        assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: could not write features {out}: No space left on device; the previous files are intact")
    assert old_result_intact() and sorted(os.listdir(tmp_path / "out")) == ["f.npy", "f.txt"]

    real_replace, renamed = os.replace, []

    def crash_before_the_features(src, dst):  # the new f.txt is in place, then the process fails
        if str(dst).endswith(".npy"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        renamed.append(dst)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", crash_before_the_features)
        assert main(argv) == 2
    assert renamed == [tmp_path / "out" / "f.txt"]
    assert not out.exists()  # no result rather than new names beside old features (or the other way round)
    assert (tmp_path / "out" / "f.txt").read_text() == "a.jpg\nb.png\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["f.txt"]  # no temporary file left
    assert main(argv) == 0 and np.load(out).shape == (2, 64)  # a rerun writes both


def test_the_extractor_gives_the_test_feature_saved_in_the_model_unless_told_otherwise(tmp_path, images):
    _, paths = images
    model = tiny_model()
    model.set_test_feature("before_neck")
    path = save_reid_model(model, tmp_path / "model.pth")
    x = torch.stack([reid_test_transform((32, 16), SPEC["mean"], SPEC["std"])(Image.open(p).convert("RGB"))
                     for p in paths])  # fmt: skip
    with torch.no_grad():
        before = torch.nn.functional.normalize(model(x), dim=1)
        model.set_test_feature("after_neck")
        after = torch.nn.functional.normalize(model(x), dim=1)
    torch.testing.assert_close(FeatureExtractor(path, "cpu")(paths), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(FeatureExtractor(path, "cpu", test_feature="after_neck")(paths), after, rtol=0,
                               atol=1e-5)  # fmt: skip
    assert not torch.allclose(before, after, atol=1e-2)
    weights = tmp_path / "backbone.pth"
    save_checkpoint(build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32,
                                   num_heads=2)[0].state_dict(), weights)  # fmt: skip
    with pytest.raises(ValueError, match="holds backbone weights, without a BN neck"):
        FeatureExtractor(weights, "cpu", backbone=dict(name="vit_small", img_size=(32, 16), patch_size=8, depth=2,
                                                        embed_dim=32, num_heads=2), test_feature="before_neck")
