import argparse

import pytest
import torch
from conftest import DINO_2PROC, ROOT, dino_args

from dino_recog.submit import Task, main, minutes


@pytest.mark.parametrize(("text", "expected"), [("90", 90), ("10:30", 11), ("72:00:00", 4320), ("3-00:00:00", 4320),
                                                ("1-2", 1560), ("1-02:30", 1590), ("0-00:00:30", 1)])  # fmt: skip
def test_slurm_time_limits_in_minutes(text, expected):
    assert minutes(text) == expected


@pytest.mark.parametrize("text", ["", "72h", "1:2:3:4", "0", "-5", "1-2-3"])
def test_unreadable_time_limits_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a (SLURM time limit|time limit >)"):
        minutes(text)


def test_a_mistake_is_one_line_before_anything_is_queued(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--local", "train_dino.py", "train.epoch=3", f"run.output_dir={out}"]) == 2
    assert capsys.readouterr().err == (
        "error: config error: command line: unknown key train.epoch; did you mean train.epochs?\n"
    )
    assert main(["--local", "train_dino.py", "data.train.root=/nowhere", f"run.output_dir={out}"]) == 2
    assert "data.train.root: /nowhere does not exist" in capsys.readouterr().err
    assert main(["--local", "eval_reid.py"]) == 2
    assert capsys.readouterr().err == "error: eval_reid.py: expected train_dino.py or train_recog.py\n"
    assert not out.exists()


def test_a_requeued_task_resumes_from_the_newest_checkpoint():
    task = Task("/x/train_dino.py", ["--config", "c.yaml", "run.resume=", "train.epochs=3"], "/work")
    again = task.checkpoint().function
    assert isinstance(again, Task) and (again.script, again.cwd) == ("/x/train_dino.py", "/work")
    assert again.argv == ["--config", "c.yaml", "train.epochs=3", "run.resume=auto"]


@pytest.mark.slow  # two fresh interpreters started by submitit
def test_submitit_local_job_of_two_tasks_trains_like_train_sh(small_demo, dino_2proc, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as train.sh's CPU processes in the tests (launcher_env)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    argv = ["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--wait", "train_dino.py",
            *dino_args(small_demo / "lup" / "images", out, *DINO_2PROC)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1 node(s) x 2 task(s)" in printed and "finished" in printed
    assert list((out / "slurm").glob("*_0_log.out")) and list((out / "slurm").glob("*_1_log.out"))
    ours = torch.load(out / "teacher_backbone.pth", weights_only=True)["state_dict"]
    theirs = torch.load(dino_2proc / "teacher_backbone.pth", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, rtol=0, atol=1e-6), key
