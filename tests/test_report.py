import json

import pytest

from dino_recog.report import main
from dino_recog.runlog import RunLog


def test_table_of_first_and_last_evaluation(tmp_path, capsys):
    log = RunLog(tmp_path / "run", tensorboard=False)
    log.write("eval", 0, epoch=0, rank1=0.1, mAP=0.05, mINP=0.01)
    log.write("train", 5, loss=3.0)
    log.write("eval", 10, epoch=2, rank1=0.5, mAP=0.25, mINP=0.125)
    (tmp_path / "h.json").write_text(json.dumps({"method": "colour histogram", "rank1": 0.3, "mAP": 0.2}))
    text = main([str(tmp_path / "run"), "--extra", str(tmp_path / "h.json")])
    lines = text.splitlines()
    assert lines[0] == "| run | rank1 | mAP | mINP |"
    assert lines[2] == "| colour histogram | 30.0 | 20.0 |  |"
    assert lines[3].endswith("(epoch 0, before training) | 10.0 | 5.0 | 1.0 |")
    assert lines[4].endswith("(epoch 2) | 50.0 | 25.0 | 12.5 |")
    assert capsys.readouterr().out.strip() == text


def test_run_without_evaluation_is_named(tmp_path):
    RunLog(tmp_path, tensorboard=False).write("train", 0, loss=1.0)
    with pytest.raises(ValueError, match="has no evaluation record"):
        main([str(tmp_path)])
