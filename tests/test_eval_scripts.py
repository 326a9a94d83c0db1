"""eval_reid.py and eval_knn.py on the small demo set, against the evaluation functions called directly (on the CPU
in both, so that a GPU machine compares like with like)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_recog.checkpoint import save_reid_model
from dino_recog.data import datasets as ds
from dino_recog.data.transforms import reid_test_transform
from dino_recog.evaluation import (
    evaluate_query_gallery,
    evaluate_rank,
    extract_features,
    knn_classify,
    pairwise_distance,
)
from dino_recog.models import build_backbone, build_reid_model
from dino_recog.rerank import average_query_expansion, re_rank_features

ROOT = Path(__file__).resolve().parents[1]
VIT = ["model.arch=vit_small", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8"]


def run(script, *args):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def demo_sets(small_demo, size=(32, 16)):
    data = ds.load_market1501(small_demo / "market")
    tf = reid_test_transform(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ds.ImageDataset(data.query, tf, train=False), ds.ImageDataset(data.gallery, tf, train=False)


@pytest.mark.slow  # a fresh interpreter (about 9 s of start-up on 2 cores)
def test_eval_reid_on_a_stage2_model(small_demo, tmp_path, run_script):
    torch.manual_seed(0)
    spec = dict(
        arch="vit_small",
        img_size=[32, 16],
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=30,
        feature="cls_mean",
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    model = build_reid_model(spec)
    save_reid_model(model, tmp_path / "model.pth")
    market = small_demo / "market"
    out = run("eval_reid.py", "--checkpoint", tmp_path / "model.pth", "--json", tmp_path / "r.json",
              f"data.test={{name: market1501, root: {market}}}", "data.num_workers=0", "run.device=cpu")  # fmt: skip
    result = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate_query_gallery(model.eval(), *demo_sets(small_demo), torch.device("cpu"))
    for k in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert result[k] == pytest.approx(expected[k], abs=1e-6)
    assert f"{100 * expected['mAP']:6.2f}" in out

    # --rerank / --aqe / eval.topk: the same features through the re-ranking and query-expansion functions (in this
    # interpreter: the command line in a fresh one is checked above)
    overrides = [f"data.test={{name: market1501, root: {market}}}", "data.num_workers=0", "run.device=cpu"]
    run_script("eval_reid.py", "--checkpoint", tmp_path / "model.pth", "--json", tmp_path / "rr.json", "--rerank",
               "--aqe", *overrides, "eval.rerank_k1=8", "eval.rerank_k2=3")  # fmt: skip
    query, gallery = demo_sets(small_demo)
    qf, q_pids, q_cams = extract_features(model.eval(), query, torch.device("cpu"))
    gf, g_pids, g_cams = extract_features(model, gallery, torch.device("cpu"))
    qx, gx = average_query_expansion(qf, gf, k=5, alpha=3.0)
    ref = evaluate_rank(re_rank_features(qx, gx, 8, 3, 0.3), q_pids, g_pids, q_cams, g_cams)
    reranked = json.loads((tmp_path / "rr.json").read_text())
    assert reranked["mAP"] == pytest.approx(ref["mAP"], abs=1e-6) and reranked["rerank"] == [8, 3, 0.3]
    assert (reranked["protocol"]["rerank"], reranked["protocol"]["aqe"]) == ("8/3/0.3", "5/3")
    assert result["protocol"]["test_feature"] == "after_neck" and result["protocol"]["rerank"] == "off"
    assert reranked["mAP"] != pytest.approx(result["mAP"], abs=1e-4)  # the options did change the ranking
    run_script("eval_reid.py", "--checkpoint", tmp_path / "model.pth", "--json", tmp_path / "top.json", *overrides,
               "eval.topk=5")  # fmt: skip
    top = json.loads((tmp_path / "top.json").read_text())
    cut = evaluate_rank(pairwise_distance(qf, gf), q_pids, g_pids, q_cams, g_cams, cutoff=5)
    assert (top["cutoff"], top["rank5"]) == (5, pytest.approx(result["rank5"], abs=1e-9))
    assert top["mAP"] == pytest.approx(cut["mAP"], abs=1e-9) and top["mAP"] <= result["mAP"]
    assert top["protocol"]["ap"] == "non-interpolated@5"
    # --test-feature: the feature before the BN neck, named in the card
    run_script("eval_reid.py", "--checkpoint", tmp_path / "model.pth", "--json", tmp_path / "before.json",
               "--test-feature", "before_neck", *overrides)  # fmt: skip
    before = json.loads((tmp_path / "before.json").read_text())
    model.set_test_feature("before_neck")
    expected = evaluate_query_gallery(model.eval(), query, gallery, torch.device("cpu"))
    assert before["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert before["protocol"]["test_feature"] == "before_neck"


@pytest.mark.slow  # a fresh interpreter (about 9 s of start-up on 2 cores)
def test_eval_knn_on_a_backbone_export(small_demo, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    torch.save(backbone.state_dict(), tmp_path / "teacher_backbone.pth")
    market = small_demo / "market"
    run("eval_knn.py", "--checkpoint", tmp_path / "teacher_backbone.pth", "--k", 1, 5, "--json", tmp_path / "k.json",
        f"data.eval_set={{name: market1501, root: {market}}}", "crops.global_crops_size=[32,16]",
        "crops.local_crops_size=[16,8]", "data.num_workers=0", "run.device=cpu", *VIT)  # fmt: skip
    result = json.loads((tmp_path / "k.json").read_text())
    query, gallery = demo_sets(small_demo)
    qf, q_pids, _ = extract_features(backbone, query, torch.device("cpu"))
    gf, g_pids, _ = extract_features(backbone, gallery, torch.device("cpu"))
    bank = g_pids > 0
    for k in (1, 5):
        pred = knn_classify(gf[bank], g_pids[bank], qf, k=k)
        assert result[f"k{k}_top1"] == pytest.approx(float(np.mean(pred == q_pids)))
        assert result[f"k{k}_top5"] >= result[f"k{k}_top1"]


@pytest.mark.slow  # a fresh interpreter (about 9 s of start-up on 2 cores)
def test_eval_reid_flags_are_overrides_validated_with_the_rest(tmp_path):
    import eval_reid

    cfg, _ = eval_reid.parse_args(["--checkpoint", "m.pth", "--rerank", "--aqe"])
    assert cfg.eval.rerank and cfg.eval.aqe
    cfg, _ = eval_reid.parse_args(["--checkpoint", "m.pth"])
    assert not cfg.eval.rerank and not cfg.eval.aqe
    cfg, _ = eval_reid.parse_args(["--checkpoint", "m.pth", "--rerank", "eval.rerank=false"])  # key=value wins
    assert not cfg.eval.rerank
    # Refused at load, before any model is read, with the message of eval.rerank=true eval.topk=5.
    r = subprocess.run([sys.executable, "eval_reid.py", "--checkpoint", tmp_path / "none.pth", "--rerank",
                        "eval.topk=5"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("config error: "), r.stderr[-2000:]
    assert r.stderr.strip().endswith(
        "cfg_recog.yaml + command line: eval.rerank with eval.topk=5: re-ranking needs the full distance matrix; "
        "set topk=0"
    )


def test_eval_reid_and_eval_knn_on_your_own_labeled_folder(small_demo, tmp_path, run_script):
    """`data.test.name=labeled_folder` (ROOT/query/<id>/ + ROOT/gallery/<id>/): the scores of the same images read
    from their Market-1501 original (distractors left out) through the protocol."""
    from test_datasets import market_as_folder

    torch.manual_seed(0)
    backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
    torch.save(backbone.state_dict(), tmp_path / "teacher_backbone.pth")
    market = market_as_folder(small_demo, tmp_path / "mine")
    common = ["data.num_workers=0", "run.device=cpu", *VIT]
    run_script("eval_reid.py", "--checkpoint", tmp_path / "teacher_backbone.pth", "--json", tmp_path / "r.json",
               f"data.test={{name: labeled_folder, root: {tmp_path / 'mine'}}}", "aug.size=[32,16]", "eval.flip=false",
               *common)  # fmt: skip
    tf = reid_test_transform((32, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    query = ds.ImageDataset(market.query, tf, train=False)
    gallery = ds.ImageDataset([r for r in market.gallery if r.pid > 0], tf, train=False)
    expected = evaluate_query_gallery(backbone.eval(), query, gallery, torch.device("cpu"))
    result = json.loads((tmp_path / "r.json").read_text())
    for k in ("rank1", "mAP", "mINP"):
        assert result[k] == pytest.approx(expected[k], abs=1e-6)
    run_script("eval_knn.py", "--checkpoint", tmp_path / "teacher_backbone.pth", "--k", 1, "--json",
               tmp_path / "k.json", f"data.eval_set={{name: labeled_folder, root: {tmp_path / 'mine'}}}",
               "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]", *common)  # fmt: skip
    qf, q_pids, _ = extract_features(backbone, query, torch.device("cpu"))
    gf, g_pids, _ = extract_features(backbone, gallery, torch.device("cpu"))
    knn = json.loads((tmp_path / "k.json").read_text())
    assert knn["k1_top1"] == pytest.approx(float(np.mean(knn_classify(gf, g_pids, qf, k=1) == q_pids)))
