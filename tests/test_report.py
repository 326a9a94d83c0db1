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


PUBLISHED = """# Recipes

Some text.

| recipe | data | version | val | test_feature | flip | mean | std | rerank | mAP | rank1 | source |
|---|---|---|---|---|---|---|---|---|---|---|---|
| tssl_s_market | market1501 | - | - | before_neck | off | 0.5,0.5,0.5 | 0.5,0.5,0.5 | off | 91.0 | 96.0 | README |
| tssl_s_msmt | msmt17 | V1 | train+val | before_neck | off | 0.5,0.5,0.5 | 0.5,0.5,0.5 | ? | 66.1 | 84.6 | README |

After the table.
"""


def _run_with_card(root, card):
    log = RunLog(root, tensorboard=False)
    log.write("eval", 0, epoch=0, rank1=0.1, mAP=0.05)
    log.write("eval", 10, epoch=2, rank1=0.9, mAP=0.8)
    if card is not None:
        (root / "results.json").write_text(json.dumps({"final": {"mAP": 0.8}, "protocol": card}))


def test_a_run_beside_the_published_rows_of_its_test_set_with_the_conventions_that_differ(tmp_path):
    (tmp_path / "recipes.md").write_text(PUBLISHED)
    card = {"data": "market1501", "version": "-", "val": "-", "test_feature": "after_neck", "flip": "off",
            "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225", "rerank": "off", "ap": "non-interpolated"}
    _run_with_card(tmp_path / "run", card)
    lines = main([str(tmp_path / "run"), "--published", str(tmp_path / "recipes.md")]).splitlines()
    assert lines[4] == "| published: tssl_s_market | 96.0 | 91.0 |"  # only its test set's row
    assert not any("msmt" in line for line in lines)
    assert lines[5] == f"protocol of {tmp_path / 'run'}: data market1501 | version - | val - | test_feature " \
                       "after_neck | flip off | mean 0.485,0.456,0.406 | std 0.229,0.224,0.225 | rerank off | ap " \
                       "non-interpolated"  # fmt: skip
    assert lines[6] == (f"warning: {tmp_path / 'run'} vs published tssl_s_market: test_feature: ours "
                        "after_neck, published before_neck; mean: ours 0.485,0.456,0.406, published 0.5,0.5,0.5; "
                        "std: ours 0.229,0.224,0.225, published 0.5,0.5,0.5")  # fmt: skip
    same = {**card, "test_feature": "before_neck", "mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5"}
    _run_with_card(tmp_path / "same", same)
    text = main([str(tmp_path / "same"), "--published", str(tmp_path / "recipes.md")])
    assert text.splitlines()[-1] == f"{tmp_path / 'same'} vs published tssl_s_market: the same stated " \
                                    "conventions"  # fmt: skip
    # a named recipe of another set is shown; its "?" re-ranking is not compared; a run without a card is said
    _run_with_card(tmp_path / "old", None)
    text = main([str(tmp_path / "old"), "--published", str(tmp_path / "recipes.md"), "--recipe",
                 "tssl_s_msmt"])  # fmt: skip
    assert "| published: tssl_s_msmt | 84.6 | 66.1 |" in text
    assert text.splitlines()[-1] == f"warning: {tmp_path / 'old'}: no protocol card (a results.json from before it, " \
                                    "or none); its conventions are unknown"  # fmt: skip


@pytest.mark.parametrize("content, message", [
    ("# no table\n", "no published table (a markdown table whose header starts with | recipe | data |)"),
    ("| recipe | data | mAP |\n|---|---|---|\n", ":1: the published table lacks the column(s) rank1"),
    ("| recipe | data | mAP | rank1 |\n|---|---|---|---|\n| a | market1501 | n/a | 90 |\n",
     ":3: mAP 'n/a', rank1 '90'; expected numbers in %"),
])  # fmt: skip
def test_a_published_file_without_a_readable_table_is_one_line(tmp_path, capsys, content, message):
    _run_with_card(tmp_path / "run", None)
    (tmp_path / "recipes.md").write_text(content)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--published", str(tmp_path / "recipes.md")])
    assert str(stop.value.code) == f"error: {tmp_path / 'recipes.md'}{'' if message[0] == ':' else ': '}{message}"
