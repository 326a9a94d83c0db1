"""What a training run carries from epoch to epoch, the same for every stage: where it resumes, what a checkpoint
holds, how each epoch is seeded, and the last good checkpoint to name when it stops.

A checkpoint is `{part: state_dict for part in task.parts()}` (a ModuleDict part as a dict of state dicts), the
optimisers' and the gradient scaler's states, the position (`epoch`, `step_in_epoch`, `iteration`), every rank's RNG
streams (for an exact mid-epoch resume), the resolved config, and what the script adds (`extra`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import config as C
from . import distributed as dist
from . import parallel, sharded
from .cli import eval_options
from .config.diff import changed_keys, format_changes, unsafe_changes
from .engine import LoopOptions, NonFiniteLossError, train_one_epoch
from .evaluation import evaluate_query_gallery
from .runlog import RunLog, fmt_metrics

__all__ = ["TrainingRun", "optimizer_steps"]

log = logging.getLogger(__name__)


class TrainingRun:
    """The checkpoint cycle of one run of a task.

    Args:
        cfg: the stage's config (`run.*`, `train.epochs`, `train.clip_grad`, `train.accumulate_steps` are read).
        task: DinoTask / ReIDTask (possibly with its DDP wrapper).
        optimizers: checkpoint key -> optimiser; the first is the main one (scheduled, clipped).
        steps_per_epoch: iterations (optimiser steps) of a whole epoch: `optimizer_steps(len(loader), ...)`.
        keep_every: also keep every end-of-epoch checkpoint whose epoch is a multiple of this (0: none).
        extra: what the script adds to every checkpoint (called at each save).
        sharded: the optimisers of the task's `shards()` (per rank, like them); they follow the main schedule.
        global_batch: samples per optimiser step over all processes; a run resumed on another number of processes
            maps the position in the epoch by the samples already trained on.
        lr_at: global batch -> peak lr, where the stage scales the lr with the batch (for the resume's log).

    The task's `shards()` (state that differs by rank: Partial FC classifiers) and the `sharded` optimisers are saved
    by every rank into `shard_path(checkpoint, rank, world)`, all before rank 0 writes the checkpoint itself, so a
    checkpoint that exists has its shards; such a run resumes on the same number of processes.

    `run.checkpoint_format` sharded (auto: under FSDP with several processes) writes `checkpoint_....dcp` directories
    instead (`sharded.py`: every rank its shards, no gather); either format resumes on any number of processes.
    """

    def __init__(self, cfg, task: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], steps_per_epoch: int,
                 keep_every: int = 0, extra: Callable[[], dict] | None = None,
                 sharded: tuple[str, ...] = (), global_batch: int = 0,
                 lr_at: Callable[[int], float] | None = None) -> None:  # fmt: skip
        main = next(iter(optimizers))
        # the main optimiser, then the sharded ones (both scheduled: LoopOptions.scheduled), then the others
        order = [main, *sharded, *(k for k in optimizers if k != main and k not in sharded)]
        self.cfg, self.task, self.optimizers = cfg, task, {k: optimizers[k] for k in order}
        self.sharded = tuple(sharded)
        self.shards: dict[str, nn.Module] = getattr(task, "shards", dict)()
        self.out = Path(cfg.run.output_dir)
        self.steps_per_epoch, self.keep_every, self.extra = steps_per_epoch, keep_every, extra or dict
        device = next(task.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
        self.log = RunLog(self.out)
        self.start_epoch, self.start_step, self.rng, self.nonfinite = 0, 0, None, 0
        self.global_batch, self.lr_at, self.consumed = global_batch, lr_at, 0  # consumed: see _map_world_size
        self.last_saved: Path | None = None
        self.fingerprints: torch.Tensor | None = None

    # --- resume ------------------------------------------------------------------------------------------------------
    def resume(self) -> dict | None:
        """Continue from `run.resume` (auto: the newest usable checkpoint in the output directory): every part,
        optimiser and the scaler restored, the position and this rank's RNG streams taken.

        Returns:
            The checkpoint (for what the script stored in `extra`), or None when the run starts fresh.
        """
        parts = self.task.parts()
        required = [name for name, m in parts.items() if not isinstance(m, nn.ModuleDict)]  # a loss state may be empty
        found = ckpt.find_resume(self.cfg.run.resume, self.out, (*required, "optimizer", "epoch"))
        if found is None:
            self._save_config()
            return None
        path, state = found
        changes = changed_keys(state.get("config"), C.to_dict(self.cfg))
        try:  # the architecture first: its error lists each mismatched tensor, then the keys behind them
            if state.get("sharded"):  # every tensor, the optimisers' too, each rank its shards
                sharded.load_sharded(path, state, parts, self._dcp_optimizers())
            else:
                self._check_parts(parts, state, path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{e}\nconfig keys changed since that checkpoint: {format_changes(changes)}"
                                       if changes else str(e)) from None  # fmt: skip
        unsafe = unsafe_changes(changes)
        if unsafe and self.cfg.run.resume_changed != "allow":
            raise ckpt.CheckpointError(
                f"{path}: the config changed since this checkpoint in keys that change the schedule or the data order: "
                f"{format_changes(changes, unsafe)}; resume with the checkpoint's values, start another "
                "run.output_dir, or set run.resume_changed=allow to continue anyway"
            )
        for name, opt in self.optimizers.items():
            if state.get(name) and name not in self.sharded and not state.get("sharded"):
                parallel.load_full_optimizer_state(self.task.trainable, opt, state[name])
        self._load_shards(path, state)
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step, self.rng = ckpt.resume_point(state, path, dist.get_rank(),
                                                                        dist.get_world_size())  # fmt: skip
        self._map_world_size(state, path)
        self.nonfinite = int(state.get("nonfinite_steps", 0))  # the skip budget is one for the whole run
        self.last_saved = path
        log.info("resumed from %s at epoch %d, step %d", path, self.start_epoch, self.start_step)
        # Marks where the records of the timeline that ended in a crash stop being valid (runlog.read_jsonl).
        self.log.write("resume", self.start_epoch * self.steps_per_epoch + self.start_step, epoch=self.start_epoch)
        if changes:
            log.warning("resumed with a changed config: %s", format_changes(changes))
        self._save_config()
        return state

    def _map_world_size(self, state: dict, path: Path) -> None:
        """A checkpoint written by another number of processes: say what changes, and continue a mid-epoch one after
        the samples of the epoch already trained on (consumed = steps x the old global batch), at step consumed //
        new global batch of the epoch, which is where the schedule (a function of the step) continues."""
        rngs = state.get("rng")
        old = state.get("world_size") or (len(rngs) if isinstance(rngs, list) else None)
        new = dist.get_world_size()
        if old is None or old == new:
            return
        before, after = int(state.get("global_batch", 0)), self.global_batch
        lr = (f"the peak lr follows the linear scaling rule: {self.lr_at(before):g} -> {self.lr_at(after):g}"
              if self.lr_at and before else "the lr is not scaled with the batch in this stage: unchanged")  # fmt: skip
        where = f"epoch {self.start_epoch}"
        if self.start_step and before and after:
            self.consumed = self.start_step * before
            self.start_step = self.consumed // after
            where += (f", step {self.start_step} of {self.steps_per_epoch} (after the {self.consumed} samples of the "
                      "epoch already trained on)")  # fmt: skip
        log.info("%s was written by %d processes (global batch %s), this run has %d (global batch %d): it continues "
                 "at %s; %s", path, old, before or "unknown", new, after, where, lr)  # fmt: skip

    def _dcp_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """The optimisers a sharded checkpoint holds (not those of the per-rank `shards()`), with the task: the
        module their parameters are named in."""
        return {name: (self.task, opt) for name, opt in self.optimizers.items() if name not in self.sharded}

    def _load_shards(self, path: Path, state: dict) -> None:
        """This rank's shards and their optimisers, from the files beside checkpoint `path`."""
        written, world = state.get("shard_world_size"), dist.get_world_size()
        if not self.shards:
            if written:
                names = ", ".join(state.get("shard_names", []))
                raise ckpt.CheckpointError(f"{path}: has classifiers sharded over {written} processes ({names}), "
                                           "which this run does not have; resume with loss.partial_fc as it was")
            return
        if not written:
            raise ckpt.CheckpointError(f"{path}: holds no sharded classifier ({', '.join(self.shards)}); it was "
                                       "written without loss.partial_fc: resume with the checkpoint's loss.partial_fc")
        if written != world:
            raise ckpt.CheckpointError(
                f"{path}: its sharded classifiers ({', '.join(self.shards)}) were written by {written} processes, this "
                f"run has {world}; a Partial FC run resumes on the number of processes that wrote it: {written}"
            )
        shard_file = ckpt.shard_path(path, dist.get_rank(), world)
        shard = ckpt.load_checkpoint(shard_file)  # a missing or unreadable one names itself
        for name, module in self.shards.items():
            if name not in shard.get("shards", {}):
                raise ckpt.CheckpointError(f"{shard_file}: lacks the {name} shard; expected {', '.join(self.shards)}")
            ckpt.check_state_dict(module, shard["shards"][name], shard_file, f"{name} shard")
            module.load_state_dict(shard["shards"][name])
        for name in self.sharded:
            self.optimizers[name].load_state_dict(shard[name])

    @staticmethod
    def _check_parts(parts: Mapping[str, nn.Module], state: dict, path: Path) -> None:
        for name, module in parts.items():
            if isinstance(module, nn.ModuleDict):
                for key, sd in state.get(name, {}).items():
                    if key not in module:
                        raise ckpt.CheckpointError(f"{path}: has a {key} loss, which the config does not switch on")
                    ckpt.check_state_dict(module[key], sd, path, f"{key} loss")
            else:
                ckpt.check_state_dict(module, state[name], path, "model" if name == "state_dict" else name)

    def _save_config(self) -> None:
        """OUTPUT/config.yaml, once the run is known to start: a refused start leaves the run's file as it was."""
        dist.run_on_main(lambda: C.save(self.cfg, self.out / "config.yaml"))

    # --- save --------------------------------------------------------------------------------------------------------
    def save(self, epochs_done: int, step_in_epoch: int = 0) -> Path:
        """Checkpoint after `epochs_done` epochs and `step_in_epoch` steps of the next; every rank calls it."""
        rngs = dist.all_gather_object(ckpt.rng_state())  # each rank's streams, for an exact mid-epoch resume
        path = self.out / ckpt.checkpoint_name(epochs_done, step_in_epoch)
        if self._sharded_format():
            path = path.with_suffix(sharded.SUFFIX)
            return self._saved(path, lambda: self._save_sharded(path, self._position(epochs_done, step_in_epoch, rngs)))

        # gathered on every rank (FSDP's shards are collectives); plain state dicts otherwise
        full = parallel.full_state_dict
        parts = {name: ({k: full(m) for k, m in module.items()} if isinstance(module, nn.ModuleDict) else full(module))
                 for name, module in self.task.parts().items()}  # fmt: skip
        optims = {name: parallel.full_optimizer_state(self.task.trainable, opt)
                  for name, opt in self.optimizers.items() if name not in self.sharded}  # fmt: skip

        def write() -> None:
            ckpt.save_checkpoint({**parts, **optims, **self._position(epochs_done, step_in_epoch, rngs)}, path)
            ckpt.prune_checkpoints(self.out, self.cfg.run.keep_last, self.keep_every)

        def save_all() -> None:
            if self.shards:
                self._save_shards(path)
            dist.run_on_main(write)  # a failed write (disk full) stops every rank, not only rank 0

        return self._saved(path, save_all)

    def _sharded_format(self) -> bool:
        fmt = self.cfg.run.checkpoint_format
        return fmt == "sharded" or (fmt == "auto" and any(parallel.is_sharded(m) for m in self.task.parts().values()))

    def _position(self, epochs_done: int, step_in_epoch: int, rngs: list) -> dict:
        """What a checkpoint holds besides the tensors of the parts and optimisers."""
        state: dict = {}
        if self.shards:
            state.update(shard_world_size=dist.get_world_size(), shard_names=list(self.shards))
        state.update(scaler=self.scaler.state_dict(), epoch=epochs_done, step_in_epoch=step_in_epoch,
                     iteration=epochs_done * self.steps_per_epoch + step_in_epoch, nonfinite_steps=self.nonfinite,
                     world_size=dist.get_world_size(), global_batch=self.global_batch, config=C.to_dict(self.cfg),
                     rng=rngs, **self.extra())  # fmt: skip
        if self.fingerprints is not None and step_in_epoch == 0:
            state["fingerprints"] = self.fingerprints.cpu()
        return state

    def _save_sharded(self, path: Path, state: dict) -> None:
        if self.shards:
            self._save_shards(path)
        sharded.save_sharded(path, self.task.parts(), self._dcp_optimizers(), state)  # every rank its shards
        dist.run_on_main(lambda: ckpt.prune_checkpoints(self.out, self.cfg.run.keep_last, self.keep_every))

    def _saved(self, path: Path, save: Callable[[], None]) -> Path:
        """Run `save`; a failure becomes one line that says what to resume from once there is space."""
        try:
            save()
        except OSError as e:
            last = self.last_saved or "none (none written yet)"
            raise OSError(e.errno, f"{e.strerror or e}; the run stopped; last good checkpoint: {last}") from e
        self.last_saved = path
        return path

    def _save_shards(self, path: Path) -> None:
        """Every rank writes its shard file; if one fails, every rank raises with its message (and rank 0 writes no
        checkpoint that would lack it)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        state = {name: self.optimizers[name].state_dict() for name in self.sharded}
        state.update(shards={name: m.state_dict() for name, m in self.shards.items()}, rank=rank, world_size=world)
        error = None
        try:
            ckpt.save_checkpoint(state, ckpt.shard_path(path, rank, world))
        except Exception as e:  # raised below on every rank
            error = f"rank {rank}: {type(e).__name__}: {e}"
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise OSError(f"{path}: not written, a shard failed: {'; '.join(errors)}")

    # --- one epoch ---------------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, batches, loader) -> int:
        """Seed the epoch and position the batches; returns the step it starts from (> 0 only when resuming).

        Each sample's augmentation has its own seed (SeededBatches); the processes' streams (stochastic depth, mask
        sampling) restart from (seed, epoch, rank) every epoch, or continue from a mid-epoch checkpoint's states.
        """
        first = self.start_step if epoch == self.start_epoch else 0
        # the loader's batches are micro-batches; `consumed` when resuming from a run on another number of processes
        consumed = self.consumed if epoch == self.start_epoch else 0
        batches.set_epoch(epoch, first * self.cfg.train.accumulate_steps, consumed)
        seed = self.cfg.run.seed + 1000 * epoch
        dist.seed_everything(seed)
        if getattr(loader, "generator", None) is not None:  # the workers' base seed, apart from the global stream
            loader.generator.manual_seed(seed + dist.get_rank())
        if first and self.rng is not None:
            ckpt.set_rng_state(self.rng)
        return first

    def train_epoch(self, epoch: int, first: int, loader, schedule) -> dict[str, float]:
        """`engine.train_one_epoch`, mid-epoch checkpoints included; then the epoch's record, and the check that
        the replicated state (teachers, centres, loss weights) is identical on every rank."""
        r = self.cfg.run
        opts = LoopOptions(self.steps_per_epoch, r.amp, self.cfg.train.clip_grad, r.log_every,
                           r.skip_nonfinite_steps - self.nonfinite, r.save_every_steps,
                           scheduled=1 + len(self.sharded),
                           accumulate_steps=self.cfg.train.accumulate_steps)  # fmt: skip
        self.fingerprints = None
        try:
            stats = train_one_epoch(self.task, loader, list(self.optimizers.values()), self.scaler, schedule, epoch,
                                    self.log, opts, first, lambda step: self.save(epoch, step))  # fmt: skip
        except NonFiniteLossError as e:
            raise NonFiniteLossError(stopped_message(e, r.skip_nonfinite_steps, self.last_saved)) from None
        self.nonfinite += stats["nonfinite_steps"]
        done = epoch + 1
        log.info("epoch %d/%d: %s", done, self.cfg.train.epochs, fmt_metrics(stats))
        self.log.write("epoch", done * self.steps_per_epoch, epoch=done, **stats)
        self.fingerprints = dist.check_replicated(self.task.parts(), f"epoch {done}")
        return stats

    def evaluate_reid(self, model: nn.Module, eval_sets: tuple, device: torch.device,
                      epoch: int | None) -> dict[str, float]:  # fmt: skip
        """Query/gallery evaluation of a re-identification stage (`eval.*`, `data.test_batch_size`), logged as the
        `eval` record of `epoch` (0: before training; None: not logged)."""
        c = self.cfg
        metrics = evaluate_query_gallery(model, *eval_sets, device, c.eval.metric, c.eval.flip, c.data.test_batch_size,
                                         c.data.num_workers, **eval_options(c.eval))  # fmt: skip
        if epoch is not None:
            log.info("epoch %d%s: %s", epoch, " (before training)" if epoch == 0 else "", fmt_metrics(metrics))
            self.log.write("eval", epoch * self.steps_per_epoch, epoch=epoch, **metrics)
        return metrics

    def end_epoch(self, done: int, evaluate: Callable[[int, nn.Module], dict], best: dict,
                  model: Callable[[], nn.Module], metrics: dict | None) -> tuple[dict | None, dict]:  # fmt: skip
        """After epoch `done` (1-based) of a re-identification stage: `evaluate(done, model())` every `eval.eval_every`
        epochs and after the last, `best.pth` when its mAP beats `best`'s (updated in place), then the checkpoint.
        Every rank calls it (`model()` may be a collective: FSDP gathers a plain copy of the sharded model).

        Returns:
            The latest metrics (`metrics` when not evaluated) and `best`.
        """
        e = self.cfg.eval
        if (e.eval_every and done % e.eval_every == 0) or done == self.cfg.train.epochs:
            evaluated = model()
            metrics = evaluate(done, evaluated)
            if metrics["mAP"] > best["mAP"]:  # in place: the checkpoint's `extra` reads the script's dict
                best.clear()
                best.update(epoch=done, **metrics)
                dist.run_on_main(lambda: ckpt.save_reid_model(evaluated, self.out / "best.pth"))
            del evaluated
        self.save(done)
        dist.barrier()
        return metrics, best

    def close(self) -> None:
        self.log.close()


def optimizer_steps(batches: int, accumulate_steps: int) -> int:
    """Optimiser steps of an epoch of `batches` batches per process, `accumulate_steps` of them per step; the last
    `batches % accumulate_steps` batches of an epoch are not trained on (like a sampler's drop_last).

    Raises:
        ValueError: an epoch holds fewer batches than one step.
    """
    if batches < accumulate_steps:
        raise ValueError(f"train.accumulate_steps: {accumulate_steps} is more than the {batches} batches of an epoch "
                         f"on each process; expected at most {batches}")  # fmt: skip
    if batches % accumulate_steps:
        log.info("train.accumulate_steps %d: the last %d of the %d batches of each epoch are not trained on",
                 accumulate_steps, batches % accumulate_steps, batches)  # fmt: skip
    return batches // accumulate_steps


def stopped_message(error: Exception, tolerated: int, last_saved: Path | None) -> str:
    """What a run that stops at a non-finite loss says: the engine's where and loss terms, and what to resume from."""
    return (
        f"{error}; the run stopped (run.skip_nonfinite_steps={tolerated} used up) and wrote nothing from this state; "
        f"last good checkpoint: {last_saved or 'none (none written yet)'}"
    )
