"""Sharded checkpoints (dino_recog/sharded.py, `run.checkpoint_format: sharded`): a DCP directory that round-trips
the parts and optimisers, is atomic at the directory level, and whose metadata is read without running anything."""

import os
import pickle

import pytest
import torch
import torch.nn as nn

from dino_recog import checkpoint as ckpt
from dino_recog import sharded


def _net(width: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2))
    return net, torch.optim.AdamW(net.parameters(), lr=0.1)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net, opt = _net()
    for _ in range(2):
        net(torch.rand(5, 4)).sum().backward()
        opt.step()
    del opt.state[net[1].bias]  # a parameter without optimiser state yet (DINO's frozen last layer)
    return net, opt


def _save(path, net, opt, **state):
    return sharded.save_sharded(path, {"net": net}, {"optimizer": (net, opt)}, {"epoch": 1, "rng": [], **state})


def test_a_sharded_checkpoint_round_trips_weights_and_optimiser_state(tmp_path):
    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt, note="kept")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "state.pth"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0001.dcp"]  # no temporary directory left
    state = ckpt.load_training_state(path)
    assert state["epoch"] == 1 and state["note"] == "kept" and state["net"] is None and state["optimizer"] is None
    net2, opt2 = _net()
    sharded.load_sharded(path, state, {"net": net2}, {"optimizer": (net2, opt2)})
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() == {0, 1, 2}  # the one without state stays without
    for i, s in a["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_another_architecture_lists_each_mismatched_tensor(tmp_path):
    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    other, other_opt = _net(width=5)
    with pytest.raises(ckpt.CheckpointError, match=r"mismatched keys:\n  net\.0\.weight: checkpoint \(3, 4\) vs model "
                       r"\(5, 4\)"):  # fmt: skip
        sharded.load_sharded(path, ckpt.load_training_state(path), {"net": other}, {"optimizer": (other, other_opt)})


class _RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_crafted_metadata_is_refused_without_running_it(tmp_path, monkeypatch):
    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    meta = pickle.loads((path / ".metadata").read_bytes())
    meta.storage_meta = _RunsCode()  # plain pickle.load (DCP's own reader) would run `touch pwned`
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"refused: it asks to load the Python object (posix|os)\.system.*"
                       "nothing in it was run"):  # fmt: skip
        ckpt.load_training_state(path)
    assert not (tmp_path / "pwned").exists()
    # auto-resume reports it and does not pick it
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint among 1"):
        ckpt.latest_checkpoint(tmp_path)


def test_metadata_with_a_pickled_entry_or_a_path_outside_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    original = (path / ".metadata").read_bytes()
    meta = pickle.loads(original)
    meta.state_dict_metadata["model.blob"] = BytesStorageMetadata()  # DCP would torch.load it, weights_only=False
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=r"entries that are not tensors \(model\.blob\)"):
        sharded.read_metadata(path)
    meta = pickle.loads(original)
    next(iter(meta.storage_data.values())).relative_path = "../../etc/passwd"
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="points at '../../etc/passwd'"):
        sharded.read_metadata(path)


def test_a_half_written_sharded_checkpoint_is_never_resumed_and_is_pruned(tmp_path, caplog):
    net, opt = _trained()
    _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    # a run killed while its ranks wrote checkpoint 2: the temporary directory of a dead process (pid 2**22 + 1 is
    # above Linux's pid_max default), and a copy of a checkpoint that lost its .metadata
    dead = tmp_path / f".checkpoint_0002.dcp.tmp-{2**22 + 1}"
    _save(dead, net, opt)
    (dead / ".metadata").unlink()
    broken = tmp_path / "checkpoint_0002_000003.dcp"
    _save(broken, net, opt)
    (broken / ".metadata").unlink()
    assert ckpt.list_checkpoints(tmp_path) == [broken, tmp_path / "checkpoint_0001.dcp"]
    path, state = ckpt.latest_checkpoint(tmp_path, ("net", "optimizer", "epoch"))
    assert path == tmp_path / "checkpoint_0001.dcp" and state["epoch"] == 1
    assert "not a complete sharded checkpoint (no .metadata)" in caplog.text
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0002_000003.dcp"]


@pytest.mark.parametrize("failing", ["dcp.save", "mkdir"])
def test_a_failed_sharded_save_leaves_nothing_and_keeps_the_previous_one(failing, tmp_path, monkeypatch):
    import pathlib

    import torch.distributed.checkpoint as dcp

    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    before = (path / "state.pth").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(*((dcp, "save") if failing == "dcp.save" else (pathlib.Path, "mkdir")), full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*0001\.dcp: rank 0: .*No space left on device"):
        _save(path, net, opt, epoch=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0001.dcp"]
    assert (path / "state.pth").read_bytes() == before


def test_saving_again_under_the_same_name_replaces_the_whole_directory(tmp_path):
    net, opt = _trained()
    path = _save(tmp_path / "checkpoint_0001.dcp", net, opt)
    with torch.no_grad():
        net[0].weight.add_(1)
    _save(path, net, opt, epoch=7)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0001.dcp"]
    state = ckpt.load_training_state(path)
    net2, opt2 = _net()
    sharded.load_sharded(path, state, {"net": net2}, {"optimizer": (net2, opt2)})
    assert state["epoch"] == 7 and torch.equal(net2[0].weight, net[0].weight)
