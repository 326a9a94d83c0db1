"""End-to-end stage 1: distributed consistency, resume, learning. The tiny runs are those of conftest.py."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, dino_args, dino_cfg, train_sh

import train_dino
from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog.runlog import read_jsonl

# This file's runs keep numbered checkpoints every 20 epochs as cfg_dino.yaml does (conftest's: never); no run here is
# that long, so it only keeps the settings these tests always had.
OWN = ["eval.saveckp_freq=20"]


def tiny_cfg(small_demo: Path, out: Path, *extra: str) -> C.DinoConfig:
    return dino_cfg(small_demo / "lup" / "images", out, *OWN, *extra)


def launch_two_processes(small_demo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The tiny run with 2 CPU processes through train.sh."""
    return train_sh("cpu", 2, "train_dino.py", *dino_args(small_demo / "lup" / "images", out, *OWN, *extra))


def interrupted_copy(run: Path, out: Path) -> None:
    """`out` as a run left it when it died during its second epoch: the checkpoint after the first epoch only."""
    out.mkdir()
    shutil.copy(run / "checkpoint_0001.pth", out / "checkpoint_0001.pth")


@pytest.mark.slow
def test_two_cpu_processes_keep_teacher_and_centre_identical(dino_2proc):
    """The tiny run with 2 CPU processes (conftest's dino_2proc, shared with the crash-safety tests)."""
    out = dino_2proc
    state = ckpt.load_checkpoint(out / "checkpoint_0002.pth")
    prints = state["fingerprints"]
    assert prints.shape == (2, 3) and torch.equal(prints[0], prints[1])
    assert (out / "teacher_backbone.pth").is_file() and (out / "config.yaml").is_file()
    assert C.load(out / "config.yaml", cls=C.DinoConfig).data.batch_size_per_gpu == 8
    records = read_jsonl(out / "log.jsonl", "train")
    assert records and {"teacher_entropy", "kl", "center_norm", "images_per_s"} <= set(records[0])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(small_demo, tmp_path):
    train_dino.main(tiny_cfg(small_demo, tmp_path / "a"))
    interrupted_copy(tmp_path / "a", tmp_path / "b")
    train_dino.main(tiny_cfg(small_demo, tmp_path / "b"))
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint_0002.pth")
    for net in ("student", "teacher", "dino_loss"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=0, atol=0, msg=f"{net}.{k}")
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()


def test_gpu_augment_trains_and_resumes_exactly(small_demo, tmp_path):
    """crops.gpu_augment: workers crop only, BatchAugment runs on the device (here the CPU) with per-step seeds."""
    straight = tiny_cfg(small_demo, tmp_path / "a", "crops.gpu_augment=true")
    train_dino.main(straight)
    records = read_jsonl(tmp_path / "a" / "log.jsonl", "train")
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    interrupted_copy(tmp_path / "a", tmp_path / "b")
    train_dino.main(tiny_cfg(small_demo, tmp_path / "b", "crops.gpu_augment=true"))
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint_0002.pth")
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=0, atol=0, msg=f"teacher.{k}")


def test_accumulated_steps_scale_the_lr_and_resume_mid_epoch_bit_identically(small_demo, tmp_path):
    """accumulate_steps 2 over the 12 batches of 8 of an epoch: 6 optimiser steps an epoch (iterations, schedules,
    checkpoints count them), the lr of the effective batch 16 (5e-4 x 16 / 256 at the first step after the 1-epoch
    warmup) and the log line that says so; a mid-epoch checkpoint (after step 2 of epoch 2) resumes to the weights,
    teacher and centre of the uninterrupted run, bit for bit."""
    extra = ["train.accumulate_steps=2", "run.save_every_steps=4", "run.keep_last=5"]
    train_dino.main(tiny_cfg(small_demo, tmp_path / "a", *extra))
    records = read_jsonl(tmp_path / "a" / "log.jsonl", "train")
    assert [r["step"] for r in records] == list(range(12))
    assert records[6]["lr"] == pytest.approx(5e-4 * 8 * 2 / 256, rel=1e-12)
    assert "effective batch 16 (8 per process x 1 processes x 2 accumulation steps): lr 0.0005 x 16 / 256 = " \
        "3.125e-05" in (tmp_path / "a" / "log.txt").read_text()
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / ckpt.checkpoint_name(1, 2), tmp_path / "b")
    train_dino.main(tiny_cfg(small_demo, tmp_path / "b", *extra))
    assert "at epoch 1, step 2" in (tmp_path / "b" / "log.txt").read_text()
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint_0002.pth")
    assert (a["iteration"], a["step_in_epoch"]) == (12, 0)
    for net in ("student", "teacher", "dino_loss"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=0, atol=0, msg=f"{net}.{k}")


@pytest.mark.slow
def test_two_cpu_processes_with_accumulated_steps_keep_teacher_and_centre_identical(dino_2proc_accum):
    """accumulate_steps 2 on 2 processes (DDP's no_sync on the first micro-batch of each step): the run finishes with
    3 optimiser steps an epoch (6 batches of 8 per process) and identical teachers and centres on both ranks
    (conftest's dino_2proc_accum, shared with the FSDP accumulation test)."""
    state = ckpt.load_checkpoint(dino_2proc_accum / "checkpoint_0002.pth")
    assert state["iteration"] == 6 and torch.equal(state["fingerprints"][0], state["fingerprints"][1])
    logged = (dino_2proc_accum / "log.txt").read_text()
    assert "effective batch 32 (8 per process x 2 processes x 2 accumulation steps)" in logged


def test_accumulate_steps_below_1_or_above_an_epoch_is_refused(small_demo, tmp_path):
    with pytest.raises(C.ConfigError, match=r"train.accumulate_steps: 0"):
        tiny_cfg(small_demo, tmp_path, "train.accumulate_steps=0")
    with pytest.raises(ValueError, match=r"^train.accumulate_steps: 13 is more than the 12 batches of an epoch on each "
                       r"process; expected at most 12$"):  # fmt: skip
        train_dino.main(tiny_cfg(small_demo, tmp_path, "train.accumulate_steps=13"))


def test_bad_config_stops_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train_dino.py", "train.epoch=3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown key train.epoch; did you mean train.epochs?" in r.stderr


def learn_on_the_demo_data(preset: str, demo_set: Path, out: Path, *extra: str) -> C.DinoConfig:
    """The demo preset `preset` shortened to 4 epochs with 2 local crops, evaluated before and after: the teacher
    against its random initialisation, whose LayerScale of 1e-5 starts every image at nearly the same CLS feature
    (scores near chance, where colour statistics of a random network would otherwise give rank-1 near 8%)."""
    cfg = C.load(ROOT / "configs/demo" / preset, [
        f"data.train={{name: demo, root: {demo_set}}}", f"data.eval_set={{name: demo, root: {demo_set}}}",
        f"run.output_dir={out}", "model.layerscale=1e-5", "train.epochs=4", "train.warmup_epochs=1",
        "crops.local_crops_number=2", "eval.eval_every=4", "run.log_every=100", *extra,
    ], cls=C.DinoConfig)  # fmt: skip
    train_dino.main(cfg)
    start, end = read_jsonl(out / "log.jsonl", "eval")
    assert start["epoch"] == 0 and end["epoch"] == 4
    # Every threshold holds on run.seed 0 and 1 with a margin (the measurements are in each test's docstring).
    assert end["knn_top1"] > start["knn_top1"] + 0.04, (start, end)
    assert end["mAP"] > 1.6 * start["mAP"], (start, end)
    assert end["rank1"] > start["rank1"], (start, end)
    return cfg


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 45 s on 2 idle cores; several times that when other jobs share them
def test_dino_teacher_learns_on_the_demo_data(demo_set, tmp_path):
    """DINO v1 (configs/demo/dino.yaml), 4 epochs with 2 local crops from LayerScale 1e-5.

    Measured on 2026-12-02 (run.seed 0 / 1): kNN top-1 1.2 -> 10.1 / 1.2 -> 7.3%, mAP 1.2 -> 3.2 / 1.4 -> 2.8%,
    rank-1 0 -> 5.2 / 1.2 -> 1.6%. Before, this test ran the preset for 12 epochs from LayerScale 0 (3 minutes):
    rank-1 8.1 -> 11.3% on seed 0 but 7.3 -> 4.4% on seed 1, a gain over random features too small to tell apart.
    3 epochs are too few (2026-12-08, seed 0 / 1): kNN top-1 +8.5 / +5.2 points, mAP x2.75 / x1.92, but rank-1
    0 -> 6.0 / 1.2 -> 1.2%, no gain on seed 1."""
    learn_on_the_demo_data("dino.yaml", demo_set, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2 (dino.version v2)

V2 = ["dino.version=v2", "model.layerscale=1e-5", "train.layer_decay=0.9", "train.patch_embed_lr_mult=0.2"]


@pytest.mark.slow
def test_dinov2_two_cpu_processes_with_sinkhorn_keep_teacher_and_centres_identical(small_demo, tmp_path):
    """DDP over the masked student, Sinkhorn-Knopp targets reduced over both processes, the iBOT centre compared."""
    out = tmp_path / "run"
    extra = ["dino.centering=sinkhorn_knopp", "dino.separate_ibot_head=true", "model.num_register_tokens=1"]
    r = launch_two_processes(small_demo, out, *V2, *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    state = ckpt.load_checkpoint(out / "checkpoint_0002.pth")
    prints = state["fingerprints"]
    assert prints.shape == (2, 3) and torch.equal(prints[0], prints[1])
    assert "ibot_loss" in state and "mask_token" in state["teacher"]
    assert any(k.startswith("ibot_head.") for k in state["student"])
    assert not state["dino_loss"]["center"].any()  # Sinkhorn-Knopp: no centre
    records = read_jsonl(out / "log.jsonl", "train")
    assert records and {"dino", "ibot", "koleo", "loss"} <= set(records[0])
    assert all(r["ibot"] > 0 for r in records)


def test_dinov2_resume_gives_the_same_weights_and_ibot_centre(small_demo, tmp_path):
    train_dino.main(tiny_cfg(small_demo, tmp_path / "a", *V2))
    interrupted_copy(tmp_path / "a", tmp_path / "b")
    train_dino.main(tiny_cfg(small_demo, tmp_path / "b", *V2))
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint_0002.pth")
    assert a["ibot_loss"]["center"].abs().sum() > 0
    for net in ("student", "teacher", "dino_loss", "ibot_loss"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=0, atol=0, msg=f"{net}.{k}")
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 50 s on 2 idle cores; several times that when other jobs share them
def test_dinov2_teacher_learns_on_the_demo_data(demo_set, tmp_path):
    """DINOv2 (configs/demo/dinov2.yaml, whose LayerScale is 1e-5 already), 4 epochs with 2 local crops.

    Measured on 2026-12-02 (run.seed 0 / 1): kNN top-1 1.2 -> 10.1 / 1.2 -> 8.5%, mAP 1.2 -> 4.1 / 1.4 -> 3.3%,
    rank-1 0 -> 5.6 / 1.2 -> 2.0%; the full preset (16 epochs, 4 local crops) is what `make demo` runs. With
    crops.gpu_augment (2026-12-08, seed 0 / 1) rank-1 went 0 -> 6.5 / 1.2 -> 1.2%, no gain on seed 1 (the loader of
    these crops took 0.25 s instead of 1.0 s a batch of 64, but no whole run was measured faster): it stays on CPU."""
    cfg = learn_on_the_demo_data("dinov2.yaml", demo_set, tmp_path)
    first, last = read_jsonl(tmp_path / "log.jsonl", "epoch")[:: cfg.train.epochs - 1]
    assert {"dino", "ibot", "koleo"} <= set(last)
    assert last["koleo"] < first["koleo"] - 5  # the CLS features spread out over the sphere
