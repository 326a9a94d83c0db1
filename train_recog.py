"""Stage 2: supervised re-identification fine-tuning of a (DINO-pretrained) backbone.

    bash train.sh 0,1,2,3 4 train_recog.py [--config cfg_recog.yaml] [key.sub=value ...]
    bash train.sh cpu 2 train_recog.py --config configs/demo/recog.yaml

Builds the P x K identity-balanced data and the task (`tasks.ReIDTask`: the backbone with weights from a stage-1
export, a DINO checkpoint, timm, or none, a BN-neck head, and the weighted loss terms), and the optimiser; then per
epoch runs `engine.train_one_epoch`, checkpoints, and evaluates on query/gallery, keeping the best model by mAP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog import parallel
from dino_recog.cli import apply_speed_options, load_config, start_run
from dino_recog.data import datasets as ds
from dino_recog.data.build import query_gallery, train_records
from dino_recog.data.labeled_lmdb import LabeledLMDB
from dino_recog.data.samplers import PKSampler, RandomPKSampler, SeededBatches
from dino_recog.data.transforms import reid_train_transform
from dino_recog.export import export_onnx as onnx_export
from dino_recog.models import build_reid_model
from dino_recog.models.backbones import is_vit
from dino_recog.optim import build_optimizer
from dino_recog.protocol_card import card_line, protocol_card
from dino_recog.runlog import fmt_metrics
from dino_recog.tasks import build_model, build_reid_task, reid_schedule  # noqa: F401  (build_model: tests use it)
from dino_recog.training import TrainingRun, optimizer_steps
from dino_recog.user_errors import user_errors

log = logging.getLogger("dino_recog.train_recog")


def build_data(cfg: C.RecogConfig) -> tuple[DataLoader, SeededBatches, int, tuple[ds.ImageDataset, ds.ImageDataset]]:
    a = cfg.aug
    d = cfg.data
    records = train_records(d.train, d.min_images_per_id)
    pids = records.pids if isinstance(records, LabeledLMDB) else np.array([r.pid for r in records])
    num_classes = int(pids.max()) + 1  # labels are 0..N-1
    train_set = ds.ImageDataset(
        records, reid_train_transform(a.size, a.mean, a.std, a.flip_prob, a.padding, a.erasing_prob, a.color_jitter),
        replace_by_identity=True,  # an undecodable image is replaced by another of its identity: P x K keeps K
    )
    sampler_class = {"pk_epoch": PKSampler, "pk_random": RandomPKSampler}[d.sampler]
    sampler = sampler_class(pids, d.num_identities, d.num_instances, dist.get_rank(), dist.get_world_size(),
                            cfg.run.seed, d.iters_per_epoch)  # fmt: skip
    # Batches that can start mid-epoch, each sample with its own augmentation seed (exact mid-epoch resume).
    batches = SeededBatches(sampler, cfg.run.seed, dist.get_rank())
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=dist.loader_workers(cfg.data.num_workers),
                        pin_memory=torch.cuda.is_available(), collate_fn=ds.collate_skip_none,
                        generator=torch.Generator())  # fmt: skip
    _, query, gallery = query_gallery(cfg.data.test, a.size, a.mean, a.std)
    return loader, batches, num_classes, (query, gallery)


def main(cfg: C.RecogConfig, export_onnx: bool = False) -> dict[str, float]:
    out = Path(cfg.run.output_dir)
    with dist.session(cfg.run.device) as device:
        start_run(cfg, out)
        loader, batches, num_classes, eval_sets = build_data(cfg)
        t = cfg.train
        steps = optimizer_steps(len(loader), t.accumulate_steps)
        task = build_reid_task(cfg, num_classes, steps).to(device)
        apply_speed_options(cfg.run, task.model.backbone)
        # DDP around the model and the loss terms' weights, or FSDP sharding them; the teachers stay outside
        parallel.wrap(task, device, cfg.run.parallel, cfg.run.amp, cfg.run.fsdp_cpu_offload)
        net = task.model
        spec = dict(net.spec)

        def full_model() -> torch.nn.Module:
            """The model, or under FSDP a plain copy of it on every rank (a collective) to evaluate and export."""
            return parallel.full_copy(net, lambda: build_reid_model(spec))
        groups = task.param_groups(t.bias_lr_factor, t.head_lr_factor, t.layer_decay if is_vit(cfg.model.arch) else 1)
        optimizers = {"optimizer": build_optimizer(t.optimizer, groups, t.lr, t.weight_decay, t.momentum,
                                                   cfg.run.fused_optimizer)}  # fmt: skip
        sharded = ()
        if task.shards():  # Partial FC: each rank's classifier shard has an optimiser (and its state) of its own
            sharded = ("partial_fc_optimizer",)
            optimizers[sharded[0]] = build_optimizer(t.optimizer, task.shard_param_groups(), t.lr, t.weight_decay,
                                                     t.momentum, cfg.run.fused_optimizer)  # fmt: skip
        optimizers.update(zip(["center_optimizer"], task.extra_optimizers()))  # the centres' own SGD (BoT)
        best = {"mAP": -1.0}
        d = cfg.data
        batch = d.num_identities * d.num_instances * dist.get_world_size() * t.accumulate_steps
        run = TrainingRun(cfg, task, optimizers, steps, sharded=sharded, global_batch=batch,
                          extra=lambda: {"kind": "reid_model", "spec": spec, "best": best})  # fmt: skip
        schedule = reid_schedule(cfg, steps)
        log.info("effective batch %d (P x K %d x %d per process x %d processes x %d accumulation steps); train.lr %g "
                 "as given (stage 2 does not scale it with the batch)", batch, d.num_identities, d.num_instances,
                 dist.get_world_size(), t.accumulate_steps, t.lr)  # fmt: skip

        def evaluate(epoch: int | None, model: torch.nn.Module) -> dict[str, float]:
            return run.evaluate_reid(model, eval_sets, device, epoch)

        state = run.resume()
        best = dict(state["best"]) if state is not None else best
        metrics = evaluate(0, full_model()) if run.start_epoch == 0 and run.start_step == 0 else None
        for epoch in range(run.start_epoch, t.epochs):
            first = run.begin_epoch(epoch, batches, loader)
            run.train_epoch(epoch, first, loader, schedule)
            metrics, best = run.end_epoch(epoch + 1, evaluate, best, full_model, metrics)
        model = full_model()
        if run.start_epoch >= t.epochs:  # resumed a finished run: report it again
            metrics = evaluate(None, model)
        if dist.is_main_process():
            ckpt.save_reid_model(model, out / "model.pth")
            if export_onnx:
                onnx_export(model.cpu(), out / "model.onnx", tuple(cfg.aug.size))
            card = protocol_card(cfg, spec)  # the conventions that change published numbers
            results = {"final": metrics, "best": best, "data": {"train": [s.name for s in cfg.data.train],
                                                                "test": cfg.data.test.name},
                       "protocol": card}  # fmt: skip
            (out / "results.json").write_text(json.dumps(results, indent=2))
            log.info("protocol: %s", card_line(card))
            log.info("final: %s | best (epoch %s): mAP %.4f", fmt_metrics(metrics), best.get("epoch"), best["mAP"])
        run.close()
        return metrics


def _flags(parser) -> None:
    parser.add_argument("--export-onnx", action="store_true", help="also write OUTPUT/model.onnx (dynamic batch axis)")


if __name__ == "__main__":
    cfg, args = load_config(C.RecogConfig, "cfg_recog.yaml", __doc__.split("\n")[0], add_arguments=_flags)
    with user_errors():  # a missing folder, a locked output directory, ...: one line
        main(cfg, export_onnx=args.export_onnx)
