"""Stage 1: DINO self-distillation pretraining (Caron et al. 2021) on unlabeled person images.

    bash train.sh 0,1,2,3 4 train_dino.py [--config cfg_dino.yaml] [key.sub=value ...]
    bash train.sh cpu 2 train_dino.py --config configs/demo/dino.yaml

Reads top to bottom like the paper's Algorithm 1: build data, student and teacher, optimiser; then per epoch run
`engine.train_one_epoch_dino`, checkpoint, export the teacher backbone, and evaluate it when a labeled set is given.
With `dino.version: v2` the same loop trains DINOv2 (Oquab et al. 2023): iBOT on masked global crops and KoLeo are
added to the DINO loss (preset: configs/luperson/dinov2_vit_small.yaml).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog.cli import apply_speed_options, load_config, start_run, stopped_message
from dino_recog.data import datasets as ds
from dino_recog.data.batch_augment import BatchAugment
from dino_recog.data.build import query_gallery, unlabeled_items
from dino_recog.data.masking import BlockMaskGenerator
from dino_recog.data.samplers import SeededBatches
from dino_recog.data.transforms import MultiCropTransform
from dino_recog.engine import DinoStep, DinoV2Terms, NonFiniteLossError, train_one_epoch_dino
from dino_recog.evaluation import evaluate_query_gallery
from dino_recog.losses import DINOLoss, IBOTPatchLoss
from dino_recog.models import BackboneSpec, DINOHead, MaskedMultiCropNet, MultiCropNet, build_backbone
from dino_recog.optim import build_optimizer, param_groups
from dino_recog.runlog import RunLog, fmt_metrics
from dino_recog.schedules import cosine_schedule, linear_warmup, scaled_lr

log = logging.getLogger("dino_recog.train_dino")


# ---------------------------------------------------------------------------------------------------------------------
# Builders: the only functions that read the config


def build_data(cfg: C.DinoConfig) -> tuple[DataLoader, SeededBatches]:
    crops = cfg.crops
    transform = MultiCropTransform(
        crops.global_crops_size, crops.global_crops_scale, crops.local_crops_number, crops.local_crops_size,
        crops.local_crops_scale, crops.part_aware_local_crops, crops.mean, crops.std, crops.gpu_augment,
    )  # fmt: skip
    items = unlabeled_items(cfg.data.train, cfg.data.keys_file) if dist.is_main_process() else None
    items = dist.broadcast_object(items)  # list the folder once, not once per process
    dataset = ds.ImageDataset(items, transform=transform, train=True)
    if len(dataset) < cfg.data.batch_size_per_gpu * dist.get_world_size():
        raise ValueError(
            f"data.train: {len(dataset)} images in {cfg.data.train.root} is fewer than one batch "
            f"({cfg.data.batch_size_per_gpu} per process x {dist.get_world_size()} processes)"
        )
    log.info(
        "stage-1 data: %s, %d images, %d crops per image",
        cfg.data.train.name,
        len(dataset),
        2 + crops.local_crops_number,
    )
    sampler = DistributedSampler(
        dataset, dist.get_world_size(), dist.get_rank(), shuffle=True, seed=cfg.run.seed, drop_last=True
    )
    # Batches that can start mid-epoch, each sample with its own augmentation seed (exact mid-epoch resume).
    batches = SeededBatches(BatchSampler(sampler, cfg.data.batch_size_per_gpu, drop_last=True), cfg.run.seed,
                            dist.get_rank())  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
        collate_fn=ds.collate_skip_none, generator=torch.Generator(),
    )  # fmt: skip
    return loader, batches


def build_gpu_augment(cfg: C.DinoConfig, device: torch.device) -> BatchAugment | None:
    """With `crops.gpu_augment`, the photometric half of the multi-crop augmentation, run on the training device.

    The workers then return uint8 crops (crop, resize, flip); this module jitters, grays, blurs, solarises and
    normalises them per sample. Its draws depend on (seed + rank, iteration) only, so resuming repeats them.
    """
    if not cfg.crops.gpu_augment:
        return None
    return BatchAugment(cfg.crops.mean, cfg.crops.std, seed=cfg.run.seed + dist.get_rank()).to(device)


def build_model(cfg: C.DinoConfig) -> tuple[MultiCropNet, MultiCropNet]:
    """Student (with stochastic depth) and teacher (without); the teacher starts as a copy of the student.

    With dino.version v2 both are MaskedMultiCropNets (mask token; a separate iBOT head of the DINO head's size if
    asked for)."""
    m = cfg.model

    def net(drop_path: float) -> MultiCropNet:
        backbone, dim = build_backbone(
            m.arch, img_size=cfg.crops.global_crops_size, patch_size=m.patch_size, drop_path_rate=drop_path,
            depth=m.depth or None, embed_dim=m.embed_dim or None, num_heads=m.num_heads or None,
            layerscale=m.layerscale, num_register_tokens=m.num_register_tokens,
        )  # fmt: skip
        head = DINOHead(dim, m.out_dim, m.use_bn_in_head, m.norm_last_layer, hidden_dim=m.hidden_dim,
                        bottleneck_dim=m.bottleneck_dim)  # fmt: skip
        if cfg.dino.version == "v1":
            return MultiCropNet(backbone, head)
        ibot_head = DINOHead(dim, m.out_dim, False, m.norm_last_layer, hidden_dim=m.hidden_dim,
                             bottleneck_dim=m.bottleneck_dim) if cfg.dino.separate_ibot_head else None  # fmt: skip
        return MaskedMultiCropNet(backbone, head, ibot_head)

    student, teacher = net(m.drop_path_rate), net(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def build_losses(cfg: C.DinoConfig) -> tuple[DINOLoss, DinoV2Terms | None]:
    """The DINO loss; with dino.version v2 also the DINOv2 terms: iBOT (its own centre), KoLeo and the mask sampler
    over the global crops' patch grid."""
    d = cfg.dino
    loss_fn = DINOLoss(cfg.model.out_dim, 2, d.student_temp, d.center_momentum, d.centering)
    if d.version == "v1":
        return loss_fn, None
    patch = cfg.model.patch_size
    grid = (cfg.crops.global_crops_size[0] // patch, cfg.crops.global_crops_size[1] // patch)  # (h, w) patches
    ibot = IBOTPatchLoss(cfg.model.out_dim, d.student_temp, d.center_momentum, d.centering)
    v2 = DinoV2Terms(ibot, BlockMaskGenerator(grid), tuple(d.mask_ratio_min_max), d.mask_sample_probability,
                     d.ibot_weight, d.koleo_weight)  # fmt: skip
    return loss_fn, v2


def build_schedule(cfg: C.DinoConfig, steps_per_epoch: int):
    """iteration -> DinoStep, from the pure schedule functions."""
    t, d = cfg.train, cfg.dino
    total = t.epochs * steps_per_epoch
    lr = scaled_lr(t.lr, cfg.data.batch_size_per_gpu * dist.get_world_size())

    def schedule(it: int) -> DinoStep:
        return DinoStep(
            lr=cosine_schedule(it, total, lr, t.min_lr, t.warmup_epochs * steps_per_epoch),
            weight_decay=cosine_schedule(it, total, t.weight_decay, t.weight_decay_end),
            momentum=cosine_schedule(it, total, d.momentum_teacher, 1.0),
            teacher_temp=linear_warmup(
                it, d.warmup_teacher_temp_epochs * steps_per_epoch, d.warmup_teacher_temp, d.teacher_temp
            ),
            freeze_last_layer=it < d.freeze_last_layer * steps_per_epoch,
        )

    return schedule


def build_eval_sets(cfg: C.DinoConfig) -> tuple[ds.ImageDataset, ds.ImageDataset] | None:
    if cfg.data.eval_set is None or cfg.eval.eval_every == 0:
        return None
    _, query, gallery = query_gallery(cfg.data.eval_set, cfg.crops.global_crops_size, cfg.crops.mean, cfg.crops.std)
    return query, gallery


# ---------------------------------------------------------------------------------------------------------------------


def evaluate_backbone(backbone: nn.Module, eval_sets, device: torch.device, cfg: C.DinoConfig) -> dict[str, float]:
    """Weighted kNN top-1 and rank-1/5/10, mAP, mINP of the backbone's features on the monitoring set."""
    return evaluate_query_gallery(backbone, *eval_sets, device, num_workers=cfg.data.num_workers,
                                  knn=(cfg.eval.knn_k, cfg.eval.knn_temperature))  # fmt: skip


def main(cfg: C.DinoConfig) -> dict[str, float]:
    out = Path(cfg.run.output_dir)
    with dist.session(cfg.run.device) as device:
        start_run(cfg, out)

        loader, batches = build_data(cfg)
        steps_per_epoch = len(loader)
        student, teacher = build_model(cfg)
        student, teacher = student.to(device), teacher.to(device)
        apply_speed_options(cfg.run, student.backbone, teacher.backbone)
        if dist.get_world_size() > 1:
            # BatchNorm statistics over the global batch, as the official code does (SyncBatchNorm needs CUDA).
            if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            student = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )
            teacher.load_state_dict(student.module.state_dict())  # DDP broadcast rank 0's student; copy it again
        net = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
        loss_fn, v2 = build_losses(cfg)
        loss_fn = loss_fn.to(device)
        if v2 is not None:
            v2.ibot_loss.to(device)
        optimizer = build_optimizer(
            cfg.train.optimizer,
            param_groups(net, cfg.train.layer_decay, cfg.train.patch_embed_lr_mult),
            0.0,
            cfg.train.weight_decay,
            cfg.train.momentum,
            cfg.run.fused_optimizer,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
        schedule = build_schedule(cfg, steps_per_epoch)
        eval_sets = build_eval_sets(cfg)
        augment = build_gpu_augment(cfg, device)
        runlog = RunLog(out)

        start_epoch, start_step, rng, last_saved, nonfinite = 0, 0, None, None, 0
        resume = ckpt.find_resume(cfg.run.resume, out, ("student", "teacher", "optimizer", "epoch"))
        if resume is not None:
            path, state = resume
            ckpt.check_state_dict(net, state["student"], path, "student")
            ckpt.check_state_dict(teacher, state["teacher"], path, "teacher")
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            loss_fn.load_state_dict(state["dino_loss"])
            if v2 is not None:
                v2.ibot_loss.load_state_dict(state["ibot_loss"])
            start_epoch, start_step, rng = ckpt.resume_point(state, path, dist.get_rank(), dist.get_world_size())
            last_saved = path
            log.info("resumed from %s at epoch %d, step %d", path, start_epoch, start_step)
        elif eval_sets is not None:
            metrics = evaluate_backbone(teacher.backbone, eval_sets, device, cfg)
            log.info("epoch 0 (random init): %s", fmt_metrics(metrics))
            runlog.write("eval", 0, epoch=0, **metrics)

        def save(epochs_done: int, step_in_epoch: int = 0, **extra: torch.Tensor) -> None:
            """Checkpoint after `epochs_done` epochs and `step_in_epoch` steps of the next; every rank calls it."""
            nonlocal last_saved
            rngs = dist.all_gather_object(ckpt.rng_state())  # each rank's streams, for an exact mid-epoch resume
            path = out / ckpt.checkpoint_name(epochs_done, step_in_epoch)

            def write() -> None:
                state = {
                    "student": net.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "dino_loss": loss_fn.state_dict(), "epoch": epochs_done,
                    "step_in_epoch": step_in_epoch, "iteration": epochs_done * steps_per_epoch + step_in_epoch,
                    "config": C.to_dict(cfg), "rng": rngs, **extra,
                }  # fmt: skip
                if v2 is not None:
                    state["ibot_loss"] = v2.ibot_loss.state_dict()
                ckpt.save_checkpoint(state, path)
                ckpt.prune_checkpoints(out, cfg.run.keep_last, cfg.eval.saveckp_freq)

            dist.run_on_main(write)  # a failed write (disk full) stops every rank, not only rank 0
            last_saved = path

        metrics: dict[str, float] = {}
        for epoch in range(start_epoch, cfg.train.epochs):
            first = start_step if epoch == start_epoch else 0
            batches.set_epoch(epoch, first)
            # Each sample's augmentation has its own seed (SeededBatches); the processes' streams (stochastic depth)
            # restart from (seed, epoch, rank) every epoch, or continue from a mid-epoch checkpoint's states.
            dist.seed_everything(cfg.run.seed + 1000 * epoch)
            loader.generator.manual_seed(cfg.run.seed + 1000 * epoch + dist.get_rank())
            if first and rng is not None:
                ckpt.set_rng_state(rng)
            try:
                stats = train_one_epoch_dino(
                    student, teacher, loss_fn, loader, optimizer, scaler, schedule, epoch, steps_per_epoch, device,
                    cfg.run.amp, cfg.train.clip_grad, runlog, cfg.run.log_every, augment=augment, v2=v2,
                    start_step=first, nonfinite_budget=cfg.run.skip_nonfinite_steps - nonfinite,
                    save_every_steps=cfg.run.save_every_steps, save_checkpoint=lambda step, e=epoch: save(e, step),
                )  # fmt: skip
            except NonFiniteLossError as e:
                raise NonFiniteLossError(stopped_message(e, cfg.run.skip_nonfinite_steps, last_saved)) from None
            nonfinite += stats["nonfinite_steps"]
            done = epoch + 1
            log.info("epoch %d/%d: %s", done, cfg.train.epochs, fmt_metrics(stats))
            runlog.write("epoch", done * steps_per_epoch, epoch=done, **stats)
            # The teacher and the centre must be identical on every rank (DDP keeps the students in step).
            centres = [loss_fn.center] + ([v2.ibot_loss.center] if v2 is not None else [])
            prints = dist.fingerprints([*teacher.state_dict().values(), *centres])
            if not torch.equal(prints, prints[:1].expand_as(prints)):
                raise RuntimeError(f"epoch {done}: the teacher or the DINO centre differs across ranks:\n{prints}")
            save(done, teacher_fingerprints=prints.cpu())
            if done == cfg.train.epochs or (cfg.eval.export_every and done % cfg.eval.export_every == 0):
                dist.run_on_main(lambda: ckpt.save_backbone(teacher.backbone, BackboneSpec.from_dino_config(cfg),
                                                            out / "teacher_backbone.pth"))  # fmt: skip
            if eval_sets is not None and (done % cfg.eval.eval_every == 0 or done == cfg.train.epochs):
                metrics = evaluate_backbone(teacher.backbone, eval_sets, device, cfg)
                log.info("epoch %d teacher: %s", done, fmt_metrics(metrics))
                runlog.write("eval", done * steps_per_epoch, epoch=done, **metrics)
            dist.barrier()
        runlog.close()
        return metrics


if __name__ == "__main__":
    main(load_config(C.DinoConfig, "cfg_dino.yaml", __doc__.split("\n")[0])[0])
