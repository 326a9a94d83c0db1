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


def test_collapse_stats_read_the_sinkhorn_knopp_targets_when_the_loss_uses_them():
    """With Sinkhorn-Knopp the centre stays 0: the monitors must describe SK's targets, not softmax(g_t / tau)."""
    from dino_recog.losses.dinov2 import sinkhorn_knopp

    one_dim = torch.zeros(6, 8)
    one_dim[:, 3] = 1.0  # every image on prototype 3 before the equipartition
    one_dim += 0.01 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    stats = collapse_stats(one_dim, one_dim, torch.zeros(1, 8), 0.1, 0.04, centering="sinkhorn_knopp")
    q = sinkhorn_knopp(one_dim, 0.04)
    assert stats["teacher_entropy"] == pytest.approx(-(q * q.clamp_min(1e-30).log()).sum(-1).mean().item(), rel=1e-5)
    assert stats["teacher_batch_entropy"] > 1.0  # SK spreads the batch; the plain softmax would put it on one prototype
    assert collapse_stats(one_dim, one_dim, torch.zeros(1, 8), 0.1, 0.04)["teacher_batch_entropy"] < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Stage-2 losses

from dino_recog.losses import (  # noqa: E402
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    CrossEntropyLabelSmooth,
    DistillationLoss,
    TripletLoss,
)


def unit_at_angles(angles):
    """2-D unit features at the given angles (radians) and a weight matrix with classes at angle 0 and pi/2."""
    f = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    return f


@pytest.mark.parametrize(
    "cls, expected", [(CosFaceLoss, lambda t, m: math.cos(t) - m), (ArcFaceLoss, lambda t, m: math.cos(t + m))]
)
def test_margin_logits_for_known_angles(cls, expected):
    loss = cls(2, 2, s=10.0, m=0.3)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0]]))  # class 0 at angle 0, class 1 at pi/2 (unnormalised)
    theta = 0.4
    logits = loss.logits(unit_at_angles([theta]) * 3.0, torch.tensor([0]))  # feature norm does not matter
    assert logits[0, 0].item() == pytest.approx(10 * expected(theta, 0.3), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(10 * math.cos(math.pi / 2 - theta), abs=1e-5)  # non-target: s cos


@pytest.mark.parametrize("cls", [CosFaceLoss, ArcFaceLoss])
def test_zero_margin_is_scaled_cosine_cross_entropy(cls):
    torch.manual_seed(0)
    f, y = torch.randn(6, 4), torch.randint(0, 5, (6,))
    loss = cls(4, 5, s=16.0, m=0.0)
    cos = F.normalize(f, dim=1) @ F.normalize(loss.weight, dim=1).t()
    assert loss(f, y).item() == pytest.approx(F.cross_entropy(16.0 * cos, y).item(), rel=1e-5)


def test_arcface_fallback_near_pi():
    loss = ArcFaceLoss(2, 2, s=1.0, m=0.5)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = math.pi - 0.2  # theta + m > pi
    logit = loss.logits(unit_at_angles([theta]), torch.tensor([0]))[0, 0].item()
    assert logit == pytest.approx(math.cos(theta) - 0.5 * math.sin(0.5), abs=1e-5)
    assert logit < math.cos(theta)  # still a penalty, and monotone: no wrap-around of cos(theta + m)
    near = loss.logits(unit_at_angles([math.pi - 0.5 - 0.01]), torch.tensor([0]))[0, 0].item()
    assert near == pytest.approx(math.cos(math.pi - 0.01), abs=1e-4)  # just inside: cos(theta + m)


def test_triplet_picks_hardest_positive_and_negative():
    # 1-D features: class 0 at 0, 1, 3; class 1 at 4, 10. Anchor 0 (x=0): hardest pos 3, hardest neg 4.
    f = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    hp = torch.tensor([3.0, 2.0, 3.0, 6.0, 6.0])
    hn = torch.tensor([4.0, 3.0, 1.0, 1.0, 7.0])
    assert TripletLoss(margin=0.5)(f, y).item() == pytest.approx(F.relu(hp - hn + 0.5).mean().item())
    assert TripletLoss(margin=0.0)(f, y).item() == pytest.approx(F.softplus(hp - hn).mean().item())
    cos = TripletLoss(0.3, metric="cosine")(torch.tensor([[1.0, 0], [1, 0.1], [0, 1]]), torch.tensor([0, 0, 1]))
    assert cos.item() >= 0
    assert TripletLoss()(torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 2])).item() == 0.0  # no positive


def test_label_smoothing_zero_is_cross_entropy_and_value():
    z, y = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    assert CrossEntropyLabelSmooth(6, 0.0)(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())
    eps = 0.1
    ref = (-((1 - eps) * F.one_hot(y, 6) + eps / 6) * F.log_softmax(z, 1)).sum(1).mean()
    assert CrossEntropyLabelSmooth(6, eps)(z, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_distillation_alpha_zero_is_ce_and_teacher_gets_no_gradient():
    z = torch.randn(5, 4, requires_grad=True)
    zt = torch.randn(5, 4, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    assert DistillationLoss(alpha=0.0)(z, y, zt).item() == pytest.approx(F.cross_entropy(z, y).item())
    loss = DistillationLoss(alpha=0.7, temperature=3.0)(z, y, zt)
    kl = (F.softmax(zt / 3, 1) * (F.log_softmax(zt / 3, 1) - F.log_softmax(z / 3, 1))).sum(1).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(z, y) + 0.7 * 9 * kl).item(), rel=1e-5)
    loss.backward()
    assert z.grad is not None and zt.grad is None


def test_center_loss_value():
    loss = CenterLoss(2, 3)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    f = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    assert loss(f, torch.tensor([0, 1])).item() == pytest.approx(0.5 * (1 + 4) / 2)


def _aten_ops(fn) -> list[str]:
    """The ATen operators `fn()` runs, by name (what the device would launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ops: list[str] = []
    with Record():
        fn()
    return ops


def test_the_teacher_ema_and_the_centre_step_are_one_fused_operation_each():
    """update_teacher: one _foreach_lerp_ over all parameters; the centre's EMA step: one lerp_ (no mul + add, no
    host sync), deferred or not, for DINO and iBOT alike (one shared implementation)."""
    from dino_recog.losses import IBOTPatchLoss
    from dino_recog.models import update_teacher

    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ops = _aten_ops(lambda: update_teacher(s, t, 0.9))
    assert ops.count("_foreach_lerp_") == 1 and not {"_foreach_mul_", "_foreach_add_"} & set(ops)
    for loss in (DINOLoss(8), IBOTPatchLoss(8)):
        center = loss.center.clone()
        ops = _aten_ops(lambda loss=loss: loss.update_center(torch.ones(4, 8)))
        assert ops.count("lerp_") == 1 and not {"mul_", "add_", "item", "_local_scalar_dense"} & set(ops)
        torch.testing.assert_close(loss.center, 0.9 * center + 0.1)
