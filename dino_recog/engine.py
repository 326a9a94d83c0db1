"""The training loop body, one for every stage: no engine class, no hooks, one function called once per epoch.

A task (`tasks.DinoTask`, `tasks.ReIDTask`) is an nn.Module that owns what a stage trains; the loop asks it for the
loss of a batch (`task(batch, step)`), backpropagates, clips, lets it cancel gradients (`cancel_gradients`), steps
the optimisers and lets it update what is not trained by gradients (`after_step`: EMA teachers).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from . import distributed as dist
from . import parallel
from .data.datasets import CorruptImageError
from .optim import set_schedule
from .runlog import RunLog

__all__ = ["LoopOptions", "NonFiniteLossError", "autocast_context", "train_one_epoch"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing is saved from this state."""


@dataclass
class LoopOptions:
    """How the loop runs, beyond what it trains.

    Args:
        steps_per_epoch: iterations of a whole epoch (iteration = epoch x steps_per_epoch + step).
        amp: bf16 | fp16 | fp32 (autocast on CUDA only).
        clip_grad: max global gradient norm of the parameters of `task.trainable`; 0 disables.
        log_every: iterations between train records (and the one host sync they cost).
        nonfinite_budget: how many more steps with a NaN or infinite loss may be skipped (no optimiser, EMA or
            centre update); one more raises NonFiniteLossError. The decision is taken on all ranks together.
        save_every_steps: `save_checkpoint(steps done in the epoch)` after every this-many-th iteration (counted
            over the run) that does not end the epoch; 0 = never.
        scheduled: how many of the optimisers, from the first, `schedule` sets (the main one, and those of the
            sharded classifiers, which follow it); the others keep their own lr (BoT's centre SGD).
        accumulate_steps: batches (micro-batches) whose gradients are summed into one optimiser step; the loader
            yields steps_per_epoch x this of them (more are not trained on). Iterations count optimiser steps.
    """

    steps_per_epoch: int
    amp: str = "fp32"
    clip_grad: float = 0.0
    log_every: int = 50
    nonfinite_budget: int = 0
    save_every_steps: int = 0
    scheduled: int = 1
    accumulate_steps: int = 1


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it, fp16 when asked, fp32 otherwise (and always on the CPU)."""
    if device.type != "cuda" or amp == "fp32":
        return contextlib.nullcontext()
    if amp == "bf16" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)


def train_one_epoch(
    task: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    schedule: Callable[[int], object],
    epoch: int,
    runlog: RunLog,
    opts: LoopOptions,
    start_step: int = 0,
    save_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One epoch: per batch, the task's loss, backward, clipping, the optimiser step(s), then `task.after_step`.

    Args:
        task: DinoTask, ReIDTask or anything with their methods (forward(batch, step) -> (loss, terms),
            cancel_gradients(step), after_step(step), log_stats(step, terms, loss, epoch), epoch_stats(), `name`);
            possibly with a DDP wrapper of its trainable part (`parallel.wrap_ddp`).
        loader: yields ((inputs, labels, ...), n_skipped) as `collate_skip_none` makes them, from batch
            `start_step` of the epoch on (see `SeededBatches`).
        optimizer: the main optimiser (whose lr and weight decay `schedule` sets, and whose parameters are clipped)
            and optionally more (e.g. the centre loss's SGD), each stepped through the scaler.
        schedule: iteration -> the step's values (`.lr`, optionally `.weight_decay`, and what the task reads).

    Returns:
        Epoch averages of the loss and of each term, the task's `epoch_stats()`, the numbers of skipped
        (undecodable) images and of skipped non-finite steps, and images per second.
    """
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    main = optimizers[0]
    clipped = list(task.trainable.parameters())  # what DDP trains (the teachers have no gradients)
    device = next(task.parameters()).device
    task.train()  # the teachers too, as in the official code: BatchNorm normalises with the batch statistics
    sums: dict[str, torch.Tensor] = {}
    n, skipped, nonfinite, images = 0, 0, 0, 0
    buffers = list(task.buffers())  # what a forward pass changes: BatchNorm statistics, DINO / iBOT centres
    watch = _NonFiniteWatch(task.name, epoch, device)
    accum = opts.accumulate_steps
    # the state of the optimiser step being accumulated (set by its first micro-batch)
    it, step, may_skip, saved, dropped, parts, step_sums = 0, None, False, None, False, 0, {}
    t_start = time.perf_counter()
    bar = tqdm(total=opts.steps_per_epoch, initial=start_step, desc=f"epoch {epoch}",
               disable=not dist.is_main_process(), leave=False)  # fmt: skip
    for m, (batch, n_bad) in enumerate(loader, start_step * accum):
        if m >= opts.steps_per_epoch * accum:  # the last batches of the epoch, too few for a whole step
            break
        i, k = divmod(m, accum)  # optimiser step in the epoch, micro-batch in it
        last = k == accum - 1
        skipped += n_bad
        if k == 0:  # a new optimiser step: its schedule, and the state to put back if it is skipped
            it = epoch * opts.steps_per_epoch + i
            step = schedule(it)
            for o in optimizers[: opts.scheduled]:
                set_schedule(o, step.lr, getattr(step, "weight_decay", None))
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            may_skip = opts.nonfinite_budget > nonfinite
            saved = [b.clone() for b in buffers] if may_skip else None
            dropped, parts, step_sums = False, 0, {}
        if dropped:  # the rest of a step skipped for a non-finite loss: the data order stays that of the run
            continue
        if batch is None:  # every image of the batch was undecodable
            if dist.get_world_size() > 1:  # the other ranks would wait for this one in DDP's gradient all-reduce
                raise CorruptImageError(
                    f"epoch {epoch}, batch {m}: none of the {n_bad} images of rank {dist.get_rank()} could be decoded "
                    "(each named in a warning above); with several processes a rank cannot skip a step alone: "
                    "remove or replace those files of data.train")  # fmt: skip
            if not (last and parts):  # a step with no batch at all is no step
                continue
        else:
            # DDP all-reduces the gradient in the backward pass of the step's last micro-batch only; its no_sync
            # must hold over the forward pass too
            with parallel.no_sync(task) if not last else contextlib.nullcontext():
                with autocast_context(device, opts.amp):
                    loss, terms = task(batch, step)
                if may_skip:  # a step may still be skipped: decide now, on all ranks (one host sync)
                    if _any_nonfinite(loss):
                        _skip_or_raise(task.name, epoch, it, {"loss": loss, **terms}, nonfinite,
                                       opts.nonfinite_budget, buffers, saved)  # fmt: skip
                        for o in optimizers:  # what the step's earlier micro-batches accumulated
                            o.zero_grad(set_to_none=True)
                        parallel.reshard(task)
                        nonfinite += 1
                        dropped = True
                        continue
                else:  # no sync in the hot loop: checked at log intervals, before checkpoints, at the end of the epoch
                    watch.record(it, {"loss": loss, **terms})
                # each micro-batch's mean / accum: their sum is the mean over the step's batches
                scaler.scale(loss / accum if accum > 1 else loss).backward()
            for key, v in [("loss", loss), *terms.items()]:
                v = v.detach().float()
                step_sums[key] = step_sums.get(key, 0.0) + (v / accum if accum > 1 else v)
            parts += 1
            images += _batch_size(batch) * dist.get_world_size()
            if not last:
                continue
        # the optimiser step, on the gradient summed over the step's micro-batches
        if opts.clip_grad > 0:
            scaler.unscale_(main)
            nn.utils.clip_grad_norm_(clipped, opts.clip_grad)
        task.cancel_gradients(step)
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        task.after_step(step)

        for key, v in step_sums.items():
            sums[key] = sums.get(key, 0.0) + v
        n += 1
        if it % opts.log_every == 0:
            watch.check()
            values = {key: v.item() for key, v in step_sums.items()}  # one sync per log interval
            value = values.pop("loss")
            rate = images / (time.perf_counter() - t_start)
            runlog.write("train", it, epoch=epoch, loss=value, lr=step.lr, images_per_s=rate,
                         **task.log_stats(step, values, value, epoch), **values)  # fmt: skip
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{step.lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(1)
        if save_checkpoint is not None and opts.save_every_steps and (it + 1) % opts.save_every_steps == 0:
            if i + 1 < opts.steps_per_epoch:  # the end of the epoch has a checkpoint of its own
                watch.check()  # never a checkpoint from a non-finite state
                save_checkpoint(i + 1)
    bar.close()
    watch.check()
    stats = {k: dist.all_reduce_mean(v / max(n, 1)).item() for k, v in sums.items()}
    stats.setdefault("loss", 0.0)
    stats.update(task.epoch_stats())
    skipped, steps = (int(v) for v in dist.all_reduce_sum(torch.tensor([skipped, n], device=device)).tolist())
    if skipped and not steps:  # not an epoch "done" with loss 0: there was nothing to train on
        raise CorruptImageError(f"epoch {epoch}: no training image could be decoded ({skipped} skipped, each named in "
                                "a warning above); check the files of data.train")  # fmt: skip
    if skipped:
        log.warning("epoch %d: skipped %d undecodable training images (see the warnings above)", epoch, skipped)
    stats.update(skipped_images=skipped, nonfinite_steps=nonfinite,
                 images_per_s=images / (time.perf_counter() - t_start))  # fmt: skip
    return stats


def _batch_size(batch: tuple) -> int:
    first = batch[0]
    return (first[0] if isinstance(first, (list, tuple)) else first).shape[0]


class _NonFiniteWatch:
    """The first non-finite step of this rank, recorded on the device without a host sync (the hot loop keeps the
    GPU queue full); `check()` decides on all ranks together and raises NonFiniteLossError naming that step and
    every rank's loss terms there. Called at log intervals, before each checkpoint and at the end of the epoch, so a
    non-finite state is never saved; the steps between the bad one and the check are lost with it."""

    def __init__(self, stage: str, epoch: int, device: torch.device) -> None:
        self.stage, self.epoch = stage, epoch
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # iteration of the first bad step, or -1
        self.values: torch.Tensor | None = None  # the loss terms at that step
        self.last: torch.Tensor | None = None  # the loss terms at the latest step
        self.names: list[str] = []

    def record(self, it: int, terms: dict[str, torch.Tensor]) -> None:
        row = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if self.values is None:
            self.values, self.names = torch.zeros_like(row), list(terms)
        new = torch.logical_not(torch.isfinite(row).all()) & (self.first < 0)
        self.values = torch.where(new, row, self.values)
        self.first = torch.where(new, torch.full_like(self.first, it), self.first)
        self.last = row

    def check(self) -> None:
        if not bool(dist.all_reduce_sum((self.first >= 0).float().reshape(1)).item()):
            return
        # every rank reports: its terms at its first bad step, or (all finite there) at its latest step, or nothing
        # when it recorded no step at all (every batch undecodable)
        first = int(self.first)
        values = self.values if first >= 0 else self.last
        rows = dist.all_gather_object((first, [] if values is None else values.tolist(), self.names))
        it = min(f for f, _, _ in rows if f >= 0)
        terms = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in zip(names, vals))
                          + ("" if f in (-1, it) else f" (at iteration {f})")
                          for r, (f, vals, names) in enumerate(rows))  # fmt: skip
        raise NonFiniteLossError(f"non-finite {self.stage} loss at epoch {self.epoch}, iteration {it} ({terms})")


def _any_nonfinite(loss: torch.Tensor) -> bool:
    """Whether the loss is NaN or infinite on any rank: one decision for all of them, so that they skip a step or
    stop together (a rank that skipped the backward pass alone would leave the others waiting in DDP's all-reduce)."""
    bad = torch.logical_not(torch.isfinite(loss.detach())).float().reshape(1)
    return bool(dist.all_reduce_sum(bad).item())


def _skip_or_raise(
    stage: str,
    epoch: int,
    it: int,
    terms: dict[str, torch.Tensor],
    skipped: int,
    budget: int,
    buffers: list[torch.Tensor],
    saved: list[torch.Tensor] | None,
) -> None:
    """After a non-finite loss (on any rank): put back the buffers the forward pass changed and skip the step, or
    raise NonFiniteLossError when `budget` steps have been skipped already. Every rank calls this together."""
    row = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).reshape(1, -1)
    rows = dist.all_gather_variable(row)
    values = "; ".join(
        f"rank {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in zip(terms, t[0].tolist())) for r, t in enumerate(rows)
    )
    where = f"non-finite {stage} loss at epoch {epoch}, iteration {it} ({values})"
    if skipped >= budget:
        raise NonFiniteLossError(where)
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)
    log.warning("%s: step skipped, no update (%d more tolerated)", where, budget - skipped - 1)
