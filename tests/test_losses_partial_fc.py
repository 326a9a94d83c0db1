import math

import pytest
import torch
import torch.nn.functional as F
from conftest import train_sh

from dino_recog.losses import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, CrossEntropyLabelSmooth
from dino_recog.losses.metric import margin_target
from dino_recog.losses.partial_fc import LabelCorrection, PartialFC, shard_range


def replicated(kind, s, margins, eps, weight):
    """The unsharded loss of each kind, with `weight` as its classifier."""
    m1, m2, m3 = margins
    if kind == "ce":
        ce = CrossEntropyLabelSmooth(len(weight), eps)
        return lambda f, y: ce(f @ weight.t(), y)
    loss = {"cosface": lambda: CosFaceLoss(weight.shape[1], len(weight), s, m3),
            "arcface": lambda: ArcFaceLoss(weight.shape[1], len(weight), s, m2),
            "combined": lambda: CombinedMarginLoss(weight.shape[1], len(weight), s, m1, m2, m3)}[kind]()  # fmt: skip
    del loss.weight
    loss.weight = weight
    return loss


CASES = {
    "ce": ("ce", 1.0, (1.0, 0.0, 0.0), 0.1),
    "cosface": ("cosface", 30.0, (1.0, 0.0, 0.35), 0.0),
    "arcface": ("arcface", 30.0, (1.0, 0.5, 0.0), 0.0),
    "combined": ("combined", 16.0, (1.2, 0.3, 0.1), 0.0),
}


def test_shards_cover_the_classes_once():
    for c, w in [(11, 2), (10, 4), (430_000, 8), (3, 3)]:
        ranges = [shard_range(c, r, w) for r in range(w)]
        assert [first for first, _ in ranges] == [sum(n for _, n in ranges[:r]) for r in range(w)]
        assert sum(n for _, n in ranges) == c and max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def test_combined_margin_is_cosface_and_arcface_at_their_settings():
    cos = torch.linspace(-1, 1, 201)
    torch.testing.assert_close(margin_target(cos, 1.0, 0.0, 0.35), cos - 0.35)
    t = torch.acos(cos)
    arc = torch.where(t < math.pi - 0.5, torch.cos(t + 0.5), cos - 0.5 * math.sin(0.5))  # ArcFace, by hand
    torch.testing.assert_close(margin_target(cos, 1.0, 0.5, 0.0), arc, atol=1e-5, rtol=0)
    # SphereFace-like m1 = 2 with m2, m3: cos(2t + 0.1) - 0.2 up to t* = (pi - 0.1) / 2, decreasing everywhere.
    got = margin_target(cos, 2.0, 0.1, 0.2)
    inside = t < (math.pi - 0.1) / 2
    torch.testing.assert_close(got[inside], torch.cos(2 * t[inside] + 0.1) - 0.2, atol=1e-5, rtol=0)
    assert (got[1:] >= got[:-1] - 1e-6).all()  # cos rising = t falling: the target logit never rises with t


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_equals_the_replicated_loss_and_gradients(name):
    kind, s, margins, eps = CASES[name]
    g = torch.Generator().manual_seed(1)
    f, y, w = torch.randn(12, 8, generator=g), torch.randint(0, 11, (12,), generator=g), torch.randn(11, 8, generator=g)
    pfc = PartialFC(8, 11, kind, s, margins, 1.0, eps)
    with torch.no_grad():
        pfc.weight.copy_(w)
    f1, w2 = f.clone().requires_grad_(True), w.clone().requires_grad_(True)
    f2 = f.clone().requires_grad_(True)
    loss = pfc(f1, y)
    loss.backward()
    ref = replicated(kind, s, margins, eps, w2)(f2, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f1.grad, f2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pfc.weight.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_sampling_keeps_the_positives_is_seeded_and_scores_rate_x_classes():
    pfc = PartialFC(4, 100, "cosface", sample_rate=0.1, seed=5)
    y = torch.tensor([3, 3, 97, 42, 7, 60])
    pfc(torch.randn(6, 4), y)
    first = pfc.last_index
    assert len(first) == 10 and set(y.tolist()) <= set(first.tolist()) and (first.diff() > 0).all()
    pfc(torch.randn(6, 4), y)
    assert not torch.equal(pfc.last_index, first)  # a new draw of negatives each step
    again = PartialFC(4, 100, "cosface", sample_rate=0.1, seed=5)
    again(torch.randn(6, 4), y)
    assert torch.equal(again.last_index, first)  # (seed, rank, step) decide the draw
    resumed = PartialFC(4, 100, "cosface", sample_rate=0.1, seed=5)
    resumed.load_state_dict(pfc.state_dict())
    pfc(torch.randn(6, 4), y)
    resumed(torch.randn(6, 4), y)
    assert torch.equal(resumed.last_index, pfc.last_index)  # the step counter travels with the checkpoint
    many = PartialFC(4, 100, "cosface", sample_rate=0.1)
    many(torch.randn(20, 4), torch.arange(0, 100, 5))  # 20 positives > 10: all of them, no negatives
    assert many.last_index.tolist() == list(range(0, 100, 5))


def test_bad_arguments_are_refused_with_the_value():
    with pytest.raises(ValueError, match="partial FC loss 'sphere': expected one of ce, cosface, arcface, combined"):
        PartialFC(4, 10, "sphere")
    with pytest.raises(ValueError, match=r"sample_rate 0: expected 0 < rate <= 1"):
        PartialFC(4, 10, sample_rate=0)


def restricted_reference(saved, name, sampled):
    kind, s, margins, eps = CASES[name]
    w = saved["weight"][sampled].clone().requires_grad_(True)
    f = saved["features"].clone().requires_grad_(True)
    y = torch.searchsorted(sampled, saved["labels"])
    loss = replicated(kind, s, margins, eps, w)(f, y)
    loss.backward()
    full_w_grad = torch.zeros_like(saved["weight"])
    full_w_grad[sampled] = w.grad
    return loss.detach(), f.grad, full_w_grad


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    r = train_sh("cpu", 2, "tests/scripts/partial_fc_check.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    rows = [slice(0, 5), slice(5, 12)]
    labels = ranks[0]["labels"]
    for name in CASES:
        for rate in (1.0, 0.5):
            key = f"{name}@{rate}"
            if rate == 1.0:
                sampled = torch.arange(11)
                assert all(r[key]["index"] is None for r in ranks)
            else:  # each rank scores half of its shard, its positives among them
                sampled = torch.cat([r[key]["index"] for r in ranks])
                for r in ranks:
                    mine = labels[(labels >= r[key]["first"]) & (labels < r[key]["first"] + r[key]["num_local"])]
                    assert len(r[key]["index"]) == max(int(0.5 * r[key]["num_local"]), len(mine.unique()))
                    assert set(mine.tolist()) <= set(r[key]["index"].tolist())
            loss, f_grad, w_grad = restricted_reference(ranks[0], name, sampled)
            for i, r in enumerate(ranks):
                got = r[key]
                torch.testing.assert_close(got["loss"], loss, atol=1e-5, rtol=1e-5)
                # x 2 processes: DDP halves the backbone's gradient, and the loss is the mean over both shares
                torch.testing.assert_close(got["feature_grad"], 2 * f_grad[rows[i]], atol=1e-5, rtol=1e-5)
                shard = slice(got["first"], got["first"] + got["num_local"])
                torch.testing.assert_close(got["weight_grad"], w_grad[shard], atol=1e-5, rtol=1e-5)
    # Label correction across the two processes is the one-process correction of the whole batch.
    correction = LabelCorrection(start_step=1, alpha=0.5, threshold=0.3, t=0.1, momentum=0.5)  # as the script's
    one = PartialFC(8, 11, "ce", sample_rate=1.0, correction=correction)
    with torch.no_grad():
        one.weight.copy_(3 * ranks[0]["weight"])
    losses = [one(ranks[0]["features"], labels).detach() for _ in range(2)]
    assert int(one.corrected) > 0  # the case corrects some labels
    for r in ranks:
        assert r["correction"]["corrected"] == int(one.corrected)
        torch.testing.assert_close(torch.stack(r["correction"]["losses"]), torch.stack(losses))
    torch.testing.assert_close(torch.cat([r["correction"]["prototypes"] for r in ranks]), one.prototypes)


def test_label_correction_replaces_confident_labels_and_moves_the_prototypes():
    """LabelCorrection on one process, against the formula computed by hand: nothing changes before its start step;
    then a label becomes argmax of alpha softmax(z) + (1 - alpha) softmax(<f, P> / t) when that passes the threshold."""
    w = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]])
    f = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0], [0.9, -0.1]])
    y = torch.tensor([0, 1, 2, 1])  # the last one looks like class 0
    c = LabelCorrection(start_step=1, alpha=0.5, threshold=0.6, t=0.1, momentum=0.5)
    pfc = PartialFC(2, 3, "ce", correction=c)
    with torch.no_grad():
        pfc.weight.copy_(w)
    loss0 = pfc(f, y)  # step 0: before the start, only the prototypes move (from 0, momentum 0.5)
    torch.testing.assert_close(loss0, F.cross_entropy(f @ w.t(), y))
    n = F.normalize(f, dim=1)
    protos = F.normalize(torch.stack([n[0], (n[1] + n[3]) / 2, n[2]]) * 0.5, dim=1)
    torch.testing.assert_close(pfc.prototypes, protos)
    assert int(pfc.corrected) == 0
    soft = 0.5 * F.softmax(f @ w.t(), 1) + 0.5 * F.softmax(n @ protos.t() / 0.1, 1)
    score, best = soft.max(1)
    expected = torch.where(score > 0.6, best, y)
    assert expected.tolist() == [0, 1, 2, 0]  # the hand-built case: only the mislabelled sample changes
    loss1 = pfc(f, y)
    torch.testing.assert_close(loss1, F.cross_entropy(f @ w.t(), expected))
    assert int(pfc.corrected) == 1
    means = torch.stack([(n[0] + n[3]) / 2, n[1], n[2]])  # the prototypes move with the corrected labels
    torch.testing.assert_close(pfc.prototypes, F.normalize(0.5 * protos + 0.5 * means, dim=1))
    pfc.eval()
    pfc(f, y)
    assert int(pfc.corrected) == 1  # evaluation corrects nothing


def test_label_correction_is_a_config_option_of_the_sharded_classifier():
    from dino_recog import config as C
    from dino_recog.tasks import build_reid_task

    with pytest.raises(C.ConfigError, match=r"loss.label_correction needs loss.partial_fc=true"):
        C.load(None, ["loss.label_correction=true"], cls=C.RecogConfig)
    cfg = C.load(None, ["model.arch=vit_tiny", "model.depth=1", "model.pretrained=", "aug.size=[32,16]",
                        "model.patch_size=8", "loss.partial_fc=true", "loss.label_correction=true",
                        "loss.cosface_weight=1", "loss.label_correction_start_epoch=3"], cls=C.RecogConfig)  # fmt: skip
    task = build_reid_task(cfg, num_classes=7, steps_per_epoch=10)
    shards = task.shards()
    assert shards["ce"].correction == LabelCorrection(30, 0.5, 0.8, 0.07, 0.999)  # PNL's values, from epoch 3
    assert shards["cosface"].correction is None  # one classifier corrects
    assert shards["ce"].prototypes.shape == (7, 192)
    task.train()
    task((torch.randn(4, 3, 32, 16), torch.tensor([0, 0, 5, 5])), None)
    assert task.epoch_stats()["labels_corrected"] == 0  # logged with every epoch (none yet: from epoch 3)
