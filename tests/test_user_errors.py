"""dino_recog/user_errors.py: the tools' one-line errors for mistakes a user can fix, and output paths checked first."""

from __future__ import annotations

import errno

import pytest

from dino_recog.checkpoint import CheckpointError
from dino_recog.export import main as export_main
from dino_recog.user_errors import check_output_paths, user_errors


def _stopped(capsys, error: BaseException) -> str:
    with pytest.raises(SystemExit) as stop:
        with user_errors():
            raise error
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("error, line", [
    (FileNotFoundError(2, "No such file or directory", "data/x.jpg"), "error: data/x.jpg: No such file or directory"),
    (CheckpointError("m.pth: checkpoint not found"), "error: m.pth: checkpoint not found"),
    (OSError(errno.ENOSPC, "No space left on device", "out/f.npy"), "error: out/f.npy: No space left on device"),
])  # fmt: skip
def test_a_mistake_a_user_can_fix_is_one_line(capsys, error, line):
    assert _stopped(capsys, error) == line + "\n"


@pytest.mark.parametrize("error", [ValueError("a bug"), OSError(errno.EIO, "I/O error"), KeyError("k")])
def test_anything_else_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        with user_errors():
            raise error


def test_output_paths_are_checked_and_created_before_any_work(tmp_path):
    check_output_paths({"--json": str(tmp_path / "new" / "r.json")}, {"--cache-dir": str(tmp_path / "cache")})
    assert (tmp_path / "new").is_dir() and (tmp_path / "cache").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"^--cache-dir: {tmp_path}/file is a file, not a folder$"):
        check_output_paths(folders={"--cache-dir": str(tmp_path / "file")})
    with pytest.raises(IsADirectoryError, match=f"^--out {tmp_path}/new: is a folder; expected a file name$"):
        check_output_paths({"--out": str(tmp_path / "new")})


def test_export_of_a_missing_checkpoint_or_onto_a_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path / "m.pth"), "--out", str(tmp_path / "sub" / "m.onnx")])
    assert capsys.readouterr().err == f"error: {tmp_path}/m.pth: checkpoint not found\n"
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path / "m.pth"), "--out", str(tmp_path)])
    assert capsys.readouterr().err == f"error: --out {tmp_path}: is a folder; expected a file name\n"


@pytest.mark.parametrize("script, args", [
    ("eval_reid.py", ["--json", "{tmp}/out/r.json"]),
    ("eval_knn.py", ["--cache-dir", "{tmp}/cache", "data.eval_set.name=market1501", "data.eval_set.root=/nowhere"]),
])  # fmt: skip
def test_evaluation_of_a_missing_checkpoint_is_one_line(run_script, tmp_path, capsys, script, args):
    with pytest.raises(SystemExit) as stop:
        run_script(script, "--checkpoint", tmp_path / "m.pth", *(a.format(tmp=tmp_path) for a in args))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path}/m.pth: checkpoint not found"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "argument --temperature: 0: expected a number > 0"),
    (["--temperature", "-1"], "argument --temperature: -1: expected a number > 0"),
    (["--temperature", "nan"], "argument --temperature: nan: expected a finite number"),
    (["--k", "10", "0"], "argument --k: 0: expected an integer > 0"),
])  # fmt: skip
def test_eval_knn_refuses_flag_values_that_give_no_vote(capsys, argv, message):
    import eval_knn
    from dino_recog import config as C
    from dino_recog.cli import load_config

    with pytest.raises(SystemExit):
        load_config(C.DinoConfig, "cfg_dino.yaml", "kNN", ["--checkpoint", "t.pth", *argv], eval_knn._flags)
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


@pytest.mark.parametrize("argv, message", [
    (["--mean", "nan", "0", "0"], "argument --mean: nan: expected a finite number"),
    (["--std", "0.2", "0", "0.2"], "argument --std: 0: expected a number > 0"),
    (["--image-size", "0", "64"], "argument --image-size: 0: expected an integer > 0"),
])  # fmt: skip
def test_extract_refuses_normalisation_and_sizes_that_give_garbage(capsys, argv, message):
    from dino_recog.extract import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", "m.pth", "--images", ".", "--out", "f.npy", *argv])
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_feature_extractor_refuses_a_nan_mean_or_a_zero_std(tmp_path):
    from dino_recog import FeatureExtractor
    from dino_recog.models import build_backbone

    torch = pytest.importorskip("torch")
    net = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=1, embed_dim=32, num_heads=2)[0]
    torch.save(net.state_dict(), tmp_path / "w.pth")
    kw = dict(backbone=dict(name="vit_small", img_size=(32, 16), patch_size=8, depth=1, embed_dim=32, num_heads=2))
    with pytest.raises(ValueError, match=r"^mean \[nan, 0.0, 0.0\]: expected 3 finite values \(RGB\)$"):
        FeatureExtractor(tmp_path / "w.pth", "cpu", mean=(float("nan"), 0, 0), **kw)
    with pytest.raises(ValueError, match=r"^std \[0.2, 0.0, 0.2\]: expected 3 finite values > 0 \(RGB\)$"):
        FeatureExtractor(tmp_path / "w.pth", "cpu", std=(0.2, 0, 0.2), **kw)


def test_feature_extractor_at_a_size_the_model_cannot_take_names_the_size_it_was_trained_at(tmp_path):
    from dino_recog import FeatureExtractor
    from dino_recog.models import build_backbone

    torch = pytest.importorskip("torch")
    net = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=1, embed_dim=32, num_heads=2)[0]
    torch.save(net.state_dict(), tmp_path / "w.pth")
    kw = dict(backbone=dict(name="vit_small", img_size=(32, 16), patch_size=8, depth=1, embed_dim=32, num_heads=2))
    with pytest.raises(ValueError, match=r"^image_size \[30, 17\]: the model cannot take it \(.*\); it was trained at "
                                         r"\[32, 16\]: use that, or sides that are multiples of its patch size$"):
        FeatureExtractor(tmp_path / "w.pth", "cpu", image_size=(30, 17), **kw)



def _one_block_weights(path):
    """A bare state dict of a 1-block ViT (no spec of its own: the tools build the 2-block ViT they are told)."""
    import torch

    from dino_recog.models import build_backbone

    torch.manual_seed(0)
    torch.save(build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=1, embed_dim=32, num_heads=2)[0]
               .state_dict(), path)  # fmt: skip
    return path


TWO_BLOCKS = ["model.arch=vit_small", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8"]


@pytest.mark.parametrize("script, args", [
    ("eval_knn.py", ["data.eval_set.name=market1501", "data.eval_set.root={tmp}/market",
                     "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]", *TWO_BLOCKS]),
    ("eval_reid.py", ["data.test.root={tmp}/market", "aug.size=[32,16]", *TWO_BLOCKS]),
])  # fmt: skip
def test_evaluation_of_weights_with_missing_blocks_is_refused_unless_allowed(run_script, tmp_path, capsys, script,
                                                                            args):  # fmt: skip
    """A 1-block teacher into a 2-block model: was a warning "12 model keys missing", then a score from a random
    block, exit 0. The refusal comes before the data are read; with --allow-missing the tool goes on to them."""
    path = _one_block_weights(tmp_path / "one_block.pth")
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as stop:
        run_script(script, "--checkpoint", path, *args)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path}: 12 of the model's 30 tensors are missing from the weights: blocks.1.* (12 tensors); "
        "expected weights of the same architecture (fewer blocks or another model in the file?); "
        "allow_missing=True (the tools' --allow-missing) keeps them random"
    )
    with pytest.raises(SystemExit) as stop:  # allowed: the weights load, and the missing data set is the next stop
        run_script(script, "--checkpoint", path, "--allow-missing", *args)
    assert stop.value.code == 2
    assert f"{tmp_path}/market" in capsys.readouterr().err.splitlines()[-1]


def test_extract_of_weights_with_missing_blocks_is_refused_unless_allowed(tmp_path, capsys):
    from PIL import Image

    from dino_recog.extract import main as extract_main

    path = _one_block_weights(tmp_path / "one_block.pth")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 32)).save(tmp_path / "imgs" / "a.png")
    out = tmp_path / "out" / "f.npy"
    argv = ["--checkpoint", str(path), "--images", str(tmp_path / "imgs"), "--out", str(out), "--device", "cpu",
            "--backbone", "name=vit_small", "img_size=[32,16]", "patch_size=8", "depth=2", "embed_dim=32",
            "num_heads=2"]  # fmt: skip
    assert extract_main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"error: {path}: 12 of the model's 30 tensors are missing from the weights: blocks.1.* (12 tensors); "
    )
    assert not out.exists()
    assert extract_main([*argv, "--allow-missing"]) == 0 and out.exists()
