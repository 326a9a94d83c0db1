import json

import pytest

from dino_recog.report import main
from dino_recog.runlog import RunLog, read_jsonl


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


def test_run_without_evaluation_is_named(tmp_path, capsys):
    RunLog(tmp_path, tensorboard=False).write("train", 0, loss=1.0)
    with pytest.raises(SystemExit, match=f"^error: {tmp_path}: log.jsonl has no evaluation record"):
        main([str(tmp_path)])


def test_the_best_evaluation_has_a_row_when_it_is_neither_the_first_nor_the_last(tmp_path):
    log = RunLog(tmp_path / "run", tensorboard=False)
    for epoch, m_ap in [(0, 0.05), (2, 0.4), (4, 0.3)]:
        log.write("eval", epoch, epoch=epoch, mAP=m_ap)
    lines = main([str(tmp_path / "run")]).splitlines()[2:]
    assert len(lines) == 3
    assert lines[0].endswith("run (epoch 0, before training) | 5.0 |")
    assert lines[1].endswith("run (epoch 2, best mAP) | 40.0 |")
    assert lines[2].endswith("run (epoch 4) | 30.0 |")


@pytest.mark.parametrize("what, message", [
    ("missing", "{d}: no such run directory"),
    ("empty", "{d}: no log.jsonl; expected the output directory of a training run"),
    ("extra", "{d}/h.json: not a JSON file (Expecting value, line 1)"),
])  # fmt: skip
def test_plain_mistakes_are_one_line(tmp_path, capsys, what, message):
    d = tmp_path / "run"
    if what != "missing":
        d.mkdir()
    args = [str(d)]
    if what == "extra":
        RunLog(d, tensorboard=False).write("eval", 0, epoch=0, mAP=0.1)
        (d / "h.json").write_text("not json")
        args += ["--extra", str(d / "h.json")]
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip() or str(stop.value.code)
    assert err == f"error: {message.format(d=d)}"


def test_a_log_whose_last_line_was_cut_by_a_crash_is_read_without_it(tmp_path, caplog):
    log = RunLog(tmp_path, tensorboard=False)
    log.write("eval", 0, epoch=0, mAP=0.1)
    log.write("eval", 5, epoch=1, mAP=0.2)
    text = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text(text[: len(text) - 9])  # the second record cut mid-way
    assert [r["epoch"] for r in read_jsonl(tmp_path / "log.jsonl")] == [0]
    assert "skipped its last line 2, cut short" in caplog.text
    (tmp_path / "log.jsonl").write_text(text[: len(text) - 9] + "\n" + text)  # a broken line in the middle
    with pytest.raises(ValueError, match="log.jsonl, line 2: not a JSON record"):
        read_jsonl(tmp_path / "log.jsonl")
