import math

import pytest
import torch
from conftest import train_sh

from dino_recog.losses import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, CrossEntropyLabelSmooth
from dino_recog.losses.metric import margin_target
from dino_recog.losses.partial_fc import PartialFC, shard_range


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
