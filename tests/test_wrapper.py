import numpy as np
import pytest
import torch
import torch.nn as nn

from dino_recog import DINOConf, DINOWrapper
from dino_recog.wrapper import random_resized_crops


def toy_cnn(dim: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, dim),
    )  # fmt: skip


def small_conf(**kw) -> DINOConf:
    return DINOConf(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops_number=2, **kw)


def test_output_is_the_bare_models_and_the_loss_a_differentiable_scalar():
    torch.manual_seed(0)
    model = toy_cnn()
    wrapped = DINOWrapper(model, small_conf(global_crop_size=(32, 16), local_crop_size=(16, 8)))
    images = torch.rand(6, 3, 32, 16)
    out, loss = wrapped(images)
    torch.testing.assert_close(out, model(images))
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    assert model[0].weight.grad is not None and wrapped.head.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in wrapped.teacher_model.parameters())
    wrapped.eval()
    out, loss = wrapped(images)
    assert loss == 0 and out.shape == (6, 32)


def test_update_teacher_moves_only_the_teacher_by_the_ema():
    torch.manual_seed(0)
    wrapped = DINOWrapper(toy_cnn(), small_conf(momentum_teacher=0.9), in_dim=32)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    _, loss = wrapped(torch.rand(4, 3, 32, 16))
    loss.backward()
    opt.step()
    student = {k: v.clone() for k, v in wrapped.model.state_dict().items()}
    teacher_before = [p.clone() for p in wrapped.teacher_model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(teacher_before, wrapped.model.parameters()))
    assert wrapped.update_teacher() == 0.9
    for k, v in wrapped.model.state_dict().items():
        assert torch.equal(v, student[k]), k  # the student is untouched
    for before, s, t in zip(teacher_before, wrapped.model.parameters(), wrapped.teacher_model.parameters()):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s)
    assert int(wrapped.step) == 1


def test_schedules_follow_the_official_ones():
    v2 = DINOWrapper(toy_cnn(), small_conf(version="v2", epochs=100, len_train_loader=10), in_dim=32)
    assert (v2.teacher_temperature(), v2.momentum()) == (pytest.approx(0.04), pytest.approx(0.992))
    v2.step.fill_(150)  # 15 of the 30 warmup epochs
    assert v2.teacher_temperature() == pytest.approx(0.055)
    v2.step.fill_(1000)
    assert (v2.teacher_temperature(), v2.momentum()) == (pytest.approx(0.07), pytest.approx(1.0))
    v1 = DINOWrapper(toy_cnn(), small_conf(), in_dim=32)  # no len_train_loader: constant values
    assert (v1.teacher_temperature(), v1.momentum(), v1.conf.koleo_weight) == (0.04, 0.996, 0.0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(global_crop_size=(32, 16), local_crop_size=(48, 8)), r"local_crop_size = \(48, 8\) is larger than"),
        (dict(version="v3"), "DINOConf.version = 'v3': expected 'v1' or 'v2'"),
        (dict(local_crops_scale=(0.5, 0.2)), r"local_crops_scale = \(0.5, 0.2\): expected 0 < min <= max <= 1"),
        (dict(global_crop_size=(32, -1)), r"global_crop_size = \(32, -1\): expected an int or \(height, width\)"),
        (dict(len_train_loader=0), r"len_train_loader = 0: expected >= 1"),
        (dict(input_mean=(0.5, 0.5, 0.5)), "input_mean and input_std: give both"),
    ],
)
def test_conf_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        DINOConf(**kw)


def test_random_resized_crops_of_the_whole_image_are_the_image_or_its_mirror():
    images = torch.rand(8, 3, 32, 16)
    out = random_resized_crops(images, (32, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for x, y in zip(images, out):
        assert torch.allclose(y, x, atol=1e-5) or torch.allclose(y, x.flip(-1), atol=1e-5)
    small = random_resized_crops(images, (8, 4), scale=(0.05, 0.4))
    assert small.shape == (8, 3, 8, 4) and small.min() >= 0 and small.max() <= 1


def _features(model, records, size=(32, 16)):
    from PIL import Image

    x = torch.stack([
        torch.from_numpy(np.asarray(Image.open(r.path).convert("RGB").resize(size[::-1]), dtype=np.float32) / 255)
        .permute(2, 0, 1) for r in records
    ])  # fmt: skip
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.slow
def test_wrapped_toy_cnn_learns_without_labels(small_demo):
    """A hundred and fifty label-free steps on the demo training images improve the toy CNN's retrieval (mAP) over its
    random initialisation, measured with the re-identification protocol on the demo query/gallery."""
    from PIL import Image

    from dino_recog.data.datasets import load_market1501
    from dino_recog.evaluation import evaluate_features

    torch.manual_seed(0)
    data = load_market1501(small_demo / "market")
    model = toy_cnn(64)

    def m_ap() -> float:
        qf, gf = _features(model, data.query), _features(model, data.gallery)
        pids = lambda rs: np.array([r.pid for r in rs])  # noqa: E731
        cams = lambda rs: np.array([r.camid for r in rs])  # noqa: E731
        return evaluate_features(qf, gf, pids(data.query), pids(data.gallery), cams(data.query), cams(data.gallery))[
            "mAP"
        ]

    before = m_ap()
    train = torch.stack([
        torch.from_numpy(np.asarray(Image.open(r.path).convert("RGB").resize((16, 32)), dtype=np.float32) / 255)
        .permute(2, 0, 1) for r in data.train
    ])  # fmt: skip
    steps = 150
    wrapped = DINOWrapper(model, DINOConf(out_dim=256, hidden_dim=64, bottleneck_dim=32, local_crops_number=2,
                                          local_crop_size=(16, 8), momentum_teacher=0.99, epochs=1,
                                          len_train_loader=steps))  # fmt: skip
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.04)
    g = torch.Generator().manual_seed(0)
    wrapped.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (32,), generator=g)]
        _, loss = wrapped(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapped.update_teacher()
    after = m_ap()
    assert after > before + 0.1, (before, after)  # measured: 0.26 -> 0.61 after 300 steps
