"""Reliability: crash-safe runs and hostile input, end to end. docs/reliability.md lists every guarantee with the test
proving it; the unit-level ones are in the files of the modules they test (test_checkpoint.py, test_config.py, ...).

Multi-process runs go through `bash train.sh cpu 2 ...` (gloo, 2 CPU processes) with tiny models (a 2-block 32-wide
ViT on 32x16 crops), so each takes seconds; the others call the scripts' `main(cfg)` in this process. The tiny runs,
their config builders and the launcher are in conftest.py.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DINO_2PROC, ROOT, dino_args, dino_cfg, launcher_env, recog_args, recog_cfg, train_sh
from PIL import Image

import train_dino
import train_recog
from dino_recog import checkpoint as ckpt
from dino_recog.data import datasets as ds
from dino_recog.engine import LoopOptions, NonFiniteLossError, train_one_epoch
from dino_recog.losses import DINOLoss
from dino_recog.models import DINOHead, MultiCropNet, build_backbone
from dino_recog.optim import build_optimizer, param_groups
from dino_recog.runlog import RunLog, read_jsonl
from dino_recog.tasks import DinoStep, DinoTask, ReIDStep, build_reid_task
from dino_recog.user_errors import user_errors


def mismatches(a: dict, b: dict) -> list[str]:
    """Keys whose tensors are not bit-identical."""
    return [k for k in a if not torch.equal(a[k], b[k])]


def same_dino_weights(a: Path, b: Path) -> list[str]:
    sa, sb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    return [f"{net}.{k}" for net in ("student", "teacher", "dino_loss") for k in mismatches(sa[net], sb[net])]


# ---------------------------------------------------------------------------------------------------------------------
# Runs shared by several tests (each test copies what it changes): dino_single and dino_2proc, in conftest.py


@pytest.fixture(scope="module")
def images(small_demo) -> Path:
    return small_demo / "lup" / "images"


# ---------------------------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL, elastic restarts


def descendants(pid: int) -> list[int]:
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def last_logged_step(log: Path) -> int:
    step = -1
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written
                continue
            if record.get("kind") == "train":
                step = max(step, record["step"])
    return step


def kill_at_step(script: str, args: list[str], out: Path, step: int, why: str) -> None:
    """Start `bash train.sh cpu 2 SCRIPT ARGS` in a session of its own, wait until its log shows iteration `step`, then
    SIGKILL its process group (the launcher's); check that the workers die with the launcher."""
    with open(out.parent / f"{out.name}-killed.log", "w") as fh:
        p = subprocess.Popen(["bash", "train.sh", "cpu", "2", script, *args], cwd=ROOT, env=launcher_env(), stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 600  # a hang guard only: a loaded machine may take minutes
        while last_logged_step(out / "log.jsonl") < step:
            assert p.poll() is None, f"{why}: the run ended (rc {p.returncode}) before iteration {step}"
            assert time.monotonic() < deadline, f"{why}: iteration {step} not reached in time"
            time.sleep(0.02)
        workers = descendants(p.pid)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(120)
        # torchrun starts each worker in a session of its own; they must not outlive the launcher (PR_SET_PDEATHSIG).
        deadline = time.monotonic() + 60
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [w for w in workers if alive(w)]
        assert not survivors, f"{why}: workers {survivors} outlived their killed launcher"
    finally:
        for pid in [p.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL


def kill_step(low: int, reference: Path) -> tuple[int, str]:
    """A random iteration from `low` to the last but one of the `reference` run, and the seed it came from
    (RELIABILITY_SEED=... replays a failure)."""
    high = len(read_jsonl(reference / "log.jsonl", "train")) - 2
    seed = int(os.environ.get("RELIABILITY_SEED", random.SystemRandom().randrange(2**31)))
    step = random.Random(seed).randint(low, high)
    return step, f"killed after iteration {step} of {high + 1} (RELIABILITY_SEED={seed})"


@pytest.mark.slow
def test_stage1_killed_at_a_random_step_resumes_to_the_same_weights(images, dino_2proc, tmp_path):
    out = tmp_path / "run"
    args = dino_args(images, out, *DINO_2PROC)
    # From iteration 5 on, the checkpoint after iteration 3 (the first, at step 4 of epoch 0) is complete.
    step, why = kill_step(5, dino_2proc)
    kill_at_step("train_dino.py", args, out, step, why)
    assert not (out / "checkpoint_0002.pth").exists(), why
    r = train_sh("cpu", 2, "train_dino.py", *args)
    assert r.returncode == 0, f"{why}\n{r.stderr[-4000:]}"
    assert "resumed from" in (out / "log.txt").read_text(), why
    assert same_dino_weights(dino_2proc / "checkpoint_0002.pth", out / "checkpoint_0002.pth") == [], why
    # keep_last=2 holds for end-of-epoch and mid-epoch checkpoints together; no temporary file of the killed save
    assert len(ckpt.list_checkpoints(out)) == 2 and not list(out.glob(".*tmp*")), sorted(os.listdir(out))


@pytest.mark.slow
def test_stage2_killed_at_a_random_step_resumes_to_the_same_weights(small_demo, tmp_path):
    extra = ["train.epochs=3", "run.save_every_steps=3", "run.keep_last=2"]  # 2 processes: 4 steps per epoch
    ref = tmp_path / "ref"
    r = train_sh("cpu", 2, "train_recog.py", *recog_args(small_demo / "market", ref, *extra))
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "run"
    args = recog_args(small_demo / "market", out, *extra)
    step, why = kill_step(4, ref)  # from iteration 4 on, the checkpoint after iteration 2 is complete
    kill_at_step("train_recog.py", args, out, step, why)
    assert not (out / "checkpoint_0003.pth").exists(), why
    r = train_sh("cpu", 2, "train_recog.py", *args)
    assert r.returncode == 0, f"{why}\n{r.stderr[-4000:]}"
    assert "resumed from" in (out / "log.txt").read_text(), why
    a, b = (ckpt.load_checkpoint(d / "checkpoint_0003.pth") for d in (ref, out))
    assert mismatches(a["state_dict"], b["state_dict"]) == [], why
    assert mismatches(ckpt.load_checkpoint(ref / "model.pth")["state_dict"],
                      ckpt.load_checkpoint(out / "model.pth")["state_dict"]) == [], why  # fmt: skip


@pytest.mark.slow
def test_elastic_restart_after_a_worker_dies_resumes_by_itself(images, dino_2proc, tmp_path):
    out = tmp_path / "run"
    # Rank 1 dies at iteration 9 (epoch 1), after the checkpoint at step 2 of epoch 1; torchrun restarts both.
    r = train_sh("cpu", 2, "tests/scripts/faults.py", "die", 9, *dino_args(images, out, *DINO_2PROC), MAX_RESTARTS="1")
    assert r.returncode == 0, r.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert f"resumed from {out / 'checkpoint_0001_000002.pth'} at epoch 1, step 2" in log, log[-2000:]
    assert same_dino_weights(dino_2proc / "checkpoint_0002.pth", out / "checkpoint_0002.pth") == []


def test_resume_skips_a_truncated_newest_checkpoint_and_continues_mid_epoch(images, dino_single, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(dino_single, out)
    (out / "checkpoint_0002.pth").unlink()
    newest = out / "checkpoint_0001_000008.pth"  # iteration 20: as if the process died while writing it
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    caplog.set_level(logging.INFO)
    train_dino.main(dino_cfg(images, out, "run.save_every_steps=5", "run.keep_last=20"))
    assert f"skipping unusable checkpoint: {newest}: not a readable checkpoint" in caplog.text
    assert f"resumed from {out / 'checkpoint_0001_000003.pth'} at epoch 1, step 3" in caplog.text
    assert same_dino_weights(dino_single / "checkpoint_0002.pth", out / "checkpoint_0002.pth") == []
    # log.jsonl: appended to, and read with the copied run's records after iteration 15 replaced by the repeats
    lines = (out / "log.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 24 + 9
    train = read_jsonl(out / "log.jsonl", "train")
    assert [r["step"] for r in train] == list(range(24))
    assert [r["loss"] for r in train] == [r["loss"] for r in read_jsonl(dino_single / "log.jsonl", "train")]
    assert [r["step"] for r in read_jsonl(out / "log.jsonl", "epoch")] == [12, 24]


def test_a_directory_of_unusable_checkpoints_is_an_error_not_a_fresh_start(images, dino_single, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_0001.pth").write_bytes(b"")
    shutil.copy(dino_single / "checkpoint_0002.pth", out / "checkpoint_0002.pth")
    state = ckpt.load_checkpoint(out / "checkpoint_0002.pth")
    torch.save({**state, "format_version": 99}, out / "checkpoint_0002.pth")
    with pytest.raises(ckpt.CheckpointError) as err:
        train_dino.main(dino_cfg(images, out))
    message = str(err.value)
    assert "no usable checkpoint among 2" in message and "checkpoint_0001.pth: not a readable checkpoint" in message
    assert "checkpoint_0002.pth: format_version 99, but this dino_recog reads format 1 to 1" in message


# ---------------------------------------------------------------------------------------------------------------------
# Crash safety: non-finite losses


def nan_from(call: int, monkeypatch) -> None:
    """Make the DINO loss NaN from its `call`-th evaluation (0-based) on."""
    forward, calls = DINOLoss.forward, [0]

    def faulty(self, *args, **kwargs):
        n, calls[0] = calls[0], calls[0] + 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if n >= call else loss

    monkeypatch.setattr(DINOLoss, "forward", faulty)


def test_nonfinite_loss_stops_naming_the_step_the_terms_and_the_last_good_checkpoint(
    images, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "run"
    nan_from(13, monkeypatch)  # iteration 13 is skipped (tolerance 1), iteration 14 stops the run
    with pytest.raises(NonFiniteLossError) as err:
        train_dino.main(dino_cfg(images, out, "run.save_every_steps=5", "run.skip_nonfinite_steps=1"))
    message = str(err.value)
    assert "non-finite DINO loss at epoch 1, iteration 14 (rank 0: loss nan)" in message, message
    assert "run.skip_nonfinite_steps=1 used up" in message
    assert f"last good checkpoint: {out / 'checkpoint_0001.pth'}" in message
    assert "iteration 13 (rank 0: loss nan): step skipped, no update (0 more tolerated)" in caplog.text
    # Nothing is written from the non-finite state: the step-15 checkpoint of epoch 1 (at step 3) never appears.
    assert [p.name for p in ckpt.list_checkpoints(out)][0] == "checkpoint_0001.pth"
    state = ckpt.load_checkpoint(out / "checkpoint_0001.pth")
    assert all(torch.isfinite(v).all() for net in ("student", "teacher", "dino_loss") for v in state[net].values())


def test_stage2_nonfinite_loss_names_every_loss_term(small_demo, tmp_path, monkeypatch):
    collate = ds.collate_skip_none

    def poisoned(batch):  # NaN pixels from the third batch on
        out, skipped = collate(batch)
        poisoned.n += 1
        if poisoned.n > 2:
            out[0].fill_(float("nan"))
        return out, skipped

    poisoned.n = 0
    monkeypatch.setattr(ds, "collate_skip_none", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite re-id loss at epoch 0, iteration 2 \(rank 0: loss nan, "
                       r"ce nan, triplet nan\).*last good checkpoint: none"):  # fmt: skip
        train_recog.main(recog_cfg(small_demo / "market", tmp_path))


def tiny_dino_pair() -> tuple[MultiCropNet, MultiCropNet]:
    torch.manual_seed(0)

    def net() -> MultiCropNet:
        backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
        return MultiCropNet(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))

    student, teacher = net(), net()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def test_a_skipped_step_changes_nothing_and_too_many_stop_the_run(tmp_path):
    """[b0, NaN batch, b1] with one skip tolerated ends bit-identical to [b0, b1]: no optimiser, EMA or centre update
    (NaN crops make the teacher output, hence the centre, NaN during the forward pass; it is put back)."""
    g = torch.Generator().manual_seed(1)

    def batch(fill: float | None = None):
        crops = [torch.randn(4, 3, 32, 16, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 8, generator=g)]
        if fill is not None:
            crops = [c.fill_(fill) for c in crops]
        return (crops, None, None, None), 0

    b0, bad, b1 = batch(), batch(float("nan")), batch()
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, freeze_last_layer=False)

    def run(batches, budget):
        student, teacher = tiny_dino_pair()
        loss_fn, opt = DINOLoss(64), build_optimizer("adamw", param_groups(student), 1e-3, 0.04)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = train_one_epoch(DinoTask(student, teacher, loss_fn), batches, opt, scaler, lambda it: step, 0,
                                RunLog(tmp_path, False), LoopOptions(len(batches), clip_grad=3.0,
                                                                      nonfinite_budget=budget))  # fmt: skip
        return stats, {**student.state_dict(), **{"t." + k: v for k, v in teacher.state_dict().items()},
                       "center": loss_fn.center}  # fmt: skip

    stats, skipped = run([b0, bad, b1], budget=1)
    _, plain = run([b0, b1], budget=0)
    assert stats["nonfinite_steps"] == 1 and mismatches(plain, skipped) == []
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, iteration 2 \(rank 0: loss nan\)"):
        run([b0, bad, bad], budget=1)


def test_a_nonfinite_micro_batch_skips_its_whole_accumulated_step(tmp_path):
    """accumulate_steps 2: [b0, b1 | NaN, b2 | b3, b4] with one skip tolerated ends bit-identical to
    [b0, b1 | b3, b4]: the step's earlier gradient, centre sums and buffers are dropped with it, its other batch is
    not trained on, and the data after it keeps its place."""
    g = torch.Generator().manual_seed(1)

    def batch(fill: float | None = None):
        crops = [torch.randn(4, 3, 32, 16, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 8, generator=g)]
        if fill is not None:
            crops = [c.fill_(fill) for c in crops]
        return (crops, None, None, None), 0

    b0, b1, bad, b2, b3, b4 = batch(), batch(), batch(float("nan")), batch(), batch(), batch()
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, freeze_last_layer=False)

    def run(batches, budget):
        student, teacher = tiny_dino_pair()
        loss_fn, opt = DINOLoss(64), build_optimizer("adamw", param_groups(student), 1e-3, 0.04)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = train_one_epoch(DinoTask(student, teacher, loss_fn), batches, opt, scaler, lambda it: step, 0,
                                RunLog(tmp_path, False), LoopOptions(len(batches) // 2, clip_grad=3.0,
                                                                      nonfinite_budget=budget,
                                                                      accumulate_steps=2))  # fmt: skip
        return stats, {**student.state_dict(), **{"t." + k: v for k, v in teacher.state_dict().items()},
                       "center": loss_fn.center}  # fmt: skip

    stats, skipped = run([b0, b1, bad, b2, b3, b4], budget=1)
    _, plain = run([b0, b1, b3, b4], budget=0)
    assert stats["nonfinite_steps"] == 1 and mismatches(plain, skipped) == []
    _, with_b2 = run([b0, b1, b2, b3], budget=0)
    assert mismatches(plain, with_b2)  # b2 would have changed the result


def test_stage2_skipped_step_restores_batchnorm_statistics(small_demo, tmp_path):
    cfg = recog_cfg(small_demo / "market", tmp_path, "model.drop_path_rate=0", "run.skip_nonfinite_steps=1")
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat_interleave(2)  # P=4 identities x K=2

    def batch(nan: bool = False):
        x = torch.full((8, 3, 32, 16), float("nan")) if nan else torch.randn(8, 3, 32, 16, generator=g)
        return (x, labels, labels, labels), 0

    b0, bad, b1 = batch(), batch(nan=True), batch()

    def run(batches, budget):
        torch.manual_seed(0)
        task = build_reid_task(cfg, num_classes=4)
        opt = build_optimizer("adamw", param_groups(task.model), 1e-3, 0.01)
        stats = train_one_epoch(task, batches, opt, torch.amp.GradScaler("cpu", enabled=False),
                                lambda it: ReIDStep(1e-3, it), 0, RunLog(tmp_path, False),
                                LoopOptions(len(batches), nonfinite_budget=budget))  # fmt: skip
        return stats, task.model.state_dict()

    stats, skipped = run([b0, bad, b1], budget=1)
    _, plain = run([b0, b1], budget=0)
    assert any("running_mean" in k for k in plain)  # the BN neck has statistics that NaN input would poison
    assert stats["nonfinite_steps"] == 1 and mismatches(plain, skipped) == []


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_with_the_same_error(images, tmp_path):
    out = tmp_path / "run"
    r = train_sh("cpu", 2, "tests/scripts/faults.py", "nan", 5, *dino_args(images, out, *DINO_2PROC))
    assert r.returncode != 0
    log = (out / "log.txt").read_text()  # rank 0's log: rank 0 itself stopped on rank 1's NaN, not on a lost peer
    assert "NonFiniteLossError: non-finite DINO loss at epoch 0, iteration 5 (rank 0: loss " in log, log[-3000:]
    assert "rank 1: loss nan)" in log and f"last good checkpoint: {out / 'checkpoint_0000_000004.pth'}" in log


# ---------------------------------------------------------------------------------------------------------------------
# Crash safety: the output directory


def test_output_dir_that_cannot_be_written_is_a_clear_error_before_any_work(images, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=r"run.output_dir .*a_file/run: cannot write there \(Not a directory\)"):
        train_dino.main(dino_cfg(images, tmp_path / "a_file" / "run"))
    if os.geteuid() != 0:  # root writes anywhere: only the case above applies to it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OSError, match=r"locked: cannot write there \(Permission denied\)"):
            train_dino.main(dino_cfg(images, locked))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(images, dino_single, tmp_path, monkeypatch):
    real_save, full = torch.save, ["checkpoint_0001.pth"]

    def disk_full(obj, f, *args, **kwargs):
        if any(name in str(getattr(f, "name", f)) for name in full):
            f.write(b"\x50\x4b\x03\x04 the first bytes of a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    cfg = dino_cfg(images, out, "run.save_every_steps=5", "run.keep_last=20")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*checkpoint_0001.pth: No space left on device; "
                       r"the previous one is intact"):  # fmt: skip
        train_dino.main(cfg)
    assert sorted(os.listdir(out)) == sorted([".lock", "checkpoint_0000_000005.pth", "checkpoint_0000_000010.pth",
                                              "config.yaml", "log.jsonl", "log.txt", "tb"])  # fmt: skip
    assert same_dino_weights(dino_single / "checkpoint_0000_000010.pth", out / "checkpoint_0000_000010.pth") == []
    # the same for a file that is overwritten in place (model.pth, teacher_backbone.pth): the old content stays
    ckpt.save_checkpoint({"w": torch.ones(2)}, tmp_path / "model.pth")
    full.append("model.pth")
    with pytest.raises(OSError, match="could not write checkpoint .*model.pth: No space left on device"):
        ckpt.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "model.pth")
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "model.pth")["w"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp*"))
    # space freed: the run resumes and ends as if nothing had happened
    monkeypatch.setattr(torch, "save", real_save)
    train_dino.main(cfg)
    assert same_dino_weights(dino_single / "checkpoint_0002.pth", out / "checkpoint_0002.pth") == []


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib)`: a tmpfs of that size mounted at tmp_path/disk (unmounted after the test): a real file system
    that fills, which a mock of torch.save raising OSError is not. Skipped where this process cannot mount one."""
    mounted = []

    def mount(kib: int) -> Path:
        where = tmp_path / "disk"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system is full; returns it."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return ballast


@pytest.mark.slow  # three tiny runs
def test_disk_full_on_a_real_file_system_is_one_line_and_leaves_nothing_behind(images, dino_single, small_disk,
                                                                               capsys):  # fmt: skip
    """Room for one checkpoint of the tiny run and not two: torch.save on a full disk raises a RuntimeError ("unexpected
    pos"), not an OSError; the run stops with one line naming the last good checkpoint and leaves no temporary file;
    a retry on the full disk stops in one line before it writes anything (config.yaml stays whole); with space, it
    resumes."""
    size = (dino_single / "checkpoint_0000_000005.pth").stat().st_size
    disk = small_disk(size * 3 // 2 // 1024 + 128)  # + logs, config, tensorboard events
    out = disk / "run"
    cfg = dino_cfg(images, out, "run.save_every_steps=5", "run.keep_last=20")

    def run() -> str:
        with pytest.raises(SystemExit) as stop, user_errors():
            train_dino.main(cfg)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
        last = err.splitlines()[-1]
        return last[last.index("error: "):]  # after the progress bar the error cut short

    assert run() == (f"error: could not write checkpoint {out}/checkpoint_0000_000010.pth: No space left on device; "
                     f"the previous one is intact; the run stopped; last good checkpoint: "
                     f"{out}/checkpoint_0000_000005.pth")  # fmt: skip
    assert sorted(os.listdir(out)) == [".lock", "checkpoint_0000_000005.pth", "config.yaml", "log.jsonl", "log.txt",
                                       "tb"]  # fmt: skip
    config = (out / "config.yaml").read_bytes()
    ballast = fill(disk)
    assert run() == f"error: run.output_dir {out}: no space left on its file system; free some and rerun " \
                    "(run.resume=auto continues from the last checkpoint)"  # fmt: skip
    assert (out / "config.yaml").read_bytes() == config and not list(out.glob(".*tmp*"))
    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # a limit: tmpfs takes what it holds
    train_dino.main(cfg)  # space freed: it resumes and ends as if nothing had happened
    assert same_dino_weights(dino_single / "checkpoint_0002.pth", out / "checkpoint_0002.pth") == []


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: data


def write_hostile_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Odd but valid images (decoded to RGB and trained on) and broken ones (skipped while training)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    odd = {
        "alpha.png": Image.fromarray(rng.integers(0, 256, (64, 32, 4), dtype=np.uint8), "RGBA"),
        "gray.jpg": Image.fromarray(rng.integers(0, 256, (64, 32), dtype=np.uint8), "L"),
        "cmyk.jpg": Image.new("CMYK", (32, 64), (0, 255, 255, 0)),
        "deep16.png": Image.fromarray(rng.integers(0, 65536, (64, 32), dtype=np.uint16)),
        "one_pixel.jpg": Image.new("RGB", (1, 1), (200, 30, 30)),
    }
    for name, img in odd.items():
        img.save(folder / name)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    broken = {"truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2], "empty.jpg": b"",
              "text.jpg": b"this is not an image\n"}  # fmt: skip
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    # 10000 x 10000: over Pillow's decompression-bomb limit, refused before its pixels are decoded
    Image.new("1", (10000, 10000)).save(folder / "huge.png")
    return [folder / n for n in odd], [folder / n for n in [*broken, "huge.png"]]


def test_training_on_images_none_of_which_decodes_stops_instead_of_finishing_with_loss_0(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):  # two batches of 8, every file text named .jpg
        (folder / f"{i:02d}.jpg").write_text("not an image")
    with pytest.raises(ds.CorruptImageError, match=r"^epoch 0: no training image could be decoded \(16 skipped, "
                                                   r"each named in a warning above\); check the files of data.train$"):
        train_dino.main(dino_cfg(folder, tmp_path / "run", "train.epochs=1"))
    assert not ckpt.list_checkpoints(tmp_path / "run")  # no "finished" epoch written


def test_training_skips_and_counts_broken_images_and_reads_odd_ones(small_demo, tmp_path):
    folder = tmp_path / "images"
    odd, broken = write_hostile_images(folder)
    for src in sorted((small_demo / "lup" / "images").rglob("*.jpg"))[:31]:  # 31 + 5 + 4 = 5 batches of 8
        shutil.copy(src, folder / f"good_{src.name}")
    # one DataLoader worker: the images are read in another process, whose warnings reach the run's log too
    train_dino.main(dino_cfg(folder, tmp_path / "run", "train.epochs=1", "data.num_workers=1"))
    (epoch,) = read_jsonl(tmp_path / "run" / "log.jsonl", "epoch")
    assert epoch["skipped_images"] == len(broken) == 4  # every broken image, once; none of the odd ones
    log = (tmp_path / "run" / "log.txt").read_text()
    for path in broken:
        assert f"skipping a training image: cannot read image {path}" in log or f"image: {path}: 10000x10000" in log
    assert "huge.png: 10000x10000 pixels exceeds Image.MAX_IMAGE_PIXELS" in log
    assert "epoch 0: skipped 4 undecodable training images" in log
    for path in odd:
        img = ds.read_image(path)
        assert img.mode == "RGB" and min(img.size) >= 1


def test_training_on_file_names_that_are_not_utf8_logs_them_escaped(small_demo, tmp_path, capfd):
    """Names with bytes that are not UTF-8 (an image that reads, one that does not): each logged line holding one used
    to be a logging traceback (UnicodeEncodeError) in place of the line, the run going on; now the line is written,
    the name escaped (\\udcff), and the image that reads is trained on."""
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted((small_demo / "lup" / "images").rglob("*.jpg"))[:15]:  # 15 + 1 readable = 2 batches of 8
        shutil.copy(src, folder / src.name)
    shutil.copy(src, os.fsencode(folder) + b"/\xff\xfe.jpg")
    (Path(os.fsdecode(os.fsencode(folder) + b"/\xfe_broken.jpg"))).write_bytes(b"not a JPEG")
    train_dino.main(dino_cfg(folder, tmp_path / "run", "train.epochs=1"))
    (epoch,) = read_jsonl(tmp_path / "run" / "log.jsonl", "epoch")
    assert epoch["skipped_images"] == 1  # the broken one only
    err = capfd.readouterr().err
    assert "Logging error" not in err and "UnicodeEncodeError" not in err, err[-3000:]
    log = (tmp_path / "run" / "log.txt").read_text(encoding="utf-8")  # still UTF-8
    assert f"skipping a training image: cannot read image {folder}/\\udcfe_broken.jpg" in log


def test_evaluation_refuses_a_broken_image_naming_it(small_demo, tmp_path):
    market = tmp_path / "market"
    shutil.copytree(small_demo / "market", market)
    victim = sorted((market / "query").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ds.CorruptImageError, match=f"cannot read image {victim}"):
        train_recog.main(recog_cfg(market, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoint*"))  # it stopped at the evaluation before training


def test_data_that_is_missing_empty_or_misnamed_fails_before_any_work(small_demo, tmp_path):
    with pytest.raises(ds.DatasetLayoutError, match=f"missing folder {tmp_path / 'nowhere'}"):
        train_dino.main(dino_cfg(tmp_path / "nowhere", tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.DatasetLayoutError, match=f"no images .* under {tmp_path / 'empty'}"):
        train_dino.main(dino_cfg(tmp_path / "empty", tmp_path / "b"))
    few = tmp_path / "few"
    few.mkdir()
    for src in sorted((small_demo / "lup" / "images").rglob("*.jpg"))[:5]:
        shutil.copy(src, few / src.name)
    with pytest.raises(ValueError, match=r"data.train: 5 images in .*few is fewer than one batch \(8 per process"):
        train_dino.main(dino_cfg(few, tmp_path / "c"))
    market = tmp_path / "market"
    shutil.copytree(small_demo / "market", market)
    (market / "bounding_box_train" / "person_42.jpg").write_bytes(b"")
    with pytest.raises(ds.DatasetLayoutError, match=r"cannot parse identity and camera from .*person_42.jpg; expected"):
        train_recog.main(recog_cfg(market, tmp_path / "d"))
    (market / "bounding_box_train" / "person_42.jpg").unlink()
    shutil.rmtree(market / "query")
    with pytest.raises(ds.DatasetLayoutError, match=f"missing folder {market / 'query'}"):
        train_recog.main(recog_cfg(market, tmp_path / "e"))


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: checkpoints


class Payload:
    """Unpickling this runs `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's remark on the bare pickle, refused anyway
def test_a_crafted_pickle_is_refused_by_every_loader_and_runs_nothing(images, small_demo, tmp_path):
    from dino_recog.extract import FeatureExtractor, load_model

    marker = tmp_path / "pwned"
    weights = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    evil = {**weights.state_dict(), "format_version": 1, "x": Payload(open, str(marker), "w")}
    evil_zip, evil_pickle = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save(evil, evil_zip)  # torch's zip format
    with open(evil_pickle, "wb") as fh:  # a bare pickle, as an old-style or hand-made file would be
        pickle.dump({"model": evil, "spec": Payload(os.system, f"touch {marker}")}, fh)
    backbone = {"name": "vit_small", "img_size": (32, 16), "patch_size": 8, "depth": 2, "embed_dim": 32,
                "num_heads": 2}  # fmt: skip

    def loaders(path: Path, resume_dir: Path) -> dict:
        return {
            "load_checkpoint": lambda: ckpt.load_checkpoint(path),
            "load_backbone_weights": lambda: ckpt.load_backbone_weights(weights, path),
            "load_reid_model": lambda: ckpt.load_reid_model(path),
            "load_feature_model": lambda: ckpt.load_feature_model(path, backbone),
            "extract.load_model": lambda: load_model(path, backbone),
            "FeatureExtractor": lambda: FeatureExtractor(path, "cpu", backbone=backbone),
            "run.resume=PATH": lambda: train_dino.main(dino_cfg(images, tmp_path / "r1", f"run.resume={path}")),
            "run.resume=auto": lambda: train_dino.main(dino_cfg(images, resume_dir)),
            "model.pretrained": lambda: train_recog.build_model(
                recog_cfg(small_demo / "market", tmp_path / "r2", f"model.pretrained={path}"), 30),
            "loss.distill_teacher": lambda: build_reid_task(
                recog_cfg(small_demo / "market", tmp_path / "r3", "loss.distill_weight=1",
                          f"loss.distill_teacher={path}"), 30),
        }  # fmt: skip

    expected = {evil_zip: "io.open", evil_pickle: "io.open, posix.system"}  # open() pickles as io.open
    for path in (evil_zip, evil_pickle):
        resume_dir = tmp_path / f"resume_{path.stem}"
        resume_dir.mkdir()
        in_dir = resume_dir / "checkpoint_0001.pth"
        shutil.copy(path, in_dir)
        for name, load in loaders(path, resume_dir).items():
            where = in_dir if name == "run.resume=auto" else path
            with pytest.raises(ckpt.CheckpointError) as refused:
                load()
            # one line naming the global the file asked for (torch's own text is 20 lines about PyTorch 2.6)
            assert (f"{where}: refused: it asks to load the Python object {expected[path]}, which a file of weights "
                    "never needs; nothing in it was run") in str(refused.value)  # fmt: skip
            assert "PyTorch" not in str(refused.value)
            assert not marker.exists(), f"{name} ran the payload of {path.name}"
    torch.load(evil_zip, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input: the launcher


@pytest.fixture
def two_gpu_python(tmp_path) -> str:
    """A stand-in for the interpreter that train.sh asks how many GPUs there are: this machine 'has' two."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 2\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize(
    "gpus, nproc, message",
    [
        ("0,5", 1, "GPU id 5 does not exist: this machine has 2 GPU(s), ids 0 to 1"),
        ("2", 1, "GPU id 2 does not exist: this machine has 2 GPU(s), ids 0 to 1"),
        ("1,1", 2, "GPU id 1 is given twice in '1,1'; each process needs a GPU of its own"),
        ("0,1", 3, "NPROC=3 is larger than the 2 GPU id(s) given in '0,1'"),
    ],
)
def test_launcher_refuses_gpus_that_do_not_exist(two_gpu_python, gpus, nproc, message):
    r = subprocess.run(["bash", "train.sh", gpus, str(nproc), "train_dino.py"], cwd=ROOT, capture_output=True,
                       text=True, env={**launcher_env(), "PYTHON": two_gpu_python, "DRY_RUN": "1"})  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == f"train.sh: {message}"
    ok = subprocess.run(["bash", "train.sh", "0,1", "2", "train_dino.py"], cwd=ROOT, capture_output=True, text=True,
                        env={**launcher_env(), "PYTHON": two_gpu_python, "DRY_RUN": "1"})  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.startswith("CUDA_VISIBLE_DEVICES=0,1 ")


@pytest.mark.slow
def test_launcher_refuses_a_rendezvous_port_in_use(tmp_path):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        multi = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DRY_RUN": "1"}
        r = train_sh("cpu", 2, "train_dino.py", **multi)
        assert r.returncode == 2
        assert r.stderr.strip() == (f"train.sh: MASTER_PORT={port} is already in use on this machine (node 0 hosts the "
                                    f"rendezvous there); choose a free port, e.g. MASTER_PORT={port + 1}")  # fmt: skip
        # a single-node run does not use MASTER_PORT: torchrun --standalone picks a free port itself
        single = train_sh("cpu", 2, "tests/scripts/dist_check.py", tmp_path, MASTER_PORT=str(port))
        assert single.returncode == 0, single.stderr[-3000:]
    assert train_sh("cpu", 2, "train_dino.py", **multi).returncode == 0  # the port is free again


# ---------------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_the_same_loss_curve(images, dino_single, tmp_path):
    def curve(out: Path) -> list[float]:
        return [r["loss"] for r in read_jsonl(out / "log.jsonl", "train")]

    train_dino.main(dino_cfg(images, tmp_path / "again", "run.save_every_steps=5", "run.keep_last=20"))
    assert len(curve(dino_single)) == 24 and curve(tmp_path / "again") == curve(dino_single)
    train_dino.main(dino_cfg(images, tmp_path / "seed1", "run.seed=1", "train.epochs=1", "train.warmup_epochs=0"))
    assert curve(tmp_path / "seed1") != curve(dino_single)[:12]
