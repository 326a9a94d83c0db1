"""Stage 2: supervised re-identification fine-tuning of a (DINO-pretrained) backbone.

    bash train.sh 0,1,2,3 4 train_recog.py [--config cfg_recog.yaml] [key.sub=value ...]
    bash train.sh cpu 2 train_recog.py --config configs/demo/recog.yaml

Builds the P x K identity-balanced data, the backbone (weights from a stage-1 export, a DINO checkpoint, timm, or
none) with a BN-neck head, the weighted losses and the optimiser; then per epoch runs `engine.train_one_epoch_recog`,
checkpoints, and evaluates on query/gallery, keeping the best model by mAP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.cli import apply_speed_options, eval_options, load_config, start_run, stopped_message
from dino_recog.data import datasets as ds
from dino_recog.data.build import query_gallery, train_records
from dino_recog.data.samplers import PKSampler, SeededBatches
from dino_recog.data.transforms import reid_train_transform
from dino_recog.engine import NonFiniteLossError, RecogLosses, train_one_epoch_recog
from dino_recog.evaluation import evaluate_query_gallery
from dino_recog.export import export_onnx as onnx_export
from dino_recog.losses import (
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    CrossEntropyLabelSmooth,
    DistillationLoss,
    TripletLoss,
)
from dino_recog.models import BackboneSpec, ReIDModel, build_reid_model, reid_spec
from dino_recog.models.backbones import is_vit
from dino_recog.optim import build_optimizer, reid_param_groups
from dino_recog.runlog import RunLog, fmt_metrics
from dino_recog.schedules import cosine_schedule, step_schedule
from dino_recog.wrapper import DINOConf, DINOWrapper

log = logging.getLogger("dino_recog.train_recog")


# ---------------------------------------------------------------------------------------------------------------------
# Builders: the only functions that read the config


def build_data(cfg: C.RecogConfig) -> tuple[DataLoader, SeededBatches, int, tuple[ds.ImageDataset, ds.ImageDataset]]:
    a = cfg.aug
    records = train_records(cfg.data.train)
    num_classes = len({r.pid for r in records})
    train_set = ds.ImageDataset(
        records, reid_train_transform(a.size, a.mean, a.std, a.flip_prob, a.padding, a.erasing_prob, a.color_jitter)
    )
    sampler = PKSampler([r.pid for r in records], cfg.data.num_identities, cfg.data.num_instances,
                        dist.get_rank(), dist.get_world_size(), cfg.run.seed)  # fmt: skip
    # Batches that can start mid-epoch, each sample with its own augmentation seed (exact mid-epoch resume); the
    # generator keeps the loader from drawing its worker seed from the global stream that a checkpoint restores.
    batches = SeededBatches(sampler, cfg.run.seed, dist.get_rank())
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=ds.collate_skip_none,
                        generator=torch.Generator().manual_seed(cfg.run.seed))  # fmt: skip
    _, query, gallery = query_gallery(cfg.data.test, a.size, a.mean, a.std)
    return loader, batches, num_classes, (query, gallery)


def model_spec(cfg: C.RecogConfig, num_classes: int) -> dict:
    """The model's flat spec: `model.*` / `aug.*`, with the architecture of a `model.pretrained` file that carries
    its own (a stage-1 export or checkpoint, a stage-2 model; logged when it replaces `model.*`)."""
    m = cfg.model
    backbone = BackboneSpec.from_recog_config(cfg)
    if m.pretrained and Path(m.pretrained).is_file():
        backbone = ckpt.pretrained_backbone_spec(backbone, m.pretrained, "model.pretrained")
    return reid_spec(backbone, num_classes, embedding_dim=m.embedding_dim, neck=m.neck, drop_path_rate=m.drop_path_rate,
                     classifier=cfg.loss.ce_weight > 0 or cfg.loss.distill_weight > 0)  # fmt: skip


def build_model(cfg: C.RecogConfig, num_classes: int) -> ReIDModel:
    model = build_reid_model(model_spec(cfg, num_classes))
    if cfg.model.pretrained:
        if not Path(cfg.model.pretrained).is_file():
            raise FileNotFoundError(
                f"model.pretrained: {cfg.model.pretrained} not found; run stage 1 first (train_dino.py exports "
                f"teacher_backbone.pth), point it at other weights, or set model.pretrained='' to start from scratch"
            )
        ckpt.load_backbone_weights(model.backbone, cfg.model.pretrained, key=cfg.model.pretrained_key)
    else:
        log.info("model.pretrained is empty: the backbone starts from random initialisation")
    return model


def dino_aux(cfg: C.RecogConfig, backbone: nn.Module, steps_per_epoch: int) -> DINOWrapper:
    """DINO on the backbone's global feature, on crops of the training batch (DINOWrapper, v1 schedules)."""
    h, w = cfg.aug.size
    conf = DINOConf(
        global_crop_size=(h, w), local_crop_size=(max(1, h // 2), max(1, w // 2)),
        local_crops_number=cfg.loss.dino_aux_local_crops, out_dim=cfg.loss.dino_aux_out_dim,
        input_mean=tuple(cfg.aug.mean), input_std=tuple(cfg.aug.std), epochs=cfg.train.epochs,
        len_train_loader=steps_per_epoch,
    )  # fmt: skip
    return DINOWrapper(backbone, conf)


def build_losses(
    cfg: C.RecogConfig,
    dim: int,
    num_classes: int,
    device: torch.device,
    backbone: nn.Module | None = None,
    steps_per_epoch: int = 1,
) -> RecogLosses:
    lc = cfg.loss
    terms: dict[str, tuple[float, nn.Module]] = {}
    if lc.ce_weight:
        terms["ce"] = (lc.ce_weight, CrossEntropyLabelSmooth(num_classes, lc.label_smoothing))
    if lc.triplet_weight:
        terms["triplet"] = (lc.triplet_weight, TripletLoss(lc.triplet_margin, lc.triplet_distance))
    if lc.cosface_weight:
        terms["cosface"] = (lc.cosface_weight, CosFaceLoss(dim, num_classes, lc.cosface_s, lc.cosface_m))
    if lc.arcface_weight:
        terms["arcface"] = (lc.arcface_weight, ArcFaceLoss(dim, num_classes, lc.arcface_s, lc.arcface_m))
    if lc.center_weight:
        terms["center"] = (lc.center_weight, CenterLoss(dim, num_classes))
    teacher = None
    if lc.distill_weight:
        teacher = ckpt.load_reid_model(lc.distill_teacher).to(device).train()
        for p in teacher.parameters():
            p.requires_grad = False
        if teacher.spec["num_classes"] != num_classes:
            raise ValueError(f"loss.distill_teacher: {lc.distill_teacher} has {teacher.spec['num_classes']} classes, "
                             f"the training set {num_classes}; distillation needs the same identities")  # fmt: skip
        terms["distill"] = (1.0, DistillationLoss(lc.distill_weight, lc.distill_temperature, lc.label_smoothing))
        terms.pop("ce", None)  # the distillation loss contains the cross-entropy
    if lc.dino_aux_weight:
        terms["dino"] = (lc.dino_aux_weight, dino_aux(cfg, backbone, steps_per_epoch))
    for _, fn in terms.values():
        fn.to(device)
    return RecogLosses(terms, teacher)


def build_schedule(cfg: C.RecogConfig, steps_per_epoch: int):
    t = cfg.train
    total, warmup = t.epochs * steps_per_epoch, t.warmup_epochs * steps_per_epoch
    if t.scheduler == "cosine":
        return lambda it: cosine_schedule(it, total, t.lr, t.min_lr, warmup, t.lr * t.warmup_factor)
    return lambda it: step_schedule(it, steps_per_epoch, t.lr, t.milestones, t.gamma, warmup, t.warmup_factor)


# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: C.RecogConfig, export_onnx: bool = False) -> dict[str, float]:
    out = Path(cfg.run.output_dir)
    with dist.session(cfg.run.device) as device:
        start_run(cfg, out)

        loader, batches, num_classes, eval_sets = build_data(cfg)
        steps_per_epoch = len(loader)
        model = build_model(cfg, num_classes).to(device)
        apply_speed_options(cfg.run, model.backbone)
        losses = build_losses(cfg, model.head.out_dim, num_classes, device, model.backbone, steps_per_epoch)
        if dist.get_world_size() > 1:
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        for name, (_, fn) in losses.terms.items():  # loss weights start from rank 0's, as DDP does for the model
            if name != "distill":
                dist.broadcast_tensors([*fn.parameters(), *fn.buffers()])
        t = cfg.train
        groups = reid_param_groups(
            net, t.bias_lr_factor, t.head_lr_factor, t.layer_decay if is_vit(cfg.model.arch) else 1.0
        )
        for name in ("cosface", "arcface"):  # margin heads hold class weights: train them like the head
            if name in losses.terms:
                groups.append({"params": list(losses.terms[name][1].parameters()), "lr_scale": t.head_lr_factor,
                               "apply_wd": True})  # fmt: skip
        if "dino" in losses.terms:  # the auxiliary DINO head; the backbone is already in the groups
            groups.append({"params": list(losses.terms["dino"][1].head.parameters()), "lr_scale": t.head_lr_factor,
                           "apply_wd": True})  # fmt: skip
        optimizer = build_optimizer(t.optimizer, groups, t.lr, t.weight_decay, t.momentum, cfg.run.fused_optimizer)
        center_opt = None
        if "center" in losses.terms:
            center_opt = torch.optim.SGD(losses.terms["center"][1].parameters(), lr=cfg.loss.center_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
        schedule = build_schedule(cfg, steps_per_epoch)
        runlog = RunLog(out)

        start_epoch, start_step, rng, last_saved, nonfinite, best = 0, 0, None, None, 0, {"mAP": -1.0}
        resume = ckpt.find_resume(cfg.run.resume, out, ("state_dict", "optimizer", "epoch"))
        if resume is not None:
            path, state = resume
            ckpt.check_state_dict(net, state["state_dict"], path, "model")
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            for name, sd in state["losses"].items():
                if name not in losses.terms:
                    raise ckpt.CheckpointError(f"{path}: has a {name} loss, which the config does not switch on")
                ckpt.check_state_dict(losses.terms[name][1], sd, path, f"{name} loss")
            if center_opt is not None:
                center_opt.load_state_dict(state["center_optimizer"])
            start_epoch, start_step, rng = ckpt.resume_point(state, path, dist.get_rank(), dist.get_world_size())
            best, last_saved = dict(state["best"]), path
            log.info("resumed from %s at epoch %d, step %d", path, start_epoch, start_step)

        def evaluate() -> dict[str, float]:
            return evaluate_query_gallery(net, *eval_sets, device, cfg.eval.metric, cfg.eval.flip,
                                          cfg.data.test_batch_size, cfg.data.num_workers,
                                          **eval_options(cfg.eval))  # fmt: skip

        def save(epochs_done: int, step_in_epoch: int = 0) -> None:
            """Checkpoint after `epochs_done` epochs and `step_in_epoch` steps of the next; every rank calls it."""
            nonlocal last_saved
            rngs = dist.all_gather_object(ckpt.rng_state())  # each rank's streams, for an exact mid-epoch resume
            path = out / ckpt.checkpoint_name(epochs_done, step_in_epoch)

            def write() -> None:
                state = {
                    "kind": "reid_model", "spec": dict(net.spec), "state_dict": net.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "losses": {k: fn.state_dict() for k, (_, fn) in losses.terms.items() if k != "distill"},
                    "center_optimizer": center_opt.state_dict() if center_opt is not None else {},
                    "epoch": epochs_done, "step_in_epoch": step_in_epoch, "best": best, "config": C.to_dict(cfg),
                    "rng": rngs,
                }  # fmt: skip
                ckpt.save_checkpoint(state, path)
                ckpt.prune_checkpoints(out, cfg.run.keep_last)

            dist.run_on_main(write)  # a failed write (disk full) stops every rank, not only rank 0
            last_saved = path

        metrics = None
        if start_epoch == 0 and start_step == 0:
            metrics = evaluate()
            log.info("epoch 0 (before training): %s", fmt_metrics(metrics))
            runlog.write("eval", 0, epoch=0, **metrics)
        for epoch in range(start_epoch, t.epochs):
            first = start_step if epoch == start_epoch else 0
            batches.set_epoch(epoch, first)
            # Each sample's augmentation has its own seed (SeededBatches); the processes' streams (stochastic depth)
            # restart from (seed, epoch, rank) every epoch, or continue from a mid-epoch checkpoint's states.
            dist.seed_everything(cfg.run.seed + 1000 * epoch)
            if first and rng is not None:
                ckpt.set_rng_state(rng)
            try:
                stats = train_one_epoch_recog(
                    model, losses, loader, optimizer, scaler, schedule, epoch, steps_per_epoch, device, cfg.run.amp,
                    t.clip_grad, runlog, cfg.run.log_every, center_opt, start_step=first,
                    nonfinite_budget=cfg.run.skip_nonfinite_steps - nonfinite,
                    save_every_steps=cfg.run.save_every_steps, save_checkpoint=lambda step, e=epoch: save(e, step),
                )  # fmt: skip
            except NonFiniteLossError as e:
                raise NonFiniteLossError(stopped_message(e, cfg.run.skip_nonfinite_steps, last_saved)) from None
            nonfinite += stats["nonfinite_steps"]
            done = epoch + 1
            log.info("epoch %d/%d: %s", done, t.epochs, fmt_metrics(stats))
            runlog.write("epoch", done * steps_per_epoch, epoch=done, **stats)
            # The model and the loss terms' own weights (margin classes, centres, DINO head) must agree on every rank.
            prints = dist.fingerprints([*net.parameters(), *losses.parameters()])  # BN statistics stay per rank
            if not torch.equal(prints, prints[:1].expand_as(prints)):
                raise RuntimeError(f"epoch {done}: the model or the loss weights differ across ranks:\n{prints}")
            evaluated = (cfg.eval.eval_every and done % cfg.eval.eval_every == 0) or done == t.epochs
            if evaluated:
                metrics = evaluate()
                log.info("epoch %d: %s", done, fmt_metrics(metrics))
                runlog.write("eval", done * steps_per_epoch, epoch=done, **metrics)
            if evaluated and metrics["mAP"] > best["mAP"]:
                best = {"epoch": done, **metrics}
                dist.run_on_main(lambda: ckpt.save_reid_model(net, out / "best.pth"))
            save(done)
            dist.barrier()
        if start_epoch >= t.epochs:  # resumed a finished run: report it again
            metrics = evaluate()
        if dist.is_main_process():
            ckpt.save_reid_model(net, out / "model.pth")
            if export_onnx:
                onnx_export(net.cpu(), out / "model.onnx", tuple(cfg.aug.size))
            results = {"final": metrics, "best": best, "data": {"train": [s.name for s in cfg.data.train],
                                                                "test": cfg.data.test.name}}  # fmt: skip
            (out / "results.json").write_text(json.dumps(results, indent=2))
            log.info("final: %s | best (epoch %s): mAP %.4f", fmt_metrics(metrics), best.get("epoch"), best["mAP"])
        runlog.close()
        return metrics


def _flags(parser) -> None:
    parser.add_argument("--export-onnx", action="store_true", help="also write OUTPUT/model.onnx (dynamic batch axis)")


if __name__ == "__main__":
    cfg, args = load_config(C.RecogConfig, "cfg_recog.yaml", __doc__.split("\n")[0], add_arguments=_flags)
    main(cfg, export_onnx=args.export_onnx)
