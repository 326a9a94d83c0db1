import pytest
import torch

from dino_recog.engine import LoopOptions, train_one_epoch
from dino_recog.losses import DINOLoss
from dino_recog.models import DINOHead, MultiCropNet, build_backbone
from dino_recog.optim import build_optimizer, param_groups
from dino_recog.runlog import RunLog, read_jsonl
from dino_recog.tasks import DinoStep, DinoTask


def epoch(student, teacher, loss_fn, loader, opt, step, tmp_path, v2=None, **options):
    """One epoch of the DINO task built from these parts, every iteration with the same scheduled values."""
    task = DinoTask(student, teacher, loss_fn, v2)
    opts = LoopOptions(len(loader) // options.get("accumulate_steps", 1), **{"clip_grad": 3.0, "log_every": 1,
                                                                             **options})  # fmt: skip
    return train_one_epoch(task, loader, opt, torch.amp.GradScaler("cpu", enabled=False), lambda it: step, 0,
                           RunLog(tmp_path, tensorboard=False), opts)  # fmt: skip


def tiny_pair():
    torch.manual_seed(0)

    def net():
        backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
        return MultiCropNet(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))

    student, teacher = net(), net()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def batches(n=3, b=4):
    g = torch.Generator().manual_seed(1)
    crops = lambda: [torch.randn(b, 3, 32, 16, generator=g)] * 2 + [torch.randn(b, 3, 16, 8, generator=g)] * 2  # noqa: E731
    return [((crops(), None, None, None), 0) for _ in range(n)]


def run(student, teacher, tmp_path, momentum=0.996, freeze=False, steps=3):
    loss_fn = DINOLoss(64)
    opt = build_optimizer("adamw", param_groups(student), 1e-3, 0.04)
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=momentum, teacher_temp=0.04, freeze_last_layer=freeze)
    stats = epoch(student, teacher, loss_fn, batches(steps), opt, step, tmp_path)
    return stats, loss_fn


def test_last_layer_frozen_and_teacher_only_moves_by_ema(tmp_path):
    student, teacher = tiny_pair()
    last = [p.detach().clone() for n, p in student.head.named_parameters() if n.startswith("last_layer")]
    mlp = student.head.mlp[0].weight.detach().clone()
    teacher_before = [p.clone() for p in teacher.parameters()]
    stats, loss_fn = run(student, teacher, tmp_path, momentum=1.0, freeze=True)
    after = [p for n, p in student.head.named_parameters() if n.startswith("last_layer")]
    assert all(torch.equal(a, b) for a, b in zip(last, after))  # frozen: no gradient, no weight decay
    assert not torch.equal(mlp, student.head.mlp[0].weight)  # the rest of the student trains
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))  # momentum 1: unchanged
    assert all(p.grad is None for p in teacher.parameters())  # no gradient ever reaches the teacher
    assert stats["skipped_images"] == 0 and torch.isfinite(torch.tensor(stats["loss"]))
    assert loss_fn.center.abs().sum() > 0  # the centre was updated


def test_unfrozen_last_layer_trains_and_teacher_follows_student(tmp_path):
    student, teacher = tiny_pair()
    last = student.head.last_layer.parametrizations.weight.original1.detach().clone()
    teacher_w = teacher.head.mlp[0].weight.clone()
    run(student, teacher, tmp_path, momentum=0.5, freeze=False)
    assert not torch.equal(last, student.head.last_layer.parametrizations.weight.original1)
    assert not torch.equal(teacher_w, teacher.head.mlp[0].weight)
    records = read_jsonl(tmp_path / "log.jsonl", "train")
    assert len(records) == 3
    for key in ("loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy", "kl", "center_norm"):
        assert key in records[0]


def test_gradient_clipping_uses_the_global_norm(tmp_path):
    """One SGD step through the engine equals p - lr * g * min(1, c / ||g||), ||g|| over all parameters at once
    (DINOv2's rule; the official DINO clips each parameter's norm separately)."""
    import copy

    student, teacher = tiny_pair()
    reference = copy.deepcopy(student)
    crops = batches(1)[0][0][0]
    lr, clip = 0.1, 0.05
    loss = DINOLoss(64)(reference(crops), teacher(crops[:2]), 0.04)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    assert norm > 10 * clip  # so that the clipping really acts
    expected = [p.detach() - lr * g * (clip / (norm + 1e-6)) for p, g in zip(reference.parameters(), grads)]

    opt = build_optimizer("sgd", param_groups(student), lr, 0.0)
    step = DinoStep(lr=lr, weight_decay=0.0, momentum=1.0, teacher_temp=0.04, freeze_last_layer=False)
    epoch(student, teacher, DINOLoss(64), batches(1), opt, step, tmp_path, clip_grad=clip)
    for e, p in zip(expected, student.parameters()):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2


def tiny_masked_pair(separate=False):
    from dino_recog.models import MaskedMultiCropNet

    torch.manual_seed(0)

    def net():
        backbone = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                  layerscale=0.1)[0]  # fmt: skip
        ibot = DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8) if separate else None
        return MaskedMultiCropNet(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16), ibot)

    student, teacher = net(), net()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def v2_terms(out_dim=64, koleo_weight=0.1):
    from dino_recog.data.masking import BlockMaskGenerator
    from dino_recog.losses import IBOTPatchLoss
    from dino_recog.tasks import DinoV2Terms

    return DinoV2Terms(IBOTPatchLoss(out_dim), BlockMaskGenerator((4, 2), min_block_patches=1), (0.2, 0.6), 0.5,
                       ibot_weight=1.0, koleo_weight=koleo_weight)  # fmt: skip


def run_v2(student, teacher, v2, tmp_path, freeze=False, steps=3):
    loss_fn = DINOLoss(64)
    opt = build_optimizer("adamw", param_groups(student, 0.9, 0.2), 1e-3, 0.04)
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, freeze_last_layer=freeze)
    stats = epoch(student, teacher, loss_fn, batches(steps), opt, step, tmp_path, v2=v2)
    return stats, loss_fn


def test_dinov2_epoch_sums_the_three_terms_and_trains_the_mask_token(tmp_path):
    student, teacher = tiny_masked_pair()
    v2 = v2_terms(koleo_weight=0.3)
    token = student.mask_token.detach().clone()
    stats, loss_fn = run_v2(student, teacher, v2, tmp_path)
    records = read_jsonl(tmp_path / "log.jsonl", "train")
    assert len(records) == 3
    for r in records:
        assert r["loss"] == pytest.approx(r["dino"] + r["ibot"] + 0.3 * r["koleo"], rel=1e-5)
        assert r["ibot"] > 0 and r["koleo"] != 0
    for key in ("dino", "ibot", "koleo"):
        assert stats[key] == pytest.approx(sum(r[key] for r in records) / 3, rel=1e-5)
    assert not torch.equal(token, student.mask_token)  # the mask token is trained
    assert v2.ibot_loss.center.abs().sum() > 0 and loss_fn.center.abs().sum() > 0  # both centres move
    assert all(p.grad is None for p in teacher.parameters())


def test_dinov2_masks_are_seeded_by_torch_and_reach_only_the_student(tmp_path):
    """Same torch seed, same masks and losses; the teacher's CLS outputs are those of the unmasked crops."""
    crops = batches(1)[0][0][0]
    results = []
    for _ in range(2):
        student, teacher = tiny_masked_pair()
        torch.manual_seed(5)
        results.append(DinoTask(student, teacher, DINOLoss(64), v2_terms())._dinov2(student, crops, 0.04))
    (loss_a, terms_a, s_a, t_a), (loss_b, _, s_b, _) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(s_a, s_b)
    plain = MultiCropNet(teacher.backbone, teacher.head)
    with torch.no_grad():
        torch.testing.assert_close(t_a, plain(crops[:2]))
        assert not torch.allclose(s_a[:8], plain(crops)[:8])  # masked global crops
    assert set(terms_a) == {"dino", "ibot", "koleo"}


def test_dinov2_frozen_last_layers_include_the_separate_ibot_head(tmp_path):
    student, teacher = tiny_masked_pair(separate=True)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".last_layer." in n}
    assert any(n.startswith("ibot_head.") for n in frozen)
    run_v2(student, teacher, v2_terms(), tmp_path, freeze=True)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(student.ibot_head.mlp[0].weight, teacher.ibot_head.mlp[0].weight)  # the rest trains


def test_nonfinite_check_without_a_skip_budget_does_not_sync_every_step(tmp_path, monkeypatch):
    """With no skip budget the hot loop only records the first non-finite step on the device; the check (one host
    sync) runs at log intervals, before checkpoints and at the end of the epoch, and names that step."""
    import pytest

    import dino_recog.engine as engine

    def per_step_sync(loss):
        raise AssertionError("the per-step host sync ran although no step may be skipped")

    monkeypatch.setattr(engine, "_any_nonfinite", per_step_sync)
    student, teacher = tiny_pair()
    loss_fn = DINOLoss(64)
    real_forward = DINOLoss.forward
    calls = []

    def nan_at_iteration_2(self, s, t, temp):
        calls.append(1)
        loss = real_forward(self, s, t, temp)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DINOLoss, "forward", nan_at_iteration_2)
    opt = build_optimizer("adamw", param_groups(student), 1e-3, 0.04)
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=0.99, teacher_temp=0.04, freeze_last_layer=False)
    saves = []
    with pytest.raises(
        engine.NonFiniteLossError, match=r"non-finite DINO loss at epoch 0, iteration 2 \(rank 0: loss nan\)"
    ):
        train_one_epoch(DinoTask(student, teacher, loss_fn), batches(5), opt,
                        torch.amp.GradScaler("cpu", enabled=False), lambda it: step, 0, RunLog(tmp_path, False),
                        LoopOptions(5, clip_grad=3.0, log_every=100, save_every_steps=4),
                        save_checkpoint=saves.append)  # fmt: skip
    assert saves == []  # the step-4 checkpoint would hold the non-finite state: the check before it raised
    assert len(calls) == 4  # no sync stopped the loop at iteration 2; the check before the save did, after step 3


def test_a_batch_with_no_decodable_image_is_skipped_alone_but_stops_a_multi_process_run(tmp_path, monkeypatch):
    """One process skips the batch and counts its images; with several, skipping alone would leave the other ranks
    waiting in DDP's gradient all-reduce (or pair their collectives with the wrong step), so it stops, naming it."""
    import dino_recog.engine as engine
    from dino_recog.data.datasets import CorruptImageError

    student, teacher = tiny_pair()
    opt = build_optimizer("adamw", param_groups(student), 1e-3, 0.04)
    step = DinoStep(lr=1e-3, weight_decay=0.04, momentum=0.99, teacher_temp=0.04, freeze_last_layer=False)
    loader = batches(3)
    loader[1] = (None, 4)
    stats = epoch(student, teacher, DINOLoss(64), loader, opt, step, tmp_path)
    assert stats["skipped_images"] == 4
    monkeypatch.setattr(engine.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 1)
    with pytest.raises(CorruptImageError, match=r"^epoch 0, batch 1: none of the 4 images of rank 1 could be decoded "
                                                r"\(each named in a warning above\); with several processes a rank "
                                                r"cannot skip a step alone: remove or replace those files of "
                                                r"data.train$"):  # fmt: skip
        epoch(student, teacher, DINOLoss(64), loader, opt, step, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation: `accumulate_steps` micro-batches of B per optimiser step equal one step of the whole batch


def merged(micro: list) -> list:
    """One loader item holding the micro-batches of `micro` together, crop by crop (DINO) or tensor by tensor."""
    first = micro[0][0]
    if isinstance(first[0], list):  # DINO: a list of crops, each (B, 3, h, w)
        crops = [torch.cat([m[0][0][j] for m in micro]) for j in range(len(first[0]))]
        return [((crops, *first[1:]), 0)]
    return [((torch.cat([m[0][0] for m in micro]), torch.cat([m[0][1] for m in micro])), 0)]


def dino_accumulated(loader, accumulate, tmp_path):
    """The tiny DINO pair after one epoch of `loader` with SGD, strong clipping and a moving teacher and centre."""
    student, teacher = tiny_pair()
    loss_fn = DINOLoss(64, center_momentum=0.5)
    opt = build_optimizer("sgd", param_groups(student), 0.1, 0.0)
    step = DinoStep(lr=0.1, weight_decay=0.0, momentum=0.5, teacher_temp=0.04, freeze_last_layer=False)
    stats = epoch(student, teacher, loss_fn, loader, opt, step, tmp_path, clip_grad=0.05,
                  accumulate_steps=accumulate)  # fmt: skip
    return stats, {**{"s." + k: v for k, v in student.state_dict().items()},
                   **{"t." + k: v for k, v in teacher.state_dict().items()}, "center": loss_fn.center}  # fmt: skip


def assert_states_close(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_dino_two_accumulated_batches_equal_one_step_of_both(tmp_path):
    """Student, teacher and centre after 2 micro-batches of 4 = after one step of the 8 images: the loss is a mean
    per sample, the clipping sees the summed gradient, and the centre takes one EMA step with the mean teacher output
    of both micro-batches (with the centre updated at every forward pass the second micro-batch would see another
    centre and this would not hold)."""
    micro = batches(2, b=4)
    stats, accumulated = dino_accumulated(micro, 2, tmp_path)
    big_stats, big = dino_accumulated(merged(micro), 1, tmp_path)
    assert_states_close(big, accumulated)
    assert stats["loss"] == pytest.approx(big_stats["loss"], abs=1e-6)  # the logged loss is the step's mean
    _, half = dino_accumulated(micro[:1], 1, tmp_path)  # the equality is not that of a step that learnt nothing
    assert max((half[k] - big[k]).abs().max() for k in big if k.startswith("s.")) > 1e-4
    assert not torch.allclose(half["center"], big["center"], atol=1e-6)


def reid_task(*extra: str):
    from pathlib import Path

    from dino_recog import config as C
    from dino_recog.tasks import build_reid_task

    root = Path(__file__).resolve().parents[1]
    cfg = C.load(root / "cfg_recog.yaml", ["model.arch=vit_small", "model.depth=1", "model.embed_dim=32",
                                           "model.num_heads=2", "model.patch_size=8", "model.pretrained=",
                                           "aug.size=[32,16]", *extra], cls=C.RecogConfig)  # fmt: skip
    torch.manual_seed(0)
    return build_reid_task(cfg, num_classes=4)


def reid_accumulated(loader, accumulate, tmp_path, *extra):
    from dino_recog.tasks import ReIDStep

    task = reid_task(*extra)
    opt = build_optimizer("sgd", task.param_groups(), 0.1, 0.0, momentum=0.9)
    opts = LoopOptions(len(loader) // accumulate, clip_grad=0.0, log_every=1, accumulate_steps=accumulate)
    stats = train_one_epoch(task, loader, opt, torch.amp.GradScaler("cpu", enabled=False), lambda it: ReIDStep(0.1, it),
                            0, RunLog(tmp_path, tensorboard=False), opts)  # fmt: skip
    return stats, {k: v.detach().clone() for k, v in task.state_dict().items()}


def reid_batches(n, b=8):
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(b, 3, 32, 16, generator=g), torch.arange(b) % 4), 0) for _ in range(n)]


# per-sample terms only: no triplet (batch-hard within a batch), no BN neck (batch statistics), no stochastic depth
PER_SAMPLE = ["loss.triplet_weight=0", "loss.cosface_weight=0.5", "model.neck=none", "model.drop_path_rate=0"]


def test_reid_two_accumulated_batches_equal_one_step_of_both(tmp_path):
    """Stage 2 with cross-entropy (label smoothing) and CosFace: model and CosFace classes after 2 micro-batches of 8
    (two optimiser steps of 2 each, so SGD momentum carries over) = after 2 steps of 16."""
    micro = reid_batches(4)
    stats, accumulated = reid_accumulated(micro, 2, tmp_path, *PER_SAMPLE)
    big_stats, big = reid_accumulated(merged(micro[:2]) + merged(micro[2:]), 1, tmp_path, *PER_SAMPLE)
    assert_states_close(big, accumulated)
    for k in ("loss", "ce", "cosface"):
        assert stats[k] == pytest.approx(big_stats[k], abs=1e-6)
    _, first = reid_accumulated(micro[::2], 1, tmp_path, *PER_SAMPLE)  # one micro-batch per step instead
    assert any(not torch.allclose(first[k], big[k], atol=1e-4) for k in big)


def test_reid_batch_hard_triplet_sees_the_micro_batch(tmp_path):
    """The batch-hard triplet mines within a batch: with it the two differ, which docs/stages.md states."""
    triplet = [k for k in PER_SAMPLE if not k.startswith("loss.triplet")]
    micro = reid_batches(2)
    _, accumulated = reid_accumulated(micro, 2, tmp_path, *triplet)
    _, big = reid_accumulated(merged(micro), 1, tmp_path, *triplet)
    assert any(not torch.allclose(accumulated[k], big[k], atol=1e-5) for k in big)
