"""`run.parallel: fsdp` (parallel.wrap_fsdp): stage 1 sharded with FSDP2 over 2 CPU processes (gloo) trains like
DDP, writes the checkpoints and exports a DDP run writes, and resumes from its own checkpoints and from DDP's.

Tolerances (fp32): the loss of every step within 1e-5 and every weight, centre and optimiser moment within 1e-6 of
the DDP run's. FSDP reduce-scatters where DDP all-reduces, so sums differ in the last bits; measured on this
machine: losses 5e-7 apart, weights 1e-8.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DINO_2PROC, dino_args, dino_cfg, recog_args, train_sh

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog.runlog import read_jsonl

# the single-file format (gathered to rank 0), compared with DDP's file by file; the sharded one (default under FSDP):
# tests/test_sharded.py, tests/test_resume_world_size.py
FSDP = ["run.parallel=fsdp", "run.checkpoint_format=full"]


def two_processes(small_demo: Path, out: Path, *extra: str) -> None:
    r = train_sh("cpu", 2, "train_dino.py", *dino_args(small_demo / "lup" / "images", out, *DINO_2PROC, *extra))
    assert r.returncode == 0, r.stderr[-4000:]


# Every checkpoint of dino_fsdp stays (dino_2proc keeps the last 2): the first-epoch resume test starts from its first.
KEEP_ALL = ["run.keep_last=20"]


@pytest.fixture(scope="module")
def dino_fsdp(small_demo, tmp_path_factory) -> Path:
    """conftest's dino_2proc run (2 CPU processes, 12 steps, a checkpoint every 4), sharded with FSDP (KEEP_ALL)."""
    out = tmp_path_factory.mktemp("dino_fsdp")
    two_processes(small_demo, out, *FSDP, *KEEP_ALL)
    return out


def assert_same_training_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Weights, centres and AdamW moments of two stage-1 checkpoints, key by key (plain tensors in both)."""
    for part in ("student", "teacher", "dino_loss"):
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            assert type(b[part][k]) is torch.Tensor, f"{part}.{k} is a {type(b[part][k]).__name__}"
            torch.testing.assert_close(b[part][k], v, rtol=0, atol=atol, msg=f"{part}.{k}")
    oa, ob = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(ob["state"][i][k], v, rtol=0, atol=atol, msg=f"optimizer state {i}.{k}")


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_writes_the_same_files(dino_2proc, dino_fsdp):
    ddp = [r["loss"] for r in read_jsonl(dino_2proc / "log.jsonl", "train")]
    fsdp = [r["loss"] for r in read_jsonl(dino_fsdp / "log.jsonl", "train")]
    assert len(fsdp) == len(ddp) == 12
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=0, atol=1e-5)
    a = ckpt.load_checkpoint(dino_2proc / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(dino_fsdp / "checkpoint_0002.pth")
    assert_same_training_state(a, b)
    # the replicated state (centre) is still checked across ranks; the sharded weights are left out of it
    assert torch.equal(b["fingerprints"][0], b["fingerprints"][1])
    # the export stays one file of full tensors that every tool reads
    ea = ckpt.load_checkpoint(dino_2proc / "teacher_backbone.pth")
    eb = ckpt.load_checkpoint(dino_fsdp / "teacher_backbone.pth")
    assert eb["spec"] == ea["spec"] and eb["state_dict"].keys() == ea["state_dict"].keys()
    for k, v in ea["state_dict"].items():
        torch.testing.assert_close(eb["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    from dino_recog.extract import FeatureExtractor

    feats = FeatureExtractor(dino_fsdp / "teacher_backbone.pth", device="cpu")(torch.rand(2, 3, 32, 16))
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()


def resumed_copy(run: Path, out: Path) -> None:
    """`out` as `run` left it when it died in its second epoch: only the mid-epoch checkpoint (epoch 1, step 2)."""
    out.mkdir()
    shutil.copy(run / "checkpoint_0001_000002.pth", out / "checkpoint_0001_000002.pth")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["fsdp", "ddp"])
def test_fsdp_resumes_from_its_own_and_from_a_ddp_checkpoint(source, dino_2proc, dino_fsdp, small_demo, tmp_path):
    """The full-state checkpoint (gathered to rank 0, the layout DDP writes) loads back into the shards, so a run
    resumes mid-epoch from a sharded run's checkpoint or a DDP run's and ends where the uninterrupted run ended."""
    origin = dino_fsdp if source == "fsdp" else dino_2proc
    resumed_copy(origin, tmp_path / "run")
    two_processes(small_demo, tmp_path / "run", *FSDP, "run.resume_changed=allow")
    assert "resumed from" in (tmp_path / "run" / "log.txt").read_text()
    a = ckpt.load_checkpoint(origin / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_0002.pth")
    assert_same_training_state(a, b)


def test_fsdp_config_refuses_what_it_cannot_do(small_demo, tmp_path):
    images = small_demo / "lup" / "images"
    assert dino_cfg(images, tmp_path, *FSDP).run.parallel == "fsdp"
    with pytest.raises(C.ConfigError, match=r"eval.eval_every: 5 with run.parallel fsdp; the monitoring evaluation "
                       r"of a sharded teacher is not supported yet"):  # fmt: skip
        dino_cfg(images, tmp_path, *FSDP, "eval.eval_every=5")
    with pytest.raises(C.ConfigError, match=r"run.parallel: 'zero'"):
        dino_cfg(images, tmp_path, "run.parallel=zero")
    from conftest import recog_cfg

    market = small_demo / "market"
    assert recog_cfg(market, tmp_path, *FSDP, "loss.partial_fc=true").run.parallel == "fsdp"
    with pytest.raises(C.ConfigError, match=r"loss.center_weight: 0.0005 with run.parallel fsdp: .* set "
                       r"loss.center_weight=0 or run.parallel=ddp"):  # fmt: skip
        recog_cfg(market, tmp_path, *FSDP, "loss.center_weight=5e-4")
    with pytest.raises(C.ConfigError, match=r"loss.dino_aux_weight: 0.1 with run.parallel fsdp: .* EMA"):
        recog_cfg(market, tmp_path, *FSDP, "loss.dino_aux_weight=0.1")


@pytest.mark.slow
def test_fsdp_trains_dinov2_like_ddp(small_demo, tmp_path):
    """DINOv2 (masked student with its mask token at the sharded root, a separate iBOT head, a register token): the
    loss terms of every step and the final weights, centres (DINO and iBOT) and moments agree with DDP's."""
    v2 = ["dino.version=v2", "model.layerscale=1e-5", "train.layer_decay=0.9", "train.patch_embed_lr_mult=0.2",
          "dino.separate_ibot_head=true", "model.num_register_tokens=1"]  # fmt: skip
    two_processes(small_demo, tmp_path / "ddp", *v2)
    two_processes(small_demo, tmp_path / "fsdp", *v2, *FSDP)
    ddp, fsdp = (read_jsonl(tmp_path / run / "log.jsonl", "train") for run in ("ddp", "fsdp"))
    assert len(fsdp) == len(ddp) == 12
    for term in ("loss", "dino", "ibot", "koleo"):
        torch.testing.assert_close(torch.tensor([r[term] for r in fsdp]), torch.tensor([r[term] for r in ddp]),
                                   rtol=0, atol=1e-5, msg=term)  # fmt: skip
    a, b = (ckpt.load_checkpoint(tmp_path / run / "checkpoint_0002.pth") for run in ("ddp", "fsdp"))
    assert_same_training_state(a, b)
    assert "mask_token" in b["teacher"] and any(k.startswith("ibot_head.") for k in b["student"])
    for k, v in a["ibot_loss"].items():
        torch.testing.assert_close(b["ibot_loss"][k], v, rtol=0, atol=1e-6, msg=f"ibot_loss.{k}")


@pytest.mark.slow
def test_fsdp_resumes_from_the_first_epoch_while_the_last_layer_is_frozen(dino_fsdp, small_demo, tmp_path):
    """In DINO's first epoch (`dino.freeze_last_layer`: 1) the head's last layer has no gradient, so AdamW holds no
    state for it: the resume must leave it so (a strict load refused the checkpoint; a lenient one gave it a step
    count of 1 and zero moments, which a DDP resume would not)."""
    (tmp_path / "resumed").mkdir()
    shutil.copy(dino_fsdp / "checkpoint_0000_000004.pth", tmp_path / "resumed")
    two_processes(small_demo, tmp_path / "resumed", *FSDP, *KEEP_ALL)
    a = ckpt.load_checkpoint(dino_fsdp / "checkpoint_0002.pth")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoint_0002.pth")
    assert_same_training_state(a, b)


@pytest.mark.slow
def test_fsdp_with_accumulated_steps_trains_like_ddp(dino_2proc_accum, small_demo, tmp_path):
    """Gradient accumulation over sharded networks (each micro-batch's gradient reduce-scattered into the shards,
    where DDP holds its all-reduce until the last one): the same losses and state as DDP's accumulation (conftest's
    dino_2proc_accum)."""
    two_processes(small_demo, tmp_path / "fsdp", "train.accumulate_steps=2", *FSDP)
    ddp, fsdp = (read_jsonl(run / "log.jsonl", "train") for run in (dino_2proc_accum, tmp_path / "fsdp"))
    assert len(fsdp) == len(ddp) == 6  # 12 batches, 2 a step
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fsdp]), torch.tensor([r["loss"] for r in ddp]),
                               rtol=0, atol=1e-5)  # fmt: skip
    a, b = (ckpt.load_checkpoint(run / "checkpoint_0002.pth") for run in (dino_2proc_accum, tmp_path / "fsdp"))
    assert_same_training_state(a, b)


@pytest.mark.slow
def test_fsdp_skips_a_nonfinite_last_step_of_an_epoch_like_ddp(small_demo, tmp_path):
    """A step dropped after its forward pass (NaN on rank 1 at the last step of epoch 0, then the epoch's checkpoint
    and export): FSDP2 leaves its roots gathered after a forward, so they are resharded on that path; the run then
    ends with DDP's state."""
    def faulty(out: Path, *extra: str) -> None:
        r = train_sh("cpu", 2, "tests/scripts/faults.py", "nan1", 5,
                     *dino_args(small_demo / "lup" / "images", out, *DINO_2PROC, "run.skip_nonfinite_steps=1", *extra))
        assert r.returncode == 0, r.stderr[-4000:]  # fmt: skip

    faulty(tmp_path / "ddp")
    faulty(tmp_path / "fsdp", *FSDP)
    a, b = (ckpt.load_checkpoint(tmp_path / run / "checkpoint_0002.pth") for run in ("ddp", "fsdp"))
    assert_same_training_state(a, b)
    epochs = read_jsonl(tmp_path / "fsdp" / "log.jsonl", "epoch")  # "epoch": epochs done
    assert [r["nonfinite_steps"] for r in epochs] == [1, 0]


@pytest.fixture(scope="module")
def recog_runs(small_demo, tmp_path_factory) -> Path:
    """Stage 2 on 2 CPU processes, DDP and FSDP, in one launch (tests/scripts/recog_runs.py): a tiny ViT with a
    Partial FC classifier, 2 accumulated micro-batches a step and an evaluation every epoch; the FSDP run resumed from
    its epoch-1 checkpoint; a ResNet-18 whose rank 1 sees a NaN triplet loss at step 1 of 4 in epoch 0 (skipped)."""
    out = tmp_path_factory.mktemp("recog_fsdp")
    market = small_demo / "market"
    vit = ["loss.partial_fc=true", "loss.partial_fc_sample_rate=1", "train.accumulate_steps=2", "eval.eval_every=1"]
    resnet = ["model.arch=resnet18", "model.feature=avg", "run.skip_nonfinite_steps=1", "eval.eval_every=1"]
    runs = [
        {"overrides": recog_args(market, out / "vit_ddp", *vit)},
        {"overrides": recog_args(market, out / "vit_fsdp", *vit, *FSDP)},
        {"overrides": recog_args(market, out / "vit_resumed", *vit, *FSDP), "resume_from": str(out / "vit_fsdp")},
        {"overrides": recog_args(market, out / "resnet_ddp", *resnet), "nan_at": 1},
        {"overrides": recog_args(market, out / "resnet_fsdp", *resnet, *FSDP), "nan_at": 1},
    ]  # fmt: skip
    (out / "runs.json").write_text(json.dumps(runs))
    r = train_sh("cpu", 2, "tests/scripts/recog_runs.py", out / "runs.json")
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def assert_same_reid_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Model, loss weights and optimiser moments of two stage-2 checkpoints, key by key (plain tensors in both)."""
    assert_same_tensors(a["state_dict"], b["state_dict"], "model", atol)
    assert a["losses"].keys() == b["losses"].keys()
    for name, sd in a["losses"].items():
        assert_same_tensors(sd, b["losses"][name], f"losses.{name}", atol)
    oa, ob = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        assert_same_tensors(s, ob["state"][i], f"optimizer state {i}", atol)


def assert_same_tensors(a: dict, b: dict, what: str, atol: float) -> None:
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert type(b[k]) is torch.Tensor, f"{what}.{k} is a {type(b[k]).__name__}"
            torch.testing.assert_close(b[k], v, rtol=0, atol=atol, msg=f"{what}.{k}")


def train_losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_jsonl(run / "log.jsonl", "train")])


@pytest.mark.slow
def test_fsdp_trains_stage2_like_ddp(recog_runs):
    """ViT with Partial FC and accumulation: every step's loss, the weights, moments and the rank-local classifier
    shards, each evaluation and the exported model.pth / best.pth are DDP's; the resumed run ends where the
    uninterrupted one did."""
    ddp, fsdp = recog_runs / "vit_ddp", recog_runs / "vit_fsdp"
    assert len(train_losses(ddp)) == 4  # 2 epochs of 2 steps (4 micro-batches per rank each)
    torch.testing.assert_close(train_losses(fsdp), train_losses(ddp), rtol=0, atol=1e-5)
    a, b = (ckpt.load_checkpoint(run / "checkpoint_0002.pth") for run in (ddp, fsdp))
    assert_same_reid_state(a, b)
    assert any(k.startswith("backbone.blocks.1.") for k in b["state_dict"]) and "losses" in b
    for rank in (0, 1):  # the Partial FC classifier: each rank's own rows, never reduced across ranks
        sa, sb = (ckpt.load_checkpoint(ckpt.shard_path(run / "checkpoint_0002.pth", rank, 2)) for run in (ddp, fsdp))
        assert_same_tensors(sa["shards"]["ce"], sb["shards"]["ce"], f"rank {rank} ce shard", 1e-6)
    for what in ("eval", "train"):
        ea, eb = (read_jsonl(run / "log.jsonl", what) for run in (ddp, fsdp))
        assert len(eb) == len(ea) > 0 and [r.keys() for r in ea] == [r.keys() for r in eb]
    for ra, rb in zip(read_jsonl(ddp / "log.jsonl", "eval"), read_jsonl(fsdp / "log.jsonl", "eval")):
        assert rb["mAP"] == pytest.approx(ra["mAP"], abs=1e-6) and rb["rank1"] == ra["rank1"]
    for name in ("model.pth", "best.pth"):
        ma, mb = (ckpt.load_checkpoint(run / name) for run in (ddp, fsdp))
        assert mb["spec"] == ma["spec"]
        assert_same_tensors(ma["state_dict"], mb["state_dict"], name, 1e-6)
    assert_same_tensors(b["state_dict"], ckpt.load_checkpoint(fsdp / "model.pth")["state_dict"], "model.pth", 0)
    resumed = recog_runs / "vit_resumed"
    assert "resumed from" in (resumed / "log.txt").read_text()
    assert_same_reid_state(b, ckpt.load_checkpoint(resumed / "checkpoint_0002.pth"))


@pytest.mark.slow
def test_fsdp_stage2_resnet_skips_a_nonfinite_step_like_ddp(recog_runs):
    """ResNet-18 sharded per residual stage, with BatchNorm in the backbone and the neck (rank 0's statistics, as
    DDP broadcasts them): a step dropped after its forward pass in epoch 0 leaves the network resharded (FSDP2 keeps
    the root gathered after a forward until its backward, which that step never runs), and the run ends with DDP's
    losses, state and evaluations."""
    ddp, fsdp = recog_runs / "resnet_ddp", recog_runs / "resnet_fsdp"
    epochs = read_jsonl(fsdp / "log.jsonl", "epoch")
    assert [r["nonfinite_steps"] for r in epochs] == [1, 0]
    # every step began from the shards: the network gathered by the dropped step's forward pass was resharded
    assert json.loads((fsdp / "gathered_steps.json").read_text()) == []
    torch.testing.assert_close(train_losses(fsdp), train_losses(ddp), rtol=0, atol=1e-5)
    a, b = (ckpt.load_checkpoint(run / "checkpoint_0002.pth") for run in (ddp, fsdp))
    assert_same_reid_state(a, b, atol=1e-5)
    assert any(k.startswith("backbone.layer4.") and k.endswith("running_mean") for k in b["state_dict"])
    for ra, rb in zip(read_jsonl(ddp / "log.jsonl", "eval"), read_jsonl(fsdp / "log.jsonl", "eval"), strict=True):
        assert rb["mAP"] == pytest.approx(ra["mAP"], abs=1e-6)
