"""The DINOv2 loss terms (losses/dinov2.py) against independent, loop-by-loop references."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import train_sh

from dino_recog.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp


def reference_koleo(x, eps=1e-8):
    """Sablayrolles et al. eq. 5 written out: for each feature, the distance to its nearest other feature."""
    x = x / x.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(x)):
        nearest = min((x[i] - x[j]).norm() for j in range(len(x)) if j != i)
        total = total - torch.log(nearest + eps)
    return total / len(x)


def reference_sinkhorn(logits, temp, iterations=3):
    """SwAV's algorithm in float64 with explicit loops over prototypes and samples, no shift of the logits."""
    q = torch.exp(logits.double() / temp).t().clone()  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] /= q[row].sum() * k
        for col in range(b):
            q[:, col] /= q[:, col].sum() * b
    return (q * b).t()


def reference_ibot(student, teacher, masks, center, teacher_temp, student_temp=0.1, sinkhorn=False):
    """iBOT's masked-patch cross-entropy image by image, patch by patch, with DINOv2's 1/m_i weights."""
    q_all = reference_sinkhorn(teacher, teacher_temp).float() if sinkhorn else None
    total, row = 0.0, 0
    for mask in masks:
        m = int(mask.sum())
        for _ in range(m):
            q = q_all[row] if sinkhorn else F.softmax((teacher[row] - center[0]) / teacher_temp, dim=-1)
            total = total - (q * F.log_softmax(student[row] / student_temp, dim=-1)).sum() / m
            row += 1
    return total / len(masks)


# ---------------------------------------------------------------------------------------------------------------------
# KoLeo


@pytest.mark.parametrize("n, dim", [(2, 3), (7, 5), (16, 32)])
def test_koleo_equals_brute_force_double_loop(n, dim):
    torch.manual_seed(n)
    x = (torch.randn(n, dim) * 3).requires_grad_()
    x_copy = x.detach().clone()
    loss = KoLeoLoss()(x)
    ref = reference_koleo(x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g = torch.autograd.grad(loss, x)[0]
    g_ref = torch.autograd.grad(reference_koleo(x), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(x.detach(), x_copy)


def test_koleo_hand_computed_and_scale_invariant():
    # Four unit vectors at 90 degrees: every nearest neighbour is sqrt(2) away, so the loss is -log(sqrt(2)).
    x = torch.eye(4)
    assert KoLeoLoss()(x).item() == pytest.approx(-0.5 * math.log(2), rel=1e-6)
    assert KoLeoLoss()(7.0 * x).item() == pytest.approx(-0.5 * math.log(2), rel=1e-6)
    # Spreading the features lowers the loss: two near-duplicates cost more than two orthogonal vectors.
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01]])
    assert KoLeoLoss()(close) > KoLeoLoss()(torch.eye(2))
    with pytest.raises(ValueError, match="n >= 2"):
        KoLeoLoss()(torch.randn(1, 4))


# ---------------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_equals_loop_reference(iterations):
    torch.manual_seed(iterations)
    logits = torch.randn(9, 5)
    out = sinkhorn_knopp(logits, 0.1, iterations)
    torch.testing.assert_close(out, reference_sinkhorn(logits, 0.1, iterations).float(), rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals_and_no_overflow():
    torch.manual_seed(0)
    b, k = 12, 4
    logits = torch.randn(b, k)
    q = sinkhorn_knopp(logits, 0.1, iterations=300) / b  # the (B, K) transport plan before the final x B
    torch.testing.assert_close(q.sum(1), torch.full((b,), 1 / b))  # every sample: 1/B
    torch.testing.assert_close(q.sum(0), torch.full((k,), 1 / k))  # every prototype: 1/K
    # exp(t / 0.04) overflows float32 for t > 3.5; the shift by the maximum keeps the float64 reference's answer.
    big = logits + 10.0
    assert torch.isinf(torch.exp(big / 0.04)).any()
    torch.testing.assert_close(sinkhorn_knopp(big, 0.04), reference_sinkhorn(big, 0.04).float(), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(sinkhorn_knopp(logits * 1000.0, 0.04)).all()  # rows underflowing to 0 do not become NaN
    assert sinkhorn_knopp(logits[:0], 0.1).shape == (0, k)


@pytest.mark.slow
def test_sinkhorn_across_two_processes_equals_one_process(tmp_path):
    r = train_sh("cpu", 2, "tests/scripts/sinkhorn_check.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    logits = ranks[0]["logits"]
    b, k = logits.shape
    # What the two processes computed on 5 + 7 rows is what one process computes on the 12.
    torch.testing.assert_close(torch.cat([r["targets"] for r in ranks]), sinkhorn_knopp(logits, 0.1))
    converged = torch.cat([r["converged"] for r in ranks]) / b
    torch.testing.assert_close(converged.sum(1), torch.full((b,), 1 / b))  # each sample 1/B, B = 12 (both ranks)
    for r in ranks:  # each prototype 1/K, the column sums all-reduced over the processes
        torch.testing.assert_close(r["prototype_mass"] / b, torch.full((k,), 1 / k))
    torch.testing.assert_close(ranks[0]["lonely"], sinkhorn_knopp(logits[:5], 0.1))
    assert ranks[1]["lonely"].shape == (0, k)
    # The iBOT centre is the EMA (momentum 0.5, from 0) of the mean over the 12 masked patches of both processes.
    expected = 0.5 * ranks[0]["patches"].mean(0, keepdim=True)
    for r in ranks:
        torch.testing.assert_close(r["ibot_center"], expected)


def test_dino_loss_with_sinkhorn_uses_its_targets_and_leaves_the_centre():
    torch.manual_seed(0)
    batch, dim, n_crops = 4, 7, 3
    student = torch.randn(n_crops * batch, dim)
    teacher = torch.randn(2 * batch, dim)
    loss_fn = DINOLoss(dim, centering="sinkhorn_knopp")
    loss = loss_fn(student, teacher, 0.05)
    q = reference_sinkhorn(teacher, 0.05).float().chunk(2)
    s = F.log_softmax(student / 0.1, dim=-1).chunk(n_crops)
    terms = [-(q[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(n_crops) if v != i]
    assert loss.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-5)
    assert torch.equal(loss_fn.center, torch.zeros(1, dim))
    with pytest.raises(ValueError, match="centering 'mean'"):
        DINOLoss(dim, centering="mean")


# ---------------------------------------------------------------------------------------------------------------------
# iBOT


def random_masks(n_images, n_patches, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_images, n_patches, generator=g) < 0.4
    masks[0] = False  # an unmasked image still counts in n_images
    masks[1, :3] = True  # and an image with several masked patches
    return masks


@pytest.mark.parametrize("sinkhorn", [False, True])
def test_ibot_loss_equals_hand_written_reference(sinkhorn):
    torch.manual_seed(1)
    n_images, n_patches, k = 5, 8, 11
    masks = random_masks(n_images, n_patches, 2)
    m = int(masks.sum())
    student = torch.randn(m, k, requires_grad=True)
    teacher = torch.randn(m, k)
    loss_fn = IBOTPatchLoss(k, centering="sinkhorn_knopp" if sinkhorn else "center")
    loss_fn.center.normal_()
    center0 = loss_fn.center.clone()
    teacher_copy = teacher.clone()
    loss = loss_fn(student, teacher, masks, 0.04)
    ref = reference_ibot(student, teacher, masks, center0, 0.04, sinkhorn=sinkhorn)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g = torch.autograd.grad(loss, student)[0]
    g_ref = torch.autograd.grad(reference_ibot(student, teacher, masks, center0, 0.04, sinkhorn=sinkhorn), student)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(teacher, teacher_copy)
    expected_center = center0 if sinkhorn else 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_ibot_loss_hand_computed_value():
    # A uniform student costs log K per patch whatever the teacher says; 2 of the 4 images are masked (1 and 3
    # patches), each image's patches weigh 1/m_i, so the loss is (1 + 1) log K / 4.
    k = 5
    masks = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    loss = IBOTPatchLoss(k)(torch.zeros(4, k), torch.randn(4, k), masks, 0.04)
    assert loss.item() == pytest.approx(2 * math.log(k) / 4)


def test_ibot_loss_without_masked_patches_is_zero_and_keeps_the_centre():
    loss_fn = IBOTPatchLoss(3)
    loss_fn.center.fill_(0.5)
    student = torch.zeros(0, 3, requires_grad=True)
    loss = loss_fn(student, torch.zeros(0, 3), torch.zeros(2, 4, dtype=torch.bool), 0.04)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so DDP sees every parameter used
    assert torch.equal(loss_fn.center, torch.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="one row per masked patch"):
        loss_fn(torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(1, 2, dtype=torch.bool), 0.04)
