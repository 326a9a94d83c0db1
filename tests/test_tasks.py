"""The stage modules (dino_recog/tasks): what each loss term reads, where the trainable weights live, what a
checkpoint holds."""

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.losses import CenterLoss, TripletLoss
from dino_recog.tasks import (
    INPUTS,
    DinoStep,
    LossTerm,
    ReIDStep,
    ReIDTask,
    build_dino_task,
    build_model,
    build_reid_task,
)
from dino_recog.tasks.dino import collapse_warning

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_small", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
        "model.pretrained=", "model.drop_path_rate=0", "aug.size=[32,16]", "model.feature=cls_mean"]  # fmt: skip


def recog_cfg(*extra: str) -> C.RecogConfig:
    return C.load(ROOT / "cfg_recog.yaml", [*TINY, *extra], cls=C.RecogConfig)


class Probe(nn.Module):
    """A loss term nobody in the package knows: records what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen = [x, labels]
        return x.float().pow(2).mean()


def batch(n: int = 8) -> tuple:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n // 2).repeat_interleave(2)
    return (torch.randn(n, 3, 32, 16, generator=g), labels, labels, labels), 0


@pytest.mark.parametrize("reads", ["feat", "neck"])
def test_a_new_loss_term_receives_the_output_it_declares(reads):
    torch.manual_seed(0)
    model = build_model(recog_cfg(), num_classes=4)
    probe = Probe()
    task = ReIDTask(model, [LossTerm("probe", 0.5, probe, (reads, "labels"))]).train()
    (x, labels, *_), _ = batch()
    loss, terms = task((x, labels), ReIDStep(1e-3))
    with torch.no_grad():
        expected = model.train()(x)
    other = "neck" if reads == "feat" else "feat"
    assert torch.equal(probe.seen[0], expected[reads]) and not torch.equal(probe.seen[0], expected[other])
    assert torch.equal(probe.seen[1], labels)
    assert set(terms) == {"probe"} and torch.equal(loss, 0.5 * terms["probe"])


def test_loss_terms_must_declare_inputs_the_model_gives():
    with pytest.raises(ValueError, match=r"loss term 'mine': reads \['embedding'\]; expected names among " +
                       ", ".join(INPUTS)):  # fmt: skip
        LossTerm("mine", 1.0, Probe(), ("embedding",))
    with pytest.raises(ValueError, match="loss term 'mine': reads \\[\\]"):
        LossTerm("mine", 1.0, Probe(), ())
    model = build_model(recog_cfg("loss.ce_weight=0"), num_classes=4)  # no classifier without CE / distillation
    assert model.head.classifier is None
    with pytest.raises(ValueError, match=r"loss terms \['mine'\] read the classifier's logits"):
        ReIDTask(model, [LossTerm("mine", 1.0, Probe(), ("logits", "labels"))])
    with pytest.raises(ValueError, match="reads teacher_logits, but no distillation teacher"):
        ReIDTask(model, [LossTerm("kd", 1.0, Probe(), ("teacher_logits", "labels"))])


def test_every_trained_weight_is_inside_what_ddp_wraps():
    """CosFace / ArcFace classes, the centres and the auxiliary DINO head live in `task.trainable` (DDP reduces their
    gradients); the auxiliary DINO teacher does not."""
    cfg = recog_cfg("loss.cosface_weight=0.5", "loss.arcface_weight=0.5", "loss.center_weight=0.0005",
                    "loss.dino_aux_weight=0.5", "loss.dino_aux_out_dim=16")  # fmt: skip
    task = build_reid_task(cfg, num_classes=4)
    inside = {id(p) for p in task.trainable.parameters()}
    trained = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trained and all(id(p) in inside for p in task.parameters() if p.requires_grad), trained
    teacher = {id(p) for p in task.dino_aux.teacher_model.parameters()}
    assert teacher and not teacher & inside
    assert set(task.parts()) == {"state_dict", "losses"}
    assert set(task.parts()["losses"]) == {"ce", "triplet", "cosface", "arcface", "center", "dino"}
    # the main optimiser gets the margin classes and the DINO head; the centres get their own SGD (BoT)
    grouped = {id(p) for g in task.param_groups() for p in g["params"]}
    centres = task.terms["center"].loss.weight
    assert id(task.terms["cosface"].loss.weight) in grouped and id(centres) not in grouped
    (sgd,) = task.extra_optimizers()
    assert sgd.param_groups[0]["params"] == [centres] and sgd.param_groups[0]["lr"] == cfg.loss.center_lr


def test_the_centres_learn_from_the_unweighted_centre_loss():
    """The centre loss is weighted in the total; its centres get the gradient of the unweighted loss (BoT)."""
    torch.manual_seed(0)
    model = build_model(recog_cfg(), num_classes=4)
    task = ReIDTask(model, [LossTerm("triplet", 1.0, TripletLoss(0.3), ("feat", "labels")),
                            LossTerm("center", 0.0005, CenterLoss(model.head.out_dim, 4), ("feat", "labels"),
                                     own_lr=0.5)]).train()  # fmt: skip
    (x, labels, *_), _ = batch()
    loss, _ = task((x, labels), ReIDStep(1e-3))
    loss.backward()
    centres = task.terms["center"].loss.weight
    reference = centres.detach().clone().requires_grad_(True)
    feat = model.train()(x)["feat"].detach()
    (0.5 * (feat - reference[labels]).pow(2).sum(1).mean()).backward()
    torch.testing.assert_close(centres.grad, reference.grad)


def test_dino_task_parts_and_the_replicated_state():
    cfg = C.load(ROOT / "cfg_dino.yaml", ["model.arch=resnet18", "model.out_dim=32", "model.hidden_dim=16",
                                          "model.bottleneck_dim=8", "model.use_bn_in_head=true"],
                 cls=C.DinoConfig)  # fmt: skip
    task = build_dino_task(cfg)
    assert set(task.parts()) == {"student", "teacher", "dino_loss"}
    assert task.trainable is task.student
    assert all(not p.requires_grad for p in task.teacher.parameters())
    replicated = {id(t) for t in dist._replicated(task.teacher)}
    bn = task.teacher.backbone.bn1
    assert id(bn.weight) in replicated and id(bn.running_mean) not in replicated  # statistics stay per rank
    assert id(task.dino_loss.center) in {id(t) for t in dist._replicated(task.dino_loss)}
    prints = dist.check_replicated(task.parts(), "epoch 1")
    assert prints.shape == (1, 3)
    v2 = build_dino_task(C.load(ROOT / "cfg_dino.yaml", ["dino.version=v2", "model.arch=vit_tiny", "model.depth=1",
                                                         "model.out_dim=32", "model.hidden_dim=16",
                                                         "model.bottleneck_dim=8"], cls=C.DinoConfig))  # fmt: skip
    assert set(v2.parts()) == {"student", "teacher", "dino_loss", "ibot_loss"}


# ---------------------------------------------------------------------------------------------------------------------
# The collapse warning

# (iteration, epoch, loss, teacher entropy / ln K, KL, batch entropy) every 10 iterations of the old demo recipe
# (configs/demo/dino.yaml before the fix, K = 1024, ln K = 6.93), run.seed 0: `bash train.sh cpu 1 train_dino.py
# --config configs/demo/dino.yaml`. The loss climbs to ln K with a KL of ~0.1, above the old 1e-3 threshold.
OLD_DEMO = [
    (0, 0, 5.435, 0.522, 1.088, 4.53), (10, 0, 6.037, 0.731, 0.839, 5.90), (20, 0, 6.280, 0.762, 0.655, 6.08),
    (30, 1, 5.753, 0.729, 0.581, 5.82), (40, 1, 5.670, 0.758, 0.443, 5.85), (50, 1, 5.657, 0.764, 0.352, 5.82),
    (60, 2, 5.833, 0.807, 0.231, 6.06), (70, 2, 6.346, 0.885, 0.185, 6.46), (80, 2, 6.579, 0.924, 0.127, 6.65),
    (90, 3, 6.655, 0.939, 0.118, 6.74), (100, 3, 6.714, 0.946, 0.101, 6.78), (110, 4, 6.740, 0.954, 0.075, 6.80),
    (120, 4, 6.762, 0.953, 0.077, 6.82), (130, 4, 6.806, 0.962, 0.074, 6.86),
]  # fmt: skip


def records(rows):
    keys = ("iteration", "epoch", "loss", "entropy_ratio", "kl", "teacher_batch_entropy")
    return [dict(zip(keys, row)) for row in rows]


def first_warning(rows, out_dim=1024):
    """The iteration at which the warning first fires over the records seen so far, or None."""
    history = records(rows)
    for i in range(len(history)):
        if collapse_warning(history[: i + 1], out_dim) is not None:
            return history[i]["iteration"]
    return None


def test_collapse_warning_fires_on_the_old_demo_state():
    assert first_warning(OLD_DEMO) == 120  # 80 .. 120: five intervals at >= 0.9 ln K in entropy and loss
    message = collapse_warning(records(OLD_DEMO), 1024)
    assert message.startswith("uniform collapse: for the last 5 log intervals") and "ln K = 6.931" in message
    assert first_warning(OLD_DEMO[:-2]) is None  # 4 intervals are not yet a state


def test_collapse_warning_stays_quiet_on_a_healthy_run_and_a_single_spike():
    # a loss falling from ln K (start-up, epoch 0 excluded) to half of it, the teacher sharpening
    healthy = [(10 * i, i // 3, 6.9 - 0.25 * i, max(0.95 - 0.04 * i, 0.3), 0.4, 5.5) for i in range(16)]
    assert first_warning(healthy) is None
    spike = list(healthy)
    spike[8] = (80, 2, 6.9, 0.99, 0.01, 6.9)  # one interval at ln K with a flat teacher
    assert first_warning(spike) is None
    start_up = [(10 * i, 0, 6.92, 0.99, 0.001, 6.9) for i in range(20)]  # the first epoch starts at ln K by design
    assert first_warning(start_up) is None
    interrupted = OLD_DEMO[:12] + [(125, 4, 6.0, 0.85, 0.3, 6.5)] + OLD_DEMO[12:]  # a break resets the count
    assert first_warning(interrupted) is None


def test_collapse_warning_fires_on_a_sustained_one_dimension_collapse_only():
    onto_one = [(10 * i, 1 + i // 3, 0.3, 0.05, 0.2, 0.01) for i in range(6)]
    assert first_warning(onto_one) == 40
    assert "one-dimension collapse" in collapse_warning(records(onto_one), 1024)
    dip = [(10 * i, 1 + i // 3, 3.0, 0.5, 0.3, 0.01 if i == 3 else 4.0) for i in range(10)]
    assert first_warning(dip) is None


def test_the_task_warns_once_per_collapse_with_the_iteration(caplog):
    tiny = ["model.arch=vit_tiny", "model.depth=1", "model.out_dim=32", "model.hidden_dim=16", "model.bottleneck_dim=8"]
    cfg = C.load(ROOT / "cfg_dino.yaml", tiny, cls=C.DinoConfig)
    task = build_dino_task(cfg)
    flat = torch.zeros(8, 32)  # teacher and student both uniform: entropy ln K, KL 0
    caplog.set_level(logging.WARNING, logger="dino_recog.tasks.dino")
    for it in range(100, 180, 10):
        task._last = (flat, flat[:4], 0.04)
        stats = task.log_stats(DinoStep(1e-3, 0.04, 0.996, 0.04, False, it), {}, math.log(32), epoch=2)
        assert stats["entropy_ratio"] == pytest.approx(1.0)
    assert [r.getMessage()[:32] for r in caplog.records] == ["iteration 140: uniform collapse:"]


def test_stage2_keeps_its_own_normalisation_and_test_feature_over_a_pretrained_exports(tmp_path):
    """TransReID-SSL pre-trains with ImageNet mean/std and fine-tunes with 0.5/0.5: the stage-1 export's own
    normalisation must not replace aug.mean/std in the model (whose spec evaluation and extraction then read)."""
    from dino_recog.checkpoint import save_backbone
    from dino_recog.config import IMAGENET_MEAN, IMAGENET_STD
    from dino_recog.models import BackboneSpec
    from dino_recog.tasks.reid import model_spec

    export = BackboneSpec("vit_small", (32, 16), 8, 2, 32, 2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_backbone(export.build()[0], export, tmp_path / "teacher_backbone.pth")
    cfg = recog_cfg(f"model.pretrained={tmp_path / 'teacher_backbone.pth'}", "aug.mean=[0.5,0.5,0.5]",
                    "aug.std=[0.5,0.5,0.5]", "model.test_feature=before_neck")  # fmt: skip
    spec = model_spec(cfg, 5)
    assert (spec["mean"], spec["std"], spec["test_feature"]) == ([0.5] * 3, [0.5] * 3, "before_neck")
