"""dino_recog/protocol_card.py: the conventions stated beside every result."""

from conftest import ROOT

from dino_recog import config as C
from dino_recog.protocol_card import CARD_KEYS, card_differences, card_line, protocol_card

MODEL = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "test_feature": "before_neck"}


def cfg(*overrides):
    return C.load(ROOT / "cfg_recog.yaml", list(overrides), cls=C.RecogConfig)


def test_the_card_states_what_the_config_and_the_model_say(tmp_path):
    for d in ("train", "test"):  # an MSMT17 V1 folder: version "auto" is stated as the version found
        (tmp_path / d).mkdir()
    msmt = f"{{name: msmt17, root: {tmp_path}}}"
    card = protocol_card(cfg(f"data.train=[{msmt}]", f"data.test={msmt}", "eval.rerank=true", "eval.rerank_k1=50",
                             "eval.rerank_k2=15", "eval.flip=true"), MODEL)  # fmt: skip
    assert list(card) == list(CARD_KEYS)
    assert card == {"data": "msmt17", "version": "V1", "val": "train+val", "test_feature": "before_neck", "flip": "on",
                    "mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5", "metric": "cosine", "rerank": "50/15/0.3",
                    "aqe": "off", "ap": "non-interpolated", "query": "single", "same_camera": "removed"}  # fmt: skip
    plain = protocol_card(cfg("data.test={name: msmt17_v2, root: /x}", "eval.topk=100"),
                          {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "feature": ""},
                          feature="backbone global")  # fmt: skip
    assert (plain["data"], plain["version"], plain["val"], plain["test_feature"]) == ("msmt17", "V2", "-",
                                                                                       "backbone global")
    assert (plain["mean"], plain["ap"], plain["rerank"]) == ("0.485,0.456,0.406", "non-interpolated@100", "off")
    no_val = protocol_card(cfg(f"data.train=[{{name: msmt17, root: {tmp_path}, use_val: false}}]"), MODEL)
    assert (no_val["data"], no_val["version"], no_val["val"]) == ("market1501", "-", "train")


def test_differences_name_each_convention_stated_on_both_sides():
    ours = {"data": "market1501", "test_feature": "after_neck", "mean": "0.5,0.5,0.5", "rerank": "off"}
    theirs = {"data": "market1501", "test_feature": "before_neck", "rerank": "off"}  # mean not stated: not compared
    assert card_differences(ours, theirs) == ["test_feature: ours after_neck, published before_neck"]
    assert card_line(ours) == "data market1501 | test_feature after_neck | mean 0.5,0.5,0.5 | rerank off"
