"""dino_recog.visualize: explicit attention against timm's own block, DINO thresholding, rank lists against
evaluate_rank, border colours on a constructed ranked list, and the size of every picture the commands write."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_recog.checkpoint import save_checkpoint, save_reid_model
from dino_recog.data import datasets as ds
from dino_recog.data.transforms import reid_test_transform
from dino_recog.evaluation import evaluate_query_gallery, evaluate_rank
from dino_recog.models import build_backbone, build_reid_model
from dino_recog.visualize import main
from dino_recog.visualize._draw import GAP, LABEL_H, legend
from dino_recog.visualize.attention import (
    block_forward_explicit,
    cls_attention_maps,
    last_self_attention,
    load_vit,
    threshold_mass,
)
from dino_recog.visualize.curves import DPI, PANEL_INCHES, curves_figure, plot_curves, run_series
from dino_recog.visualize.ranks import (
    BLUE,
    BORDER,
    GREEN,
    LEGEND,
    QUERY,
    RED,
    draw_ranks,
    rank_lists,
    select,
    tile_labels,
    worst_first,
    write_rank_lists,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model, _ = build_backbone("vit_small", **TINY)
    return model.eval()


def write_images(folder, n=2, size=(40, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"person_{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("size", [(32, 16), (48, 24)])  # the model's own grid, and one it must resample to
def test_explicit_attention_is_the_fused_blocks_attention(size):
    model = tiny_vit()
    x = torch.randn(2, 3, *size)
    blk = model.blocks[-1]
    seen = {}
    hook = blk.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    with torch.no_grad():
        model.forward_features(x)  # the training path: fused scaled_dot_product_attention
    hook.remove()
    assert blk.attn.fused_attn
    with torch.no_grad():
        out, probs = block_forward_explicit(blk, seen["inp"])
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-5)  # attention x v, projected = fused output
    n = 1 + (size[0] // 8) * (size[1] // 8)
    assert probs.shape == (2, 2, n, n) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, n))  # each head's row sums to 1 over the tokens

    # timm's own unfused branch materialises the softmax matrix (it enters attn_drop): ours must be that matrix
    blk.attn.fused_attn = False
    timm_probs = {}
    hook = blk.attn.attn_drop.register_forward_hook(lambda m, args, out: timm_probs.update(p=args[0]))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    torch.testing.assert_close(last_self_attention(model, x), timm_probs["p"], atol=1e-6, rtol=1e-5)
    maps = cls_attention_maps(model, x)
    assert maps.shape == (2, 2, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(maps.flatten(2), timm_probs["p"][:, :, 0, 1:])


def official_dino_threshold(attentions, threshold):
    """The loop of DINO's visualize_attention.py, verbatim in substance: (heads, N) -> (heads, N) mask."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attentions.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


def test_threshold_keeps_the_top_mass_as_the_dino_script():
    m = torch.tensor([[[0.5, 0.3], [0.15, 0.05]]])
    # ascending 0.05, 0.15, 0.3, 0.5: cumulative 0.05, 0.2, 0.5, 1.0
    assert threshold_mass(m, 0.6).tolist() == [[[True, True], [False, False]]]  # > 0.4: keeps 0.3 and 0.5
    assert threshold_mass(m, 0.9).tolist() == [[[True, True], [True, False]]]  # > 0.1: drops only 0.05
    maps = torch.rand(3, 4, 6, 3).softmax(-1)
    ours = threshold_mass(maps, 0.6)
    for b in range(3):
        assert torch.equal(ours[b].flatten(1), official_dino_threshold(maps[b].flatten(1).clone(), 0.6))
    kept = (maps * ours).flatten(2).sum(-1) / maps.flatten(2).sum(-1)
    assert (kept >= 0.6 - 1e-6).all()
    with pytest.raises(ValueError, match="fraction"):
        threshold_mass(maps, 0.0)


def panel_grid_size(n_panels, n_rows, panel_hw):
    h, w = panel_hw
    return n_panels * w + (n_panels - 1) * GAP, n_rows * (h + LABEL_H) + (n_rows - 1) * GAP


def test_attention_command_on_a_stage1_checkpoint(tmp_path):
    model = tiny_vit()
    backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    head = {"head.last_layer.weight": torch.zeros(8, 32)}
    config = {"model": {"arch": "vit_small", "embed_dim": 32, "num_heads": 2}, "crops": {"global_crops_size": [32, 16]}}
    save_checkpoint({"teacher": {**backbone, **head}, "student": {}, "config": config, "epoch": 1}, tmp_path / "c.pth")
    images = write_images(tmp_path / "img")
    main(["attention", "--checkpoint", str(tmp_path / "c.pth"), "--images", *map(str, images),
          "--out", str(tmp_path / "out"), "--threshold", "0.6"])  # fmt: skip
    # default magnification 6: 192 x 96 panels; input + 2 heads + mean; maps row + thresholded row per image
    assert Image.open(tmp_path / "out" / "person_0.png").size == panel_grid_size(4, 2, (192, 96))
    assert Image.open(tmp_path / "out" / "attention.png").size == panel_grid_size(4, 4, (192, 96))
    # the weights really came from the file: same maps as the network that was saved
    loaded, size, _, _ = load_vit(tmp_path / "c.pth")
    x = torch.randn(1, 3, 32, 16)
    assert size == (32, 16)
    torch.testing.assert_close(cls_attention_maps(loaded, x), cls_attention_maps(model, x))


def png_chunks(path):
    """(type, data) of each chunk of a PNG file."""
    data, chunks, at = Path(path).read_bytes(), [], 8
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        chunks.append((data[at + 4 : at + 8].decode("ascii"), data[at + 8 : at + 8 + n]))
        at += 12 + n
    return chunks


def test_pictures_are_byte_identical_for_the_same_inputs(tmp_path):
    # make pictures must rewrite pic/ with the same bytes when the demo data and checkpoints are the same: the three
    # commands twice on the same inputs, and no time stamp (tIME) or other varying metadata in the files
    model = tiny_vit()
    backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    config = {"model": {"arch": "vit_small", "embed_dim": 32, "num_heads": 2}, "crops": {"global_crops_size": [32, 16]}}
    save_checkpoint({"teacher": backbone, "student": {}, "config": config, "epoch": 1}, tmp_path / "c.pth")
    images = [str(p) for p in write_images(tmp_path / "img", n=9, size=(32, 16))]
    query = [(images[i], 1 + i % 2, i % 2) for i in range(3)]
    gallery = [(images[3 + j], (1, 2, 0, 1, 2, -1)[j], j % 3) for j in range(6)]
    rng = np.random.default_rng(0)
    qf, gf = rng.integers(0, 3, (3, 4)).astype(np.float32), rng.integers(0, 3, (6, 4)).astype(np.float32)  # ties
    for out, t in ((tmp_path / "a", 1.0), (tmp_path / "b", 2.0)):  # two runs that differ only in their wall clock
        write_log(out / "logs" / "run", [{"kind": "epoch", "step": 4, "epoch": 1, "loss": 2.0, "time": t, "img_s": t},
                                         {"kind": "eval", "step": 4, "epoch": 1, "rank1": 0.5, "mAP": 0.4, "time": t}])
        main(["attention", "--checkpoint", str(tmp_path / "c.pth"), "--images", *images[:2], "--scale", "2",
              "--threshold", "0.6", "--out", str(out / "attention")])  # fmt: skip
        write_rank_lists(qf, gf, query, gallery, out / "ranks", "euclidean", num_queries=2, order="even", topk=3,
                         size=(32, 16), distractor_pid=0)  # fmt: skip
        plot_curves([out / "logs" / "run"], out / "curves.png", "a title")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*") if p.suffix != ".jsonl")
    assert len(files) == 6  # 2 + 1 attention, ranks png + json, curves
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        if f.suffix == ".png":
            kinds = [k for k, _ in png_chunks(tmp_path / "a" / f)]
            assert "tIME" not in kinds and kinds[0] == "IHDR" and kinds[-1] == "IEND"
            texts = [d for k, d in png_chunks(tmp_path / "a" / f) if k in ("tEXt", "iTXt", "zTXt")]
            assert all(t.startswith(b"Software") for t in texts), texts  # matplotlib's name and version at most


def test_attention_command_on_an_export_and_an_official_dino_checkpoint(tmp_path):
    model = tiny_vit()
    images = write_images(tmp_path / "img", n=1)
    save_checkpoint(model.state_dict(), tmp_path / "export" / "teacher_backbone.pth")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="number of heads of a 32-dim ViT; pass --num-heads"):
        main(["attention", "--checkpoint", str(tmp_path / "export" / "teacher_backbone.pth"), "--images",
              str(images[0]), "--out", str(out)])  # fmt: skip
    # the run's config.yaml beside an export tells the heads
    (tmp_path / "export" / "config.yaml").write_text("model: {arch: vit_small, embed_dim: 32, num_heads: 2}\n")
    main(["attention", "--checkpoint", str(tmp_path / "export" / "teacher_backbone.pth"), "--images", str(images[0]),
          "--out", str(out), "--size", "64", "32", "--scale", "2"])  # fmt: skip
    assert Image.open(out / "person_0.png").size == panel_grid_size(4, 1, (128, 64))  # rectangular 64x32, x2

    # official DINO layout: teacher with backbone./head. keys, student wrapped in DDP (module.)
    state = model.state_dict()
    official = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.mlp.0.weight": torch.zeros(4, 32)},
                "student": {f"module.backbone.{k}": v for k, v in state.items()}, "epoch": 100}  # fmt: skip
    save_checkpoint(official, tmp_path / "dino_official.pth")
    # a stage-2 model: the heads come from its spec, the weights are its backbone's
    reid = demo_model(tmp_path)
    loaded, size, mean, _ = load_vit(tmp_path / "model.pth")
    assert size == (32, 16) and mean == (0.485, 0.456, 0.406)
    x = torch.randn(1, 3, 32, 16)
    torch.testing.assert_close(cls_attention_maps(loaded, x), cls_attention_maps(reid.backbone, x))

    for key in ("teacher", "student"):
        loaded, size, _, _ = load_vit(tmp_path / "dino_official.pth", key=key, num_heads=2)
        assert size == (256, 128)  # no hint in the file: person crops
        x = torch.randn(1, 3, 256, 128)
        torch.testing.assert_close(cls_attention_maps(loaded, x), cls_attention_maps(model, x))


def test_attention_refuses_a_resnet(tmp_path):
    resnet, _ = build_backbone("resnet18")
    save_checkpoint(resnet.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(SystemExit, match=f"attention maps need a ViT; {tmp_path / 'r18.pth'} holds a resnet18"):
        main(["attention", "--checkpoint", str(tmp_path / "r18.pth"), "--images", "x.jpg", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------------------
# Ranked lists


def test_rank_lists_agree_with_evaluate_rank():
    rng = np.random.default_rng(1)
    q, g = 30, 80
    distmat = rng.integers(0, 12, (q, g)).astype(np.float32) / 12  # many ties: order must follow gallery index
    q_pids, g_pids = rng.integers(1, 8, q), rng.integers(-1, 8, g)  # -1 junk, 0 distractors
    q_cams, g_cams = rng.integers(0, 3, q), rng.integers(0, 3, g)
    lists = rank_lists(distmat, q_pids, g_pids, q_cams, g_cams, topk=10)
    ref = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    aps = [r["ap"] for r in lists if r["ap"] is not None]
    assert len(aps) == ref["num_valid"]
    assert np.mean(aps) == pytest.approx(ref["mAP"], abs=1e-12)
    assert np.mean([r["first_match"] == 1 for r in lists if r["ap"] is not None]) == pytest.approx(ref["cmc"][0])
    for r in lists:
        i = r["query"]
        keys = [(distmat[i, e["gallery"]], e["gallery"]) for e in r["entries"]]
        assert keys == sorted(keys)
        assert [e["rank"] for e in r["entries"] if e["rank"] is not None] == list(range(1, 11))
        for e in r["entries"]:
            j = e["gallery"]
            assert g_pids[j] != -1
            same = g_pids[j] == q_pids[i]
            expected = "same_camera" if same and g_cams[j] == q_cams[i] else ("match" if same else "wrong")
            assert e["status"] == expected and (e["rank"] is None) == (expected == "same_camera")
    ordered = worst_first(lists)
    valid = [r["ap"] for r in ordered if r["ap"] is not None]
    assert valid == sorted(valid) and all(r["ap"] is None for r in ordered[len(valid) :])
    assert [r["ap"] for r in select(ordered, 3, "best")] == sorted(valid)[::-1][:3]
    assert len(select(ordered, 5, "even")) == 5 and select(ordered, 5, "even")[0] is ordered[0]


def test_ranked_list_marks_true_matches_green(tmp_path):
    # query: identity 1 in camera 0. Gallery: a true match from camera 1, another person, identity 1 again in camera 0
    # (excluded by the protocol), a junk box (removed) and a distractor.
    paths = [str(p) for p in write_images(tmp_path, n=6, size=(32, 16))]
    q_pids, q_cams = np.array([1]), np.array([0])
    g_pids, g_cams = np.array([1, 2, 1, -1, 0]), np.array([1, 1, 0, 2, 2])
    distmat = np.array([[0.3, 0.1, 0.05, 0.0, 0.4]])
    (lst,) = rank_lists(distmat, q_pids, g_pids, q_cams, g_cams, topk=3)
    assert [(e["gallery"], e["status"], e["rank"]) for e in lst["entries"]] == [
        (2, "same_camera", None), (1, "wrong", 1), (0, "match", 2), (4, "wrong", 3)]  # fmt: skip
    assert lst["ap"] == 0.5 and lst["first_match"] == 2
    query = [(paths[0], 1, 0)]
    gallery = [(p, int(pid), int(cam)) for p, pid, cam in zip(paths[1:], g_pids, g_cams)]
    picture, boxes = draw_ranks([lst], query, gallery, size=(32, 16), distractor_pid=0)
    panel_w, panel_h = 16 + 2 * BORDER, 32 + 2 * BORDER + 2 * LABEL_H  # two lines of text above each image
    assert boxes[0][-1][2] == 5 * panel_w + 5 * GAP  # query, separator (one more gap), 4 entries
    # the legend on top, wrapped at the rows' width: here narrower than any item, so one item a line
    assert picture.height == len(LEGEND) * LABEL_H + GAP + panel_h
    colors = []
    for box in boxes[0][0:1] + boxes[0][2:]:
        x0, y0, x1, y1 = box
        assert y1 == picture.height
        ring = [(x0 + 1, y0 + 2 * LABEL_H + 1), (x1 - 2, y1 - 2), (x0 + 1, y1 - 2)]  # corners inside the border
        assert len({picture.getpixel(p) for p in ring}) == 1
        colors.append(picture.getpixel(ring[0]))
    assert colors == [QUERY, BLUE, RED, GREEN, RED]


def test_tile_labels_name_identity_camera_rank_and_distance():
    # query: identity 7 in camera 2 (camid 1). Gallery: identity 7 in camera 2 (excluded), a distractor in camera 1,
    # identity 7 in camera 3 (the match), identity 4 in camera 6, junk (never ranked).
    q_pids, q_cams = np.array([7]), np.array([1])
    g_pids, g_cams = np.array([7, 0, 7, 4, -1]), np.array([1, 0, 2, 5, 3])
    distmat = np.array([[0.125, 0.25, 0.5, 0.75, 0.0]])
    (lst,) = rank_lists(distmat, q_pids, g_pids, q_cams, g_cams, topk=3)
    query = [("q.jpg", 7, 1)]
    gallery = [(f"g{j}.jpg", int(p), int(c)) for j, (p, c) in enumerate(zip(g_pids, g_cams))]
    assert tile_labels(lst, query, gallery, distractor_pid=0) == [
        ["id 7 c2", "AP 0.50"],
        ["id 7 c2", "excl 0.12"],
        ["distractor c1", "1: 0.25"],
        ["id 7 c3", "2: 0.50"],
        ["id 4 c6", "3: 0.75"],
    ]
    # a set without distractors (MSMT17: pid 0 is a person) names pid 0 as an identity; no true match left: no AP
    lst = rank_lists(distmat, np.array([9]), g_pids, q_cams, g_cams, topk=1)[0]
    assert tile_labels(lst, [("q.jpg", 9, 1)], gallery) == [["id 9 c2", "no match"], ["id 7 c2", "1: 0.12"]]


def test_rank_lists_refuse_features_that_do_not_match_the_images(tmp_path):
    query, gallery = [("q.jpg", 1, 0)] * 3, [("g.jpg", 1, 1)] * 6
    with pytest.raises(ValueError, match="^3 query and 5 gallery features for 3 query and 6 gallery images; expected"):
        write_rank_lists(np.zeros((3, 4)), np.zeros((5, 4)), query, gallery, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing written


def demo_model(tmp_path):
    torch.manual_seed(0)
    spec = dict(arch="vit_small", img_size=[32, 16], patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=30,
                feature="cls_mean", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # fmt: skip
    model = build_reid_model(spec)
    save_reid_model(model, tmp_path / "model.pth")
    return model.eval()


def test_ranks_command_and_eval_reid_save_ranks(small_demo, tmp_path, run_script, monkeypatch):
    import dino_recog.evaluation

    embedded, embed = [], dino_recog.evaluation.embed

    def counted(model, images, flip=False):  # every extraction (evaluation, ranks, eval_reid) goes through it
        embedded.append(len(images))
        return embed(model, images, flip)

    monkeypatch.setattr(dino_recog.evaluation, "embed", counted)
    model = demo_model(tmp_path)
    market = small_demo / "market"
    data = ds.load_market1501(market)
    overrides = [f"data.test={{name: market1501, root: {market}}}", "data.num_workers=0", "run.device=cpu"]
    main(["ranks", "--checkpoint", str(tmp_path / "model.pth"), "--num-queries", "3", "--out", str(tmp_path / "r"),
          *overrides])  # fmt: skip
    assert sum(embedded) == len(data.query) + len(data.gallery)  # each image once
    thumb_w, thumb_h = 64 + 2 * BORDER, 128 + 2 * BORDER + 2 * LABEL_H
    picture = Image.open(tmp_path / "r" / "ranks.png")
    assert picture.height == legend(LEGEND, picture.width).height + 3 * thumb_h + 3 * GAP  # legend, 3 queries
    assert picture.width >= 12 * thumb_w + 11 * GAP  # query, separator, 10 ranked (+ excluded ones)
    report = json.loads((tmp_path / "r" / "ranks.json").read_text())
    tf = reid_test_transform((32, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = evaluate_query_gallery(model, ds.ImageDataset(data.query, tf, train=False),
                                      ds.ImageDataset(data.gallery, tf, train=False), torch.device("cpu"))  # fmt: skip
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert len(report["queries"]) == len(data.query)
    aps = [q["ap"] for q in report["queries"] if q["ap"] is not None]
    assert aps == sorted(aps)  # worst first
    first = report["queries"][0]
    assert first["query"] in {r.path for r in data.query}
    assert all(Path(e["path"]).is_file() for e in first["ranked"])

    # eval_reid.py in this interpreter (tests/test_eval_scripts.py runs it in a fresh one): its ranked lists come from
    # the features it evaluated, not from a second extraction
    embedded.clear()
    run_script("eval_reid.py", "--checkpoint", tmp_path / "model.pth", "--save-ranks", tmp_path / "e", *overrides)
    assert sum(embedded) == len(data.query) + len(data.gallery)
    assert json.loads((tmp_path / "e" / "ranks.json").read_text())["mAP"] == pytest.approx(report["mAP"])
    picture = Image.open(tmp_path / "e" / "ranks.png")
    assert picture.height == legend(LEGEND, picture.width).height + 20 * thumb_h + 20 * GAP  # the 20 worst by default


# ---------------------------------------------------------------------------------------------------------------------
# Curves


def write_log(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow  # a fresh interpreter (about 9 s of start-up on 2 cores)
def test_curves_of_two_runs(tmp_path):
    dino = [{"kind": "eval", "step": 0, "epoch": 0, "knn_top1": 0.1, "rank1": 0.05, "mAP": 0.04}]
    dino += [{"kind": "train", "step": s, "epoch": s // 10, "loss": 5.0, "lr": 1e-4 * s} for s in range(0, 30, 5)]
    dino += [{"kind": "epoch", "step": 10 * e, "epoch": e, "loss": 6.0 - e} for e in (1, 2, 3)]
    dino += [{"kind": "epoch", "step": 20, "epoch": 2, "loss": 3.5}]  # a resumed run logs epoch 2 again: it wins
    dino += [{"kind": "eval", "step": 30, "epoch": 3, "knn_top1": 0.2, "rank1": 0.1, "mAP": 0.08}]
    write_log(tmp_path / "dino", dino)
    write_log(tmp_path / "recog", [{"kind": "epoch", "step": 4, "epoch": 1, "loss": 2.0},
                                   {"kind": "eval", "step": 4, "epoch": 1, "rank1": 0.5, "mAP": 0.4}])  # fmt: skip
    s = run_series(tmp_path / "dino")
    assert s["lr"][0] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # steps / 10 iterations per epoch
    assert s["loss"] == ([1.0, 2.0, 3.0], [5.0, 3.5, 3.0])
    assert s["mAP"] == ([0.0, 3.0], [4.0, 8.0])  # percent
    out = tmp_path / "curves.png"
    main(["curves", str(tmp_path / "dino"), str(tmp_path / "recog"), "--out", str(out)])
    w, h = PANEL_INCHES
    assert Image.open(out).size == (round(3 * w * DPI), round(2 * h * DPI))  # loss, lr, knn | rank1, mAP
    # one run with a loss only: one panel; through `python -m`, as the Makefile calls it
    write_log(tmp_path / "lossonly", [{"kind": "epoch", "step": 4, "epoch": 1, "loss": 2.0}])
    r = subprocess.run([sys.executable, "-m", "dino_recog.visualize", "curves", str(tmp_path / "lossonly"), "--out",
                        str(tmp_path / "one.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "one.png").size == (round(w * DPI), round(h * DPI))
    main(["curves", str(tmp_path / "recog"), "--out", str(out)])  # loss, rank-1, mAP: one row
    assert Image.open(out).size == (round(3 * w * DPI), round(h * DPI))


def test_curves_of_a_stage1_run_show_ln_k_and_the_collapse_monitors(tmp_path):
    """ln K (from config.yaml's model.out_dim) is a line on the loss panel, and the monitors logged every log interval
    get a panel each; with DINOv2 the ln K line goes with the DINO term, not the loss (which adds iBOT and KoLeo)."""
    monitors = {"entropy_ratio": 0.95, "kl": 0.05, "teacher_batch_entropy": 6.5, "teacher_entropy": 6.6}
    v1 = [{"kind": "train", "step": s, "epoch": s // 10, "loss": 6.8, "lr": 1e-4, **monitors} for s in range(0, 30, 10)]
    v1 += [{"kind": "epoch", "step": 10 * e, "epoch": e, "loss": 6.8} for e in (1, 2, 3)]
    write_log(tmp_path / "v1", v1)
    (tmp_path / "v1" / "config.yaml").write_text("model: {out_dim: 1024}\ndino: {teacher_temp: 0.04}\n")
    fig = curves_figure([tmp_path / "v1"])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"loss (epoch mean)", "learning rate", "teacher entropy / ln K", "KL(teacher || student)",
                         "teacher batch entropy"}  # fmt: skip
    lines = {line.get_label(): line for line in axes["loss (epoch mean)"].get_lines()}
    assert set(lines) == {"v1", "ln K (v1)"}
    assert np.allclose(lines["ln K (v1)"].get_ydata(), np.log(1024))
    ratio = axes["teacher entropy / ln K"].get_lines()[0]
    assert list(ratio.get_xdata()) == [0.0, 1.0, 2.0] and list(ratio.get_ydata()) == [0.95] * 3  # per log interval
    assert list(axes["KL(teacher || student)"].get_lines()[0].get_ydata()) == [0.05] * 3
    # DINOv2, without config.yaml: ln K from the monitors (entropy / ratio), on the DINO-term panel
    v2 = [dict(r, dino=6.0) if r["kind"] == "epoch" else r for r in v1]
    write_log(tmp_path / "v2", v2)
    axes = {ax.get_title(): ax for ax in curves_figure([tmp_path / "v2"]).axes}
    assert [line.get_label() for line in axes["loss (epoch mean)"].get_lines()] == ["v2"]
    ln_k = [line for line in axes["DINO term (epoch mean)"].get_lines() if line.get_label() == "ln K (v2)"]
    assert ln_k and np.allclose(ln_k[0].get_ydata(), 6.6 / 0.95)
    # a stage-2 run has neither the line nor the monitor panels
    write_log(tmp_path / "recog", [{"kind": "epoch", "step": 4, "epoch": 1, "loss": 2.0}])
    (tmp_path / "recog" / "config.yaml").write_text("model: {arch: vit_small}\n")
    (ax,) = [ax for ax in curves_figure([tmp_path / "recog"]).axes if ax.get_visible()]
    assert [line.get_label() for line in ax.get_lines()] == ["recog"]


def test_attention_help_says_the_mask_row_is_drawn_only_when_asked(capsys):
    from dino_recog.visualize import main

    with pytest.raises(SystemExit):
        main(["attention", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(DINO's figures use 0.6; default: no mask row)" in help_text
