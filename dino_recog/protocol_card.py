"""The protocol card: the evaluation conventions that change a published re-identification number, stated with it.

Two runs' mAP compare only when these agree: the data set and its version (MSMT17 V1 / V2), whether MSMT17's val list
joined training, the test feature (before / after the BN neck), flip averaging, the normalisation, re-ranking and its
parameters (TransReID reports with k1 50, k2 15; fast-reid and torchreid with 20 / 6), query expansion, the distance,
the AP definition, single- or multi-query and the same-camera rule (TransReID-SSL#13, PASS-reID#1: V2 against V1).
`results.json` of stage 2 and `eval_reid.py --json` carry the card under "protocol"; `python -m dino_recog.report`
prints it and compares it with published rows (see report.py).

Every value is a short string so that cards compare with `==` and print as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CARD_KEYS", "card_differences", "card_line", "protocol_card"]

# In print order. data / version / val: what was evaluated and trained on; the rest: how it was scored.
CARD_KEYS = ("data", "version", "val", "test_feature", "flip", "mean", "std", "metric", "rerank", "aqe", "ap", "query",
             "same_camera")  # fmt: skip
# Names that are one data set under another name (torchreid's, fast-reid's).
_SAME_SET = {"msmt17_v1": "msmt17", "msmt17_v2": "msmt17", "dukemtmc": "dukemtmcreid"}
_MSMT = ("msmt17", "msmt17_v1", "msmt17_v2")


def _numbers(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def _msmt_version(spec: Any) -> str:
    """V1 / V2 of an MSMT17 entry: the name's, the key's, or the one its folders show ("auto" if they show none)."""
    version = {"msmt17_v1": "V1", "msmt17_v2": "V2"}.get(spec.name, spec.version)
    if version != "auto":
        return version.upper()
    from .data.parsers import _MSMT_DIRS

    present = [v for v, dirs in _MSMT_DIRS.items() if all((Path(spec.root) / d).is_dir() for d in dirs)]
    return present[0] if len(present) == 1 else "auto"


def protocol_card(cfg: Any, model_spec: Mapping[str, Any], *, feature: str | None = None) -> dict[str, str]:
    """The conventions of an evaluation of a model on `cfg.data.test` (a RecogConfig, or any object with its `data`
    and `eval` sections).

    Args:
        cfg: the config the evaluation ran with (its training sets give the val policy).
        model_spec: the evaluated model's spec (a stage-2 model's flat spec, or a BackboneSpec's dict): normalisation
            and test feature.
        feature: what the features are when `model_spec` has no `test_feature` (backbone weights), e.g.
            "backbone cls".

    Returns:
        {key: value} for every key of `CARD_KEYS`; "-" where a key does not apply.
    """
    test, e = cfg.data.test, cfg.eval
    msmt_train = [s for s in cfg.data.train if s.name in _MSMT]
    val = "-"
    if msmt_train:
        val = "+".join(sorted({"train+val" if s.use_val else "train" for s in msmt_train}))
    return {
        "data": _SAME_SET.get(test.name, test.name),
        "version": _msmt_version(test) if test.name in _MSMT else "-",
        "val": val,
        "test_feature": model_spec.get("test_feature") or feature or "-",
        "flip": "on" if e.flip else "off",
        "mean": _numbers(model_spec["mean"]),
        "std": _numbers(model_spec["std"]),
        "metric": e.metric,
        "rerank": f"{e.rerank_k1}/{e.rerank_k2}/{e.rerank_lambda:g}" if e.rerank else "off",
        "aqe": f"{e.aqe_k}/{e.aqe_alpha:g}" if e.aqe else "off",
        # rank_protocol: AP = (1/|G|) sum_j j / rank_j over the filtered ranking (no interpolation, as fast-reid)
        "ap": "non-interpolated" + (f"@{e.topk}" if e.topk else ""),
        "query": "single",  # each query image ranked on its own (no multi-query pooling)
        "same_camera": "removed",  # gallery entries of the query's identity and camera are not ranked
    }


def card_line(card: Mapping[str, str]) -> str:
    """One printable line: `key value` pairs in `CARD_KEYS` order (keys the card lacks left out)."""
    return " | ".join(f"{k} {card[k]}" for k in CARD_KEYS if k in card)


def card_differences(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """The conventions stated in both cards that differ, as "key: ours X, published Y"."""
    return [f"{k}: ours {ours[k]}, published {theirs[k]}" for k in CARD_KEYS
            if k in ours and k in theirs and str(ours[k]) != str(theirs[k])]  # fmt: skip
