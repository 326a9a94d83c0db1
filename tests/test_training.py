"""The checkpoint cycle shared by both stages (dino_recog/training.py): what a checkpoint holds and how it resumes,
also from the layout written before the task modules."""

from pathlib import Path

import pytest
import torch

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog.optim import build_optimizer
from dino_recog.tasks import build_dino_task, build_reid_task
from dino_recog.training import TrainingRun

ROOT = Path(__file__).resolve().parents[1]
VIT = ["model.arch=vit_small", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8"]


def reid_run(out: Path, *extra: str, seed: int = 0) -> TrainingRun:
    cfg = C.load(ROOT / "cfg_recog.yaml", [*VIT, "model.pretrained=", "aug.size=[32,16]", f"run.output_dir={out}",
                                           "loss.cosface_weight=0.5", "loss.center_weight=0.0005", *extra],
                 cls=C.RecogConfig)  # fmt: skip
    torch.manual_seed(seed)
    task = build_reid_task(cfg, num_classes=4)
    opts = {"optimizer": build_optimizer("adamw", task.param_groups(), 1e-3, 0.01)}
    sharded = ()
    if task.shards():
        sharded = ("partial_fc_optimizer",)
        opts[sharded[0]] = build_optimizer("sgd", task.shard_param_groups(), 1e-3, 0.01)
    opts.update(zip(["center_optimizer"], task.extra_optimizers()))
    return TrainingRun(cfg, task, opts, steps_per_epoch=5, sharded=sharded,
                       extra=lambda: {"kind": "reid_model", "best": {"mAP": 0.1}})  # fmt: skip


def states(run: TrainingRun) -> dict[str, torch.Tensor]:
    parts = run.task.parts()
    flat = {f"model.{k}": v for k, v in parts["state_dict"].state_dict().items()}
    for name, m in parts["losses"].items():
        flat.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    return flat


def test_a_checkpoint_holds_every_part_and_resumes_them(tmp_path):
    a = reid_run(tmp_path, seed=1)
    a.nonfinite = 1
    path = a.save(2, step_in_epoch=3)
    state = ckpt.load_checkpoint(path)
    assert {"state_dict", "losses", "optimizer", "center_optimizer", "scaler", "config", "rng"} <= set(state)
    assert set(state["losses"]) == {"ce", "triplet", "cosface", "center"}
    assert (state["epoch"], state["step_in_epoch"], state["iteration"], state["nonfinite_steps"]) == (2, 3, 13, 1)
    assert state["kind"] == "reid_model" and state["best"] == {"mAP": 0.1}
    b = reid_run(tmp_path, seed=2)  # other random weights, then the checkpoint's
    assert any(not torch.equal(v, states(a)[k]) for k, v in states(b).items())
    assert b.resume() is not None
    assert all(torch.equal(v, states(a)[k]) for k, v in states(b).items())
    assert (b.start_epoch, b.start_step, b.nonfinite, b.last_saved) == (2, 3, 1, path)


def test_a_checkpoint_of_the_layout_before_the_task_modules_resumes(tmp_path):
    """Stage-2 checkpoints written before the task modules have an empty centre optimiser when the centre loss is
    off, no skip count and no fingerprints: they resume."""
    a = reid_run(tmp_path, "loss.center_weight=0", seed=1)
    path = a.save(1)
    state = ckpt.load_checkpoint(path)
    for key in ("nonfinite_steps", "fingerprints"):
        state.pop(key, None)
    state["center_optimizer"] = {}
    ckpt.save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, path)
    b = reid_run(tmp_path, "loss.center_weight=0", seed=2)
    assert b.resume() is not None and b.nonfinite == 0 and b.start_epoch == 1
    assert all(torch.equal(v, states(a)[k]) for k, v in states(b).items())


def test_resume_refuses_loss_state_the_config_does_not_switch_on(tmp_path):
    reid_run(tmp_path).save(1)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_0001.pth: has a cosface loss, which the config does "
                       r"not switch on"):  # fmt: skip
        reid_run(tmp_path, "loss.cosface_weight=0", "run.resume_changed=allow").resume()


def test_sharded_classifiers_are_saved_per_rank_and_resume_only_on_that_many_processes(tmp_path, monkeypatch):
    a = reid_run(tmp_path, "loss.partial_fc=true", seed=1)
    path = a.save(1, step_in_epoch=2)
    shard = ckpt.load_checkpoint(ckpt.shard_path(path, 0, 1))
    assert set(shard["shards"]) == {"ce", "cosface"} and shard["partial_fc_optimizer"]["param_groups"]
    b = reid_run(tmp_path, "loss.partial_fc=true", seed=2)
    assert b.resume() is not None
    for name, module in b.shards.items():
        assert torch.equal(module.weight, a.shards[name].weight), name
    monkeypatch.setattr("dino_recog.distributed.get_world_size", lambda: 3)  # as if relaunched with 3 processes
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_0001_000002.pth: its sharded classifiers \(ce, "
                       r"cosface\) were written by 1 processes, this run has 3; a Partial FC run resumes on the number "
                       r"of processes that wrote it: 1"):  # fmt: skip
        b.resume()
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match=r"head.classifier.weight: missing from the checkpoint\nconfig keys "
                       r"changed since that checkpoint: loss.partial_fc True -> False"):  # fmt: skip
        reid_run(tmp_path, "run.resume_changed=allow").resume()
    ckpt.shard_path(path, 0, 1).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_0001_000002.rank0-of-1.pth: checkpoint not found"):
        reid_run(tmp_path, "loss.partial_fc=true").resume()


def test_dino_checkpoint_keys_are_the_parts(tmp_path):
    cfg = C.load(ROOT / "cfg_dino.yaml", [*VIT, "model.out_dim=16", "model.hidden_dim=16", "model.bottleneck_dim=8",
                                          "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]",
                                          f"run.output_dir={tmp_path}"], cls=C.DinoConfig)  # fmt: skip
    task = build_dino_task(cfg)
    run = TrainingRun(cfg, task, {"optimizer": build_optimizer("adamw", task.param_groups(), 0.0, 0.04)}, 4)
    state = ckpt.load_checkpoint(run.save(1))
    assert {"student", "teacher", "dino_loss", "optimizer", "scaler"} <= set(state)
    assert set(state["teacher"]) == set(task.teacher.state_dict())


def test_resume_refuses_a_config_that_changes_the_schedule_and_names_the_keys(tmp_path):
    """A mid-epoch checkpoint resumed with another batch size used to train 0 steps and rewrite the epoch's files."""
    run = reid_run(tmp_path)
    path = run.save(1, 3)
    (tmp_path / "config.yaml").write_text("the run's own config\n")
    with pytest.raises(ckpt.CheckpointError) as refused:
        reid_run(tmp_path, "data.num_instances=2", "train.lr=0.1", "data.num_workers=1", "eval.flip=false").resume()
    assert str(refused.value) == (
        f"{path}: the config changed since this checkpoint in keys that change the schedule or the data order: "
        "data.num_instances 4 -> 2, train.lr 0.0004 -> 0.1; resume with the checkpoint's values, start another "
        "run.output_dir, or set run.resume_changed=allow to continue anyway")  # fmt: skip
    assert (tmp_path / "config.yaml").read_text() == "the run's own config\n"  # a refused start leaves it
    # what only changes speed, logging or evaluation resumes; and with resume_changed=allow, anything
    assert reid_run(tmp_path, "data.num_workers=1", "eval.flip=false", "run.log_every=7").resume() is not None
    assert reid_run(tmp_path, "train.lr=0.1", "run.resume_changed=allow").resume() is not None
    assert C.load(tmp_path / "config.yaml", [], cls=C.RecogConfig).train.lr == 0.1  # written once it started


def test_resume_with_another_architecture_also_names_the_changed_keys(tmp_path):
    reid_run(tmp_path).save(1)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)mismatch.*\nconfig keys changed since that checkpoint: "
                                                   r"model.depth 1 -> 2"):  # fmt: skip
        reid_run(tmp_path, "model.depth=2").resume()


def test_switching_between_ddp_and_fsdp_on_resume_is_not_a_change_of_the_run():
    """Both write and read the same full-state checkpoints (dino_recog.parallel): the schedule and data stay."""
    from dino_recog.config.diff import changed_keys, unsafe_changes

    stored = {"run": {"parallel": "ddp", "fsdp_cpu_offload": False}, "data": {"batch_size_per_gpu": 64}}
    current = {"run": {"parallel": "fsdp", "fsdp_cpu_offload": True}, "data": {"batch_size_per_gpu": 32}}
    assert unsafe_changes(changed_keys(stored, current)) == ["data.batch_size_per_gpu"]
