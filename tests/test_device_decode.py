"""crops.decode: gpu on the CPU: the workers' bytes and boxes, the device's decode and crops, against the CPU path."""

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_recog.data import datasets as ds
from dino_recog.data.batch_augment import BatchAugment
from dino_recog.data.device_decode import (
    DeviceCrops,
    EncodedBatch,
    EncodedMultiCrop,
    collate_encoded,
    read_encoded,
    resize_boxes,
)
from dino_recog.data.transforms import MultiCropTransform

SIZES = dict(global_crops_size=(32, 16), local_crops_number=4, local_crops_size=(16, 8))


def photo(h, w, seed, noise=4.0):
    """A smooth colourful uint8 (h, w, 3) array with sensor noise: decodes and resizes like a photograph."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 255, (1, 3, max(h // 8, 2), max(w // 8, 2)))).float()
    a = F.interpolate(low, size=(h, w), mode="bicubic")[0].permute(1, 2, 0).numpy() + rng.normal(0, noise, (h, w, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def save(path, array, fmt="JPEG", mode="RGB"):
    Image.fromarray(array).convert(mode).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEGs of several sizes, a grayscale JPEG, a PNG and a CMYK JPEG (the last two decoded by the worker)."""
    d = tmp_path_factory.mktemp("decode")
    paths = [save(d / f"{i}.jpg", photo(h, w, i)) for i, (h, w) in enumerate([(64, 32), (80, 40), (48, 48), (70, 30)])]
    paths.append(save(d / "gray.jpg", photo(60, 30, 7), mode="L"))
    paths.append(save(d / "plain.png", photo(50, 26, 8), fmt="PNG"))
    paths.append(save(d / "cmyk.jpg", photo(66, 34, 9), mode="CMYK"))
    return paths


class Recording(MultiCropTransform):
    """The CPU path, keeping the boxes and flips it drew."""

    def draw(self, spec, height, width):
        drawn = super().draw(spec, height, width)
        self.drawn.append(drawn)
        return drawn


def cpu_path(paths, seeds):
    t = Recording(**SIZES, gpu_augment=True)
    data = ds.ImageDataset(paths, transform=t)
    crops, boxes = [], []
    for i, seed in enumerate(seeds):
        t.drawn = []
        crops.append(data[(i, seed)][0])
        boxes.append(t.drawn)
    return crops, boxes


def gpu_path(paths, seeds):
    data = ds.ImageDataset(paths, transform=EncodedMultiCrop(**SIZES))
    return [data[(i, seed)] for i, seed in enumerate(seeds)]


def test_the_resize_is_the_cpu_paths_antialiased_bicubic_within_rounding():
    """Boxes shrunk and enlarged, in both directions, on photo-like and on pure-noise images (whose bicubic overshoot
    the intermediate clipping must handle as the uint8 kernel does): within 2 of 255, nearly all pixels exact."""
    rng = np.random.default_rng(0)
    worst, exact, total = 0, 0, 0
    for trial in range(24):
        h, w = (int(v) for v in rng.integers(20, 160, 2))
        img = torch.from_numpy(photo(h, w, trial, noise=4.0 if trial % 2 else 80.0)).permute(2, 0, 1).contiguous()
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        bh, bw = int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1))
        size = (int(rng.integers(4, 120)), int(rng.integers(4, 60)))
        ref = F.interpolate(img[None, :, top : top + bh, left : left + bw], size, mode="bicubic", antialias=True)[0]
        canvas = torch.zeros(1, 3, h + 5, w + 3)  # padding around the image is never read
        canvas[0, :, :h, :w] = img
        box = torch.tensor([[[top, left, bh, bw], [top, left, bh, bw]]])
        out = resize_boxes(canvas, box, torch.tensor([[False, True]]), size)[0]
        assert torch.equal(out[1], out[0].flip(-1))  # the flip: the column weights reversed
        diff = (out[0].int() - ref.int()).abs()
        worst, exact, total = max(worst, int(diff.max())), exact + int((diff == 0).sum()), total + diff.numel()
    assert worst <= 2
    assert exact / total > 0.9


def test_the_worker_draws_the_cpu_paths_boxes_and_the_device_makes_its_crops(files):
    """Same seeds: identical boxes and flips; the crops made from them on the device (here the CPU) equal the CPU
    path's within the resize tolerance, for device-decoded JPEGs and worker-decoded PNG / CMYK alike."""
    seeds = list(range(100, 100 + len(files)))
    cpu_crops, cpu_boxes = cpu_path(files, seeds)
    items = gpu_path(files, seeds)
    for item, boxes in zip(items, cpu_boxes):
        enc = item[0]
        assert enc.boxes.tolist() == [list(b[:4]) for b in boxes]
        assert enc.flips.tolist() == [b[4] for b in boxes]
    assert [item[0].data.dim() for item in items] == [1, 1, 1, 1, 1, 3, 3]  # PNG and CMYK: decoded by the worker
    batch, skipped = collate_encoded(items)
    assert skipped == 0 and isinstance(batch[0], EncodedBatch) and batch[3].tolist() == list(range(len(files)))
    crops = DeviceCrops()(batch[0], torch.device("cpu"))
    assert [tuple(c.shape) for c in crops] == [(7, 3, 32, 16)] * 2 + [(7, 3, 16, 8)] * 4
    for n, image_crops in enumerate(cpu_crops):
        for c, ref in enumerate(image_crops):
            diff = (crops[c][n].int() - ref.int()).abs().max()
            assert diff <= 2, (files[n], c, diff)


def test_a_batch_without_a_jpeg_for_the_device_is_cropped_from_the_workers_pixels(files):
    items = gpu_path(files[-2:], [3, 4])  # the PNG and the CMYK JPEG
    crops = DeviceCrops()(collate_encoded(items)[0][0], torch.device("cpu"))
    assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 16)] * 2 + [(2, 3, 16, 8)] * 4


def test_an_item_is_the_same_for_the_same_seed_so_a_resumed_run_repeats_it(files):
    first, again, other = gpu_path(files[:2], [5, 6]), gpu_path(files[:2], [5, 6]), gpu_path(files[:2], [7, 8])
    for a, b, c in zip(first, again, other):
        assert torch.equal(a[0].boxes, b[0].boxes) and torch.equal(a[0].flips, b[0].flips)
        assert not torch.equal(a[0].boxes, c[0].boxes)


def test_a_truncated_jpeg_is_skipped_by_the_worker_and_counted(files, tmp_path):
    data = open(files[0], "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert not isinstance(read_encoded(files[0]), Image.Image)
    with pytest.raises(ds.CorruptImageError, match="cut.jpg"):
        read_encoded(str(cut))  # no EOI: PIL decodes it in the worker, and fails as read_image does
    items = gpu_path([files[0], str(cut)], [1, 2])
    assert items[1] is None
    batch, skipped = collate_encoded(items)
    assert skipped == 1 and len(batch[0]) == 1


def test_a_jpeg_that_no_decoder_reads_is_left_out_on_the_device_and_counted(files, caplog):
    good = gpu_path(files[:2], [1, 2])
    data = bytearray(open(files[1], "rb").read())
    start = data.index(b"\xff\xda")  # start of scan: its header then the entropy-coded data, ruined
    data[start + 4 : -2] = b"\xff\x00" * ((len(data) - start - 6) // 2) + b"\xff" * ((len(data) - start - 6) % 2)
    bad = read_encoded(bytes(data), "bad.jpg")
    assert not isinstance(bad, Image.Image)  # the header and the EOI marker look right
    good[1][0].data, good[1][0].name = bad.data, "bad.jpg"
    decoder = DeviceCrops()
    crops = decoder(collate_encoded(good)[0][0], torch.device("cpu"))
    assert crops[0].shape[0] == 1 and decoder.skipped == 1
    assert "bad.jpg" in caplog.text


def test_decode_gpu_gives_the_loss_of_the_cpu_path_with_the_same_crops_and_colours(files):
    """The whole task: crops.decode=gpu (encoded batch) against crops.gpu_augment (uint8 crops from the workers),
    same model, same seeds: the same loss within what the resize rounding moves it."""
    from conftest import TINY_VIT

    from dino_recog import config as C
    from dino_recog.tasks import build_dino_task, dino_schedule

    over = [*TINY_VIT, "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16", "run.amp=fp32",
            "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]", "crops.local_crops_number=4"]
    losses = []
    for decode, batch in (("cpu", None), ("gpu", None)):
        cfg = C.load("cfg_dino.yaml", [*over, f"crops.decode={decode}", "crops.gpu_augment=true"], C.DinoConfig)
        torch.manual_seed(0)
        task = build_dino_task(cfg)
        assert (task.decode is not None) == (decode == "gpu")
        seeds = list(range(20, 20 + len(files)))
        if decode == "gpu":
            batch, _ = collate_encoded(gpu_path(files, seeds))
        else:
            crops, _ = cpu_path(files, seeds)
            batch = ([torch.stack([c[k] for c in crops]) for k in range(6)], None, None, None)
        losses.append(float(task(batch, dino_schedule(cfg, 10)(3))[0].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=5e-4)


def test_decode_gpu_implies_the_device_colour_path_and_is_off_by_default():
    from conftest import TINY_VIT

    from dino_recog import config as C
    from dino_recog.tasks import build_dino_task

    small = [*TINY_VIT, "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16"]
    default = build_dino_task(C.load("cfg_dino.yaml", small, C.DinoConfig))
    assert default.decode is None and default.augment is None
    task = build_dino_task(C.load("cfg_dino.yaml", [*small, "crops.decode=gpu"], C.DinoConfig))
    assert isinstance(task.augment, BatchAugment) and task.epoch_stats() == {"skipped_on_device": 0}
    with pytest.raises(C.ConfigError, match="crops.decode"):
        C.load("cfg_dino.yaml", [*small, "crops.decode=nvjpeg"], C.DinoConfig)


def test_read_encoded_refuses_missing_files_and_non_images_as_read_image_does(tmp_path):
    with pytest.raises(ds.CorruptImageError, match="nope.jpg"):
        read_encoded(str(tmp_path / "nope.jpg"))
    with pytest.raises(ds.CorruptImageError, match="<bytes>"):
        read_encoded(b"not an image")
    buf = io.BytesIO()
    Image.fromarray(photo(20, 10, 0)).save(buf, "PNG")
    assert isinstance(read_encoded(buf.getvalue()), Image.Image)


@pytest.mark.slow
def test_a_tiny_stage_1_trains_with_decode_gpu_through_dataloader_workers(small_demo, tmp_path):
    """train_dino.py end to end with crops.decode=gpu and 2 workers: EncodedCrops cross the process boundary, the
    collate makes an EncodedBatch, the task decodes it, and the epoch's record says no image was skipped."""
    from conftest import dino_cfg

    import train_dino
    from dino_recog.runlog import read_jsonl

    out = tmp_path / "run"
    train_dino.main(dino_cfg(small_demo / "lup" / "images", out, "crops.decode=gpu", "data.num_workers=2",
                             "train.epochs=1", "train.warmup_epochs=0"))  # fmt: skip
    (epoch,) = read_jsonl(out / "log.jsonl", "epoch")
    assert epoch["skipped_on_device"] == 0 and epoch["skipped_images"] == 0 and epoch["loss"] > 0


@pytest.mark.slow
def test_the_gpu_suite_runs_every_piece_in_its_cpu_smoke_mode(tmp_path):
    """bench/gpu_suite.sh --smoke: the step and end-to-end benchmarks (every pipeline, the profiler traces; the
    official DINO too where bench/.official-dino is there) run one tiny step each on the CPU, so a GPU session does
    not spend its minutes on a broken script."""
    import subprocess
    import sys
    import tarfile

    from conftest import ROOT

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=3600)  # fmt: skip
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    assert "## step_vit_small: exit 0" in summary and "## e2e_vit_small: exit 0" in summary
    for row in ("decode=cpu, colour on the CPU", "decode=cpu + gpu_augment", "decode=gpu (workers"):
        assert row in summary
    with tarfile.open(tmp_path / "traces.tar") as tar:
        names = tar.getnames()
    assert any(n.endswith("_b4.json.gz") for n in names) and any(n.startswith("traces/augment_") for n in names)
