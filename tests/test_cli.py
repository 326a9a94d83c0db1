"""dino_recog/cli.py: the command line shared by the entry scripts (flags, overrides, which config file is read)."""

from __future__ import annotations

import pytest

import eval_knn
import eval_reid
from dino_recog import config as C
from dino_recog.cli import ROOT, load_config

KNN = ["--checkpoint", "t.pth", "--k", "10", "20", "100", "200"]
EVAL_SET = ["data.eval_set.name=market1501", "data.eval_set.root=/data/market"]


@pytest.mark.parametrize("argv", [[*KNN, *EVAL_SET], [*EVAL_SET, *KNN], [EVAL_SET[0], *KNN, EVAL_SET[1]]],
                         ids=["after", "before", "around"])  # fmt: skip
def test_overrides_are_not_swallowed_by_a_flag_with_several_values(argv):
    """The README's `eval_knn.py --k 10 20 100 200 data.eval_set.name=...`: --k used to take the overrides too."""
    cfg, args = load_config(C.DinoConfig, "cfg_dino.yaml", "kNN", argv, eval_knn._flags)
    assert args.k == [10, 20, 100, 200]
    assert (cfg.data.eval_set.name, cfg.data.eval_set.root) == ("market1501", "/data/market")


def test_a_flag_value_is_not_taken_for_an_override():
    cfg, args = load_config(C.DinoConfig, "cfg_dino.yaml", "kNN", ["--checkpoint", "runs/a=b.pth", *EVAL_SET],
                            eval_knn._flags)  # fmt: skip
    assert args.checkpoint == "runs/a=b.pth"


def _run_dir(tmp_path, cls, *overrides):
    run = tmp_path / "run"
    run.mkdir()
    C.save(C.load(None, list(overrides), cls=cls), run / "config.yaml")
    return run


def test_evaluation_reads_the_config_of_the_run_beside_the_checkpoint(tmp_path, capsys):
    run = _run_dir(tmp_path, C.RecogConfig, f"data.test={{name: market1501, root: {tmp_path}/mine}}")
    cfg, _ = eval_reid.parse_args(["--checkpoint", str(run / "model.pth"), "eval.flip=false"])
    assert cfg.data.test.root == f"{tmp_path}/mine" and cfg.eval.flip is False  # the run's, then the overrides
    assert f"config: {run / 'config.yaml'} (the run's, beside the checkpoint" in capsys.readouterr().err


def test_an_explicit_config_wins_over_the_runs(tmp_path, capsys):
    run = _run_dir(tmp_path, C.RecogConfig, f"data.test={{name: market1501, root: {tmp_path}/mine}}")
    other = tmp_path / "other.yaml"
    other.write_text(f"data:\n  test: {{name: market1501, root: {tmp_path}/other}}\n")
    cfg, _ = eval_reid.parse_args(["--config", str(other), "--checkpoint", str(run / "model.pth")])
    assert cfg.data.test.root == f"{tmp_path}/other"
    assert "config:" not in capsys.readouterr().err


def test_a_config_of_the_other_stage_beside_the_checkpoint_is_not_used_and_that_is_said(tmp_path, capsys):
    run = _run_dir(tmp_path, C.DinoConfig)  # a stage-1 run: its teacher export given to eval_reid.py
    cfg, _ = eval_reid.parse_args(["--checkpoint", str(run / "teacher_backbone.pth")])
    assert cfg.data.test == C.load(ROOT / "cfg_recog.yaml", [], cls=C.RecogConfig).data.test
    err = capsys.readouterr().err
    assert "config: cfg_recog.yaml (" in err and "beside the checkpoint is not a RecogConfig" in err


def test_training_never_reads_a_config_beside_anything(tmp_path):
    run = _run_dir(tmp_path, C.DinoConfig, "train.epochs=30")
    cfg, _ = load_config(C.DinoConfig, "cfg_dino.yaml", "train", [f"run.output_dir={run}"])
    assert cfg.train.epochs == C.load(ROOT / "cfg_dino.yaml", [], cls=C.DinoConfig).train.epochs != 30


def test_evaluation_normalises_with_the_models_own_mean_and_std_not_the_configs(small_demo, tmp_path):
    """A model fine-tuned with 0.5/0.5 is evaluated with 0.5/0.5 under a config that says ImageNet's."""
    import torch

    from dino_recog.checkpoint import save_reid_model
    from dino_recog.cli import recog_eval_model
    from dino_recog.config import IMAGENET_MEAN
    from dino_recog.models import BackboneSpec, build_reid_model

    spec = BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2, feature="cls", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    path = save_reid_model(build_reid_model(spec, 3, test_feature="before_neck"), tmp_path / "model.pth")
    market = small_demo / "market"
    cfg = C.load(ROOT / "cfg_recog.yaml", [f"data.test={{name: market1501, root: {market}}}"], cls=C.RecogConfig)
    assert tuple(cfg.aug.mean) == IMAGENET_MEAN
    model, backbone, _, query, gallery = recog_eval_model(cfg, str(path), torch.device("cpu"))
    for split in (query, gallery):
        norm = split.transform.transforms[-1]
        assert (list(norm.mean), list(norm.std)) == ([0.5] * 3, [0.5] * 3)
    assert backbone["mean"] == [0.5] * 3 and model.head.test_feature == "before_neck"
