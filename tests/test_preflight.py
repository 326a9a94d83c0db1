"""dino_recog/preflight.py: what train.sh checks once before torchrun starts the workers."""

from __future__ import annotations

import pytest
from conftest import ROOT, train_sh

from dino_recog.preflight import check


def test_a_good_command_passes_and_other_scripts_are_not_checked(small_demo):
    assert check("train_dino.py", ["--config", str(ROOT / "configs/demo/dino.yaml")]) is None
    assert check("train_recog.py", [f"data.train=[{{name: market1501, root: {small_demo / 'market'}}}]",
                                    f"data.test={{name: market1501, root: {small_demo / 'market'}}}",
                                    "model.pretrained="]) is None  # fmt: skip
    assert check("eval_reid.py", ["train.epochs=0"]) is None
    assert check("tests/scripts/faults.py", ["anything"]) is None


@pytest.mark.parametrize("script, argv, message", [
    ("train_dino.py", ["train.epochs=0"], "config error: {root}/cfg_dino.yaml + command line: train.epochs: 0; "
                                          "expected a value > 0"),
    ("train_dino.py", ["--config={tmp}/none.yaml"], "config error: {tmp}/none.yaml: config file not found"),
    ("train_dino.py", ["data.train.root={tmp}/none"], "data.train.root: {tmp}/none does not exist; expected the "
                                                      "directory of the image_folder data set"),
    ("train_recog.py", ["data.test.root={tmp}/none", "model.pretrained="],
     "data.train[0].root: data/Market-1501-v15.09.15 does not exist; expected the directory of the market1501 "
     "data set"),
    ("train_recog.py", ["data.train=[{{name: demo, root: {tmp}/d}}]", "data.test={{name: demo, root: {tmp}/d}}",
                        "model.pretrained={tmp}/t.pth"],
     "model.pretrained: {tmp}/t.pth not found; run stage 1 first (train_dino.py exports teacher_backbone.pth), point "
     "it at other weights, or set model.pretrained='' to start from scratch"),
    ("train_dino.py", ["data.train={{name: demo, root: {tmp}/d}}", "model.pretrained={tmp}/dino.pth"],
     "model.pretrained: {tmp}/dino.pth not found; point it at a checkpoint or set model.pretrained='' to start from "
     "random weights"),
    ("train_dino.py", ["data.train={{name: demo, root: {tmp}/d}}", "run.resume={tmp}/c.pth"],
     "run.resume: {tmp}/c.pth not found; expected a checkpoint file, auto (the newest in run.output_dir) or ''"),
])  # fmt: skip
def test_each_mistake_is_one_line(tmp_path, script, argv, message):
    fmt = dict(tmp=tmp_path, root=ROOT)
    if "data.train.root" in argv[0]:
        argv = ["data.train.name=image_folder", *argv]
    got = check(script, [a.format(**fmt) for a in argv])
    assert got == message.format(**fmt)


def test_train_sh_prints_the_mistake_once_without_torchruns_report(tmp_path):
    r = train_sh("cpu", 2, "train_dino.py", "train.epochs=0", f"run.output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"config error: {ROOT}/cfg_dino.yaml + command line: train.epochs: 0; "
                                     "expected a value > 0"]  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-5", "abc", "1.5"])
def test_train_sh_checks_max_restarts(value):
    r = train_sh("cpu", 1, "train_dino.py", MAX_RESTARTS=value)
    assert r.returncode == 2
    assert r.stderr.strip() == f"train.sh: MAX_RESTARTS must be a non-negative integer, got '{value}'"
