import math

import pytest
import torch
import torch.nn.functional as F

from dino_recog.losses import DINOLoss, collapse_stats


def reference_dino_loss(student_out, teacher_out, center, teacher_temp, n_crops, student_temp=0.1, momentum=0.9):
    """The paper's loss as the official code writes it: a double loop over teacher and student views."""
    s = (student_out / student_temp).chunk(n_crops)
    q = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, qq in enumerate(q):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-qq * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms += 1
    new_center = center * momentum + teacher_out.mean(0, keepdim=True) * (1 - momentum)
    return total / terms, new_center


@pytest.mark.parametrize("n_local", [0, 1, 3, 8])
def test_dino_loss_equals_double_loop_and_updates_center(n_local):
    torch.manual_seed(n_local)
    batch, dim, n_crops = 5, 17, 2 + n_local
    loss_fn = DINOLoss(dim)
    loss_fn.center.normal_()  # a non-zero centre so centring is exercised
    center0 = loss_fn.center.clone()
    student = torch.randn(n_crops * batch, dim, requires_grad=True)
    teacher = torch.randn(2 * batch, dim)
    teacher_copy, student_copy = teacher.clone(), student.detach().clone()
    loss = loss_fn(student, teacher, teacher_temp=0.05)
    ref, ref_center = reference_dino_loss(student, teacher, center0, 0.05, n_crops)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, ref_center)
    # gradients equal too
    g = torch.autograd.grad(loss, student)[0]
    g_ref = torch.autograd.grad(reference_dino_loss(student, teacher, center0, 0.05, n_crops)[0], student)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(teacher, teacher_copy) and torch.equal(student.detach(), student_copy)  # inputs untouched


def test_dino_loss_hand_computed_value():
    # Two crops (the global ones only), K=2, uniform student: each term is the cross-entropy with log 2 whatever q is.
    loss_fn = DINOLoss(2, student_temp=0.1)
    loss = loss_fn(torch.zeros(4, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.0]]), 0.04)
    assert loss.item() == pytest.approx(math.log(2))
    torch.testing.assert_close(loss_fn.center, 0.1 * torch.tensor([[3.5 / 4, 1.5 / 4]]))


def test_teacher_gets_no_gradient():
    teacher = torch.randn(4, 3, requires_grad=True)
    DINOLoss(3)(torch.randn(6, 3, requires_grad=True), teacher, 0.04).backward()
    assert teacher.grad is None


def test_shape_errors():
    with pytest.raises(ValueError, match="not a multiple of the batch"):
        DINOLoss(3)(torch.randn(7, 3), torch.randn(4, 3), 0.04)
    with pytest.raises(ValueError, match="leave no pair of different views"):
        DINOLoss(3, n_global_crops=1)(torch.randn(2, 3), torch.randn(2, 3), 0.04)


def test_collapse_stats_detect_both_modes():
    k = 8
    uniform = collapse_stats(torch.zeros(4, k), torch.zeros(4, k), torch.zeros(1, k), 0.1, 0.04)
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5) and uniform["kl"] == pytest.approx(0)
    one_dim = torch.zeros(4, k)
    one_dim[:, 3] = 10.0
    stats = collapse_stats(one_dim, one_dim, torch.zeros(1, k), 0.1, 0.04)
    assert stats["teacher_batch_entropy"] < 1e-3 and stats["teacher_entropy"] < 1e-3
