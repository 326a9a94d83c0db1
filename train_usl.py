"""Stage 2 without labels: unsupervised (and domain-adaptive) re-identification by cluster contrast.

    bash train.sh 0,1,2,3 4 train_usl.py [--config cfg_usl.yaml] [key.sub=value ...]
    bash train.sh cpu 2 train_usl.py --config configs/market1501/usl_vit_small_transreid_ssl.yaml

Every epoch: the features of the target's training images (`data.train`, labels unused) with the current model,
pseudo-identities by the k-reciprocal Jaccard distance and DBSCAN (outliers left out for the epoch), a cluster
memory of their centroids, then `engine.train_one_epoch` on P x K batches of pseudo-identities with the ClusterNCE
loss (`tasks.USLTask`). The number of clusters and outliers and the clustering's NMI / ARI against the true
identities (monitoring only) go to the run log; query/gallery evaluation every `eval.eval_every` epochs. The model
starts from `model.pretrained` as stage 2's does (a stage-1 export, a DINO checkpoint, a stage-2 model.pth: domain
adaptation starts from a model trained on the labeled source, docs/stages.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dino_recog import checkpoint as ckpt
from dino_recog import config as C
from dino_recog import distributed as dist
from dino_recog import parallel
from dino_recog.cli import apply_speed_options, load_config, start_run
from dino_recog.data import datasets as ds
from dino_recog.data.build import kept_records, labeled_data, query_gallery, train_records
from dino_recog.data.samplers import PKSampler, RandomPKSampler, SeededBatches
from dino_recog.data.transforms import reid_test_transform, reid_train_transform
from dino_recog.models.backbones import is_vit
from dino_recog.optim import build_optimizer
from dino_recog.runlog import fmt_metrics
from dino_recog.tasks import PseudoLabels, build_usl_task, pseudo_label, reid_schedule
from dino_recog.training import TrainingRun, optimizer_steps
from dino_recog.user_errors import user_errors

log = logging.getLogger("dino_recog.train_usl")


def epoch_loader(cfg: C.UslConfig, labels: PseudoLabels) -> tuple[DataLoader, SeededBatches]:
    """P x K batches of the epoch's pseudo-identities (the samplers of stage 2 on the pseudo-labels)."""
    a, d = cfg.aug, cfg.data
    train_set = ds.ImageDataset(
        labels.records,
        reid_train_transform(a.size, a.mean, a.std, a.flip_prob, a.padding, a.erasing_prob, a.color_jitter),
        replace_by_identity=True,
    )
    sampler_class = {"pk_epoch": PKSampler, "pk_random": RandomPKSampler}[d.sampler]
    try:
        sampler = sampler_class([r.pid for r in labels.records], d.num_identities, d.num_instances,
                                dist.get_rank(), dist.get_world_size(), cfg.run.seed,
                                steps_per_epoch(cfg, labels.target.size))  # fmt: skip
    except ValueError as e:  # fewer pseudo-identities than a step's P x processes
        raise ValueError(f"epoch {labels.epoch}: {e}; the clustering found {len(labels.centroids)} pseudo-identities "
                         "(cluster.eps: a lower one splits more, a higher one merges more)") from None  # fmt: skip
    batches = SeededBatches(sampler, cfg.run.seed, dist.get_rank())
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=dist.loader_workers(d.num_workers),
                        pin_memory=torch.cuda.is_available(), collate_fn=ds.collate_skip_none,
                        generator=torch.Generator())  # fmt: skip
    return loader, batches


def steps_per_epoch(cfg: C.UslConfig, num_target: int) -> int:
    """`data.iters_per_epoch`, or (0) the target's images / (P x K x processes): the same every epoch, whatever the
    clustering leaves out (the schedule and the checkpoints count steps)."""
    d = cfg.data
    return d.iters_per_epoch or max(num_target // (d.num_identities * d.num_instances * dist.get_world_size()), 1)


def target_records(spec: C.DatasetSpec) -> list[ds.Record]:
    """The unlabeled target's training images, `keep_list` applied; their identities only measure the clustering."""
    return kept_records(labeled_data(spec).train, spec)


def main(cfg: C.UslConfig) -> dict[str, float]:
    out = Path(cfg.run.output_dir)
    with dist.session(cfg.run.device) as device:
        start_run(cfg, out)
        a, d, t = cfg.aug, cfg.data, cfg.train
        target = target_records(d.train)
        source = train_records(d.source) if d.source else []
        test_tf = reid_test_transform(a.size, a.mean, a.std)

        def extract_set(records: list[ds.Record]) -> ds.ImageDataset:
            return ds.ImageDataset(records, test_tf, train=False)

        _, *eval_sets = query_gallery(d.test, a.size, a.mean, a.std)
        steps = optimizer_steps(steps_per_epoch(cfg, len(target)), t.accumulate_steps)
        task = build_usl_task(cfg).to(device)
        apply_speed_options(cfg.run, task.model.backbone)
        parallel.wrap_ddp(task, device)
        net = task.model
        groups = task.param_groups(t.bias_lr_factor, t.head_lr_factor, t.layer_decay if is_vit(cfg.model.arch) else 1)
        optimizer = build_optimizer(t.optimizer, groups, t.lr, t.weight_decay, t.momentum, cfg.run.fused_optimizer)
        best: dict = {"mAP": -1.0}
        labels: PseudoLabels | None = None

        def extra() -> dict:  # the epoch's pseudo-labels and memory: a resume inside the epoch continues with them
            pseudo = labels.state(task.memory.features) if labels is not None else {}
            return {"kind": "reid_model", "spec": dict(net.spec), "best": best, "pseudo_labels": pseudo}

        run = TrainingRun(cfg, task, {"optimizer": optimizer}, steps, extra=extra)
        schedule = reid_schedule(cfg, steps)
        log.info("batch %d (P x K %d x %d per process x %d processes x %d accumulation steps), %d steps an epoch; "
                 "%d target images%s", d.num_identities * d.num_instances * dist.get_world_size() * t.accumulate_steps,
                 d.num_identities, d.num_instances, dist.get_world_size(), t.accumulate_steps, steps, len(target),
                 f", {len(source)} labeled source images" if source else "")  # fmt: skip

        def evaluate(epoch: int | None, model: torch.nn.Module = net) -> dict[str, float]:
            return run.evaluate_reid(model, eval_sets, device, epoch)

        state = run.resume()
        best = dict(state["best"]) if state is not None else best
        metrics = evaluate(0) if run.start_epoch == 0 and run.start_step == 0 else None
        for epoch in range(run.start_epoch, t.epochs):
            saved = None
            if state is not None and epoch == run.start_epoch and run.start_step:
                saved = state.get("pseudo_labels") or None
                if saved is None or saved["epoch"] != epoch:
                    raise ckpt.CheckpointError(f"{run.last_saved}: a checkpoint inside epoch {epoch} without that "
                                               "epoch's pseudo-labels; resume from an end-of-epoch one")  # fmt: skip
            labels, quality = pseudo_label(net, epoch, target, source, extract_set, cfg, device, saved)
            task.start_epoch(labels.centroids)
            if saved is not None:  # the memory as it was at that step, bit for bit
                task.memory.restore(saved["memory"])
            run.log.write("cluster", epoch * steps, epoch=epoch, **quality)
            loader, batches = epoch_loader(cfg, labels)
            first = run.begin_epoch(epoch, batches, loader)
            run.train_epoch(epoch, first, loader, schedule)
            metrics, best = run.end_epoch(epoch + 1, evaluate, best, lambda: net, metrics)
        if run.start_epoch >= t.epochs:  # resumed a finished run: report it again
            metrics = evaluate(None)
        if dist.is_main_process():
            ckpt.save_reid_model(net, out / "model.pth")
            results = {"final": metrics, "best": best, "data": {"train": d.train.name, "test": d.test.name,
                                                                "source": [s.name for s in d.source]}}  # fmt: skip
            (out / "results.json").write_text(json.dumps(results, indent=2))
            log.info("final: %s | best (epoch %s): mAP %.4f", fmt_metrics(metrics), best.get("epoch"), best["mAP"])
        run.close()
        return metrics


if __name__ == "__main__":
    cfg, _ = load_config(C.UslConfig, "cfg_usl.yaml", __doc__.split("\n")[0])
    with user_errors():  # a missing folder, a locked output directory, ...: one line
        main(cfg)
