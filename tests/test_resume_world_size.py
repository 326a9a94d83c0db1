"""Resuming on another number of processes: the epoch continues after the samples already trained on, at the step
of the new global batch, with the change of batch and lr in the log; sharded (DCP) checkpoints reshard on load and
resume bit-identically on the number of processes that wrote them."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DINO_2PROC, dino_cfg
from test_fsdp import two_processes  # conftest's 2-process stage 1 through train.sh

from dino_recog.data.samplers import ResumableDistributedSampler, SeededBatches
from dino_recog.runlog import read_jsonl

SHARDED = ["run.parallel=fsdp", "run.checkpoint_format=sharded"]
MID = "checkpoint_0001_000002"  # DINO_2PROC: 6 steps an epoch, a checkpoint every 4 iterations: epoch 1, step 2


def _epoch(world: int, rank: int, consumed: int = 0, epoch: int = 3) -> list[int]:
    s = ResumableDistributedSampler(list(range(50)), world, rank, seed=7)
    batches = SeededBatches(torch.utils.data.BatchSampler(s, 4, drop_last=True), seed=7, rank=rank)
    batches.set_epoch(epoch, 0, consumed)
    return [i for batch in batches for i, _ in batch]


@pytest.mark.parametrize("new_world", [1, 3])
def test_the_rest_of_an_epoch_on_another_number_of_processes_is_the_samples_not_yet_trained_on(new_world):
    whole = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 3)).tolist()  # the epoch's permutation
    # 2 processes trained 2 batches of 4 each: 16 samples, the first 16 of the permutation
    trained = [i for rank in range(2) for i in _epoch(2, rank)[:8]]
    assert sorted(trained) == sorted(whole[:16])
    rest = [i for rank in range(new_world) for i in _epoch(new_world, rank, consumed=16)]
    assert len(rest) == len(set(rest)) and not set(rest) & set(trained)  # nothing twice
    # everything else, but the few of an incomplete last batch per process
    assert set(rest) <= set(whole[16:]) and len(whole) - 16 - len(rest) < new_world * 4 + new_world
    assert _epoch(2, 0) == _epoch(2, 0, consumed=0)  # a whole epoch is DistributedSampler's


@pytest.fixture(scope="module")
def dino_sharded(small_demo, tmp_path_factory) -> Path:
    """conftest's dino_2proc run (2 CPU processes, 12 steps, a checkpoint every 4), FSDP with sharded checkpoints."""
    out = tmp_path_factory.mktemp("dino_sharded")
    two_processes(small_demo, out, *SHARDED)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is")  # one process, by intent
        tree = _load_state_dict_from_keys(storage_reader=dcp.FileSystemReader(path))
    flat, todo = {}, [("", tree)]
    while todo:
        prefix, node = todo.pop()
        for k, v in node.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            else:
                flat[f"{prefix}{k}"] = v
    return flat


@pytest.mark.slow
def test_sharded_checkpoints_are_directories_and_resume_bit_identically_ontwo_processes(dino_sharded, small_demo,
                                                                                          tmp_path):  # fmt: skip
    assert sorted(p.name for p in dino_sharded.glob("checkpoint_*")) == [f"{MID}.dcp", "checkpoint_0002.dcp"]
    assert not list(dino_sharded.glob(".checkpoint_*"))  # no temporary directory left
    assert (dino_sharded / "teacher_backbone.pth").is_file()  # the export stays one file of full tensors
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(dino_sharded / f"{MID}.dcp", out / f"{MID}.dcp")
    two_processes(small_demo, out, *SHARDED)
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = _tensors(dino_sharded / "checkpoint_0002.dcp"), _tensors(out / "checkpoint_0002.dcp")
    assert a.keys() == b.keys() and any(k.startswith("optim.optimizer.") for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["sharded", "ddp"])
def test_a_two_process_checkpoint_resumes_on_one_process_after_the_samples_trained_on(origin, dino_sharded,
                                                                                      dino_2proc, small_demo,
                                                                                      tmp_path):  # fmt: skip
    """Epoch 1 was 2 steps in on 2 processes x 8 = 32 samples: on 1 process (12 steps an epoch) it continues at
    step 32 / 8 = 4, so 8 steps of epoch 1 and 12 of epoch 2 are left; the log says why."""
    import train_dino

    source = dino_sharded / f"{MID}.dcp" if origin == "sharded" else dino_2proc / f"{MID}.pth"
    out = tmp_path / "run"
    out.mkdir()
    (shutil.copytree if source.is_dir() else shutil.copy)(source, out / source.name)
    train_dino.main(dino_cfg(small_demo / "lup" / "images", out, *DINO_2PROC, *SHARDED[:1]))
    text = (out / "log.txt").read_text()
    assert (f"{source.name} was written by 2 processes (global batch 16), this run has 1 (global batch 8): it "
            "continues at epoch 1, step 4 of 12 (after the 32 samples of the epoch already trained on); the peak lr "
            "follows the linear scaling rule: 3.125e-05 -> 1.5625e-05") in text  # fmt: skip
    steps = [r["step"] for r in read_jsonl(out / "log.jsonl", "train")]
    assert steps == list(range(12 + 4, 24))
    assert (out / "checkpoint_0002.pth").is_file()  # one process: nothing to shard, the full format (auto)
