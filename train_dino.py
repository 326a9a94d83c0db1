"""Stage 1: DINO self-distillation pretraining (Caron et al. 2021) on unlabeled person images.

    bash train.sh 0,1,2,3 4 train_dino.py [--config cfg_dino.yaml] [key.sub=value ...]
    bash train.sh cpu 2 train_dino.py --config configs/demo/dino.yaml

Reads top to bottom like the paper's Algorithm 1: build the data, the task (student, teacher, DINO loss and centre;
`tasks.DinoTask`) and the optimiser; then per epoch run `engine.train_one_epoch`, checkpoint, export the teacher
backbone, and evaluate it when a labeled set is given. With `dino.version: v2` the same loop trains DINOv2 (Oquab et
al. 2023): iBOT on masked global crops and KoLeo are added to the DINO loss (preset:
configs/luperson/dinov2_vit_small.yaml).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog import parallel
from dino_recog.cli import apply_speed_options, load_config, start_run
from dino_recog.data import datasets as ds
from dino_recog.data.build import query_gallery, unlabeled_items
from dino_recog.data.device_decode import EncodedMultiCrop, collate_encoded
from dino_recog.data.samplers import ResumableDistributedSampler, SeededBatches
from dino_recog.data.transforms import MultiCropTransform
from dino_recog.evaluation import evaluate_query_gallery
from dino_recog.models import BackboneSpec
from dino_recog.optim import build_optimizer
from dino_recog.runlog import fmt_metrics
from dino_recog.schedules import scaled_lr
from dino_recog.tasks import build_dino_task, dino_schedule
from dino_recog.tasks.dino import effective_batch
from dino_recog.training import TrainingRun, optimizer_steps
from dino_recog.user_errors import user_errors

log = logging.getLogger("dino_recog.train_dino")


def build_data(cfg: C.DinoConfig) -> tuple[DataLoader, SeededBatches]:
    crops = cfg.crops
    on_device = crops.decode == "gpu"  # workers send JPEG bytes and crop boxes; the task makes the pixels
    transform = (EncodedMultiCrop if on_device else MultiCropTransform)(
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
    log.info("stage-1 data: %s, %d images, %d crops per image", cfg.data.train.name, len(dataset),
             2 + crops.local_crops_number)  # fmt: skip
    # shuffled, drop_last; can resume after the samples a run on another number of processes trained on
    sampler = ResumableDistributedSampler(dataset, dist.get_world_size(), dist.get_rank(), seed=cfg.run.seed)
    # Batches that can start mid-epoch, each sample with its own augmentation seed (exact mid-epoch resume).
    batches = SeededBatches(BatchSampler(sampler, cfg.data.batch_size_per_gpu, drop_last=True), cfg.run.seed,
                            dist.get_rank())  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=dist.loader_workers(cfg.data.num_workers),
        pin_memory=torch.cuda.is_available(), collate_fn=collate_encoded if on_device else ds.collate_skip_none,
        generator=torch.Generator(),
    )  # fmt: skip
    return loader, batches


def build_eval_sets(cfg: C.DinoConfig) -> tuple[ds.ImageDataset, ds.ImageDataset] | None:
    if cfg.data.eval_set is None or cfg.eval.eval_every == 0:
        return None
    _, query, gallery = query_gallery(cfg.data.eval_set, cfg.crops.global_crops_size, cfg.crops.mean, cfg.crops.std)
    return query, gallery


def main(cfg: C.DinoConfig) -> dict[str, float]:
    out = Path(cfg.run.output_dir)
    with dist.session(cfg.run.device) as device:
        start_run(cfg, out)
        loader, batches = build_data(cfg)
        task = build_dino_task(cfg).to(device)
        apply_speed_options(cfg.run, task.student.backbone, task.teacher.backbone)
        # DDP around the student (the teacher starts as rank 0's student everywhere), or FSDP: both sharded alike
        parallel.wrap(task, device, cfg.run.parallel, cfg.run.amp, cfg.run.fsdp_cpu_offload)
        t = cfg.train
        optimizer = build_optimizer(t.optimizer, task.param_groups(t.layer_decay, t.patch_embed_lr_mult), 0.0,
                                    t.weight_decay, t.momentum, cfg.run.fused_optimizer)  # fmt: skip
        steps = optimizer_steps(len(loader), t.accumulate_steps)
        run = TrainingRun(cfg, task, {"optimizer": optimizer}, steps, keep_every=cfg.eval.saveckp_freq,
                          global_batch=effective_batch(cfg), lr_at=lambda batch: scaled_lr(t.lr, batch))  # fmt: skip
        schedule = dino_schedule(cfg, steps)
        log.info("effective batch %d (%d per process x %d processes x %d accumulation steps): lr %g x %d / 256 = %g",
                 effective_batch(cfg), cfg.data.batch_size_per_gpu, dist.get_world_size(), t.accumulate_steps, t.lr,
                 effective_batch(cfg), scaled_lr(t.lr, effective_batch(cfg)))  # fmt: skip
        eval_sets = build_eval_sets(cfg)

        def evaluate(epoch: int) -> dict[str, float]:
            """Weighted kNN top-1 and rank-1/5/10, mAP, mINP of the teacher backbone on the monitoring set."""
            metrics = evaluate_query_gallery(task.teacher.backbone, *eval_sets, device,
                                             num_workers=cfg.data.num_workers,
                                             knn=(cfg.eval.knn_k, cfg.eval.knn_temperature))  # fmt: skip
            log.info("epoch %d teacher%s: %s", epoch, " (random init)" if epoch == 0 else "", fmt_metrics(metrics))
            run.log.write("eval", epoch * steps, epoch=epoch, **metrics)
            return metrics

        metrics: dict[str, float] = {}
        if run.resume() is None and eval_sets is not None:
            evaluate(0)
        for epoch in range(run.start_epoch, t.epochs):
            first = run.begin_epoch(epoch, batches, loader)
            run.train_epoch(epoch, first, loader, schedule)  # Algorithm 1: teacher, student, loss, step, EMA
            done = epoch + 1
            run.save(done)
            if done == t.epochs or (cfg.eval.export_every and done % cfg.eval.export_every == 0):
                weights = parallel.full_state_dict(task.teacher.backbone)  # every rank: gathers the shards of FSDP
                dist.run_on_main(lambda w=weights: ckpt.save_backbone(
                    task.teacher.backbone, BackboneSpec.from_dino_config(cfg), out / "teacher_backbone.pth", w))
            if eval_sets is not None and (done % cfg.eval.eval_every == 0 or done == t.epochs):
                metrics = evaluate(done)
            dist.barrier()
        run.close()
        return metrics


if __name__ == "__main__":
    cfg = load_config(C.DinoConfig, "cfg_dino.yaml", __doc__.split("\n")[0])[0]
    with user_errors():  # a missing folder, a locked output directory, ...: one line
        main(cfg)
