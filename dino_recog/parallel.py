"""How a task's trainable networks are spread over the processes: DDP replicas or FSDP2 shards (`run.parallel`),
and the full (unsharded) state dicts that checkpoints and exports hold either way.

The process group itself, collectives and logging are in `distributed`; every function here also works in a plain
single process, where nothing is wrapped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as tdist

from . import distributed as D
from .distributed import is_dtensor

__all__ = [
    "ddp_module",
    "full_copy",
    "full_optimizer_state",
    "fsdp_units",
    "full_state_dict",
    "is_sharded",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "no_sync",
    "reshard",
    "unwrap",
    "wrap",
    "wrap_ddp",
    "wrap_fsdp",
]


def wrap(task: torch.nn.Module, device: torch.device, parallel: str = "ddp", amp: str = "fp32",
         cpu_offload: bool = False) -> torch.nn.Module:  # fmt: skip
    """`wrap_ddp` or `wrap_fsdp` as `run.parallel` says (`amp` and `cpu_offload` only matter to FSDP)."""
    if parallel == "fsdp":
        return wrap_fsdp(task, device, amp, cpu_offload)
    if parallel != "ddp":
        raise ValueError(f"run.parallel: {parallel!r}; expected ddp or fsdp")
    return wrap_ddp(task, device)


def _start_from_rank0(task: torch.nn.Module, device: torch.device) -> None:
    """Every rank takes rank 0's parameters and buffers (teachers and loss weights too, which DDP would not
    broadcast; not the `task.shards()`, which are per rank), and BatchNorm becomes SyncBatchNorm on CUDA."""
    if device.type == "cuda" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in task.modules()):
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)  # replaces the BatchNorm children in place
    # a task's `shards()` (Partial FC classifiers) differ by rank by design, in shape too
    own = {id(t) for m in getattr(task, "shards", dict)().values() for t in [*m.parameters(), *m.buffers()]}
    with torch.no_grad():
        for t in [*task.parameters(), *task.buffers()]:
            if id(t) not in own:
                tdist.broadcast(t.data, 0)


def wrap_ddp(task: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Prepare a task for several processes: every rank starts from rank 0's state (teachers and loss weights too,
    which DDP would not broadcast; not the `task.shards()`, which are per rank), BatchNorm becomes SyncBatchNorm on
    CUDA (statistics over the global batch, as the official code does; it needs CUDA), and `task.trainable` gets a
    DistributedDataParallel wrapper that
    `ddp_module(task)` returns. The wrapper is not a submodule: the task's parameter names and state stay those of
    the plain modules, and the teachers stay outside DDP. Nothing happens in a single process.

    Returns:
        The task.
    """
    if D.get_world_size() == 1:
        return task
    _start_from_rank0(task, device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        task.trainable, device_ids=[device.index] if device.type == "cuda" else None
    )
    task.__dict__["_ddp"] = ddp  # a plain attribute: not registered as a submodule
    return task


def _mixed_precision(device: torch.device, amp: str):
    """FSDP's policy for `run.amp`, as `engine.autocast_context` decides: bf16 where supported, else fp16, for the
    gathered weights in forward and backward, gradients reduced in fp32; None (all fp32) for fp32 and on the CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda" or amp == "fp32":
        return None
    dtype = torch.bfloat16 if amp == "bf16" and torch.cuda.is_bf16_supported() else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def fsdp_units(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The pieces `wrap_fsdp` shards apart inside a network, each gathered only while it runs: a ViT's transformer
    blocks (`backbone.blocks`), a ResNet's residual stages (`backbone.layer1` .. `layer4`); none for another
    backbone (the network is then gathered whole at each forward)."""
    backbone = getattr(net, "backbone", None)
    if backbone is None and hasattr(net, "model"):  # stage 2's ReIDNet: the model, then the loss terms
        backbone = getattr(net.model, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    if blocks is not None:
        return list(blocks)
    return [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]


def wrap_fsdp(task: torch.nn.Module, device: torch.device, amp: str = "fp32",
              cpu_offload: bool = False) -> torch.nn.Module:  # fmt: skip
    """Shard a task over the processes with FSDP2 (`fully_shard`), for models too large to replicate.

    Every rank first takes rank 0's state (as `wrap_ddp`); then each network of `task.fsdp_roots()` (stage 1: the
    student and the EMA teacher; stage 2: the model with the loss terms' weights) is sharded per `fsdp_units` (a
    ViT's blocks, a ResNet's stages) and then as a whole (the patch embedding or stem, norms, heads, classifiers). The
    teacher is sharded exactly like the student, so each rank holds the same slice of both and the EMA update
    (`update_teacher`) is local to that slice, with no communication; it reshards after its forward pass (it has no
    backward pass that would need the gathered weights again). The parameters become DTensors with their full
    shapes and names; `full_state_dict` / `load_full_state_dict` read and write them as plain tensors, so
    checkpoints and exports are those of a DDP run. `ddp_module(task)` is then the sharded `task.trainable` itself,
    whose buffers (BatchNorm statistics) rank 0 broadcasts before each training forward, as DDP does. Nothing
    happens in a single process.

    Args:
        amp: `run.amp`: bf16 / fp16 weights in forward and backward with fp32 gradient reduction (CUDA only).
        cpu_offload: keep the sharded weights, their gradients and the optimiser state in CPU memory.

    Returns:
        The task.
    """
    if D.get_world_size() == 1:
        return task
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    roots = getattr(task, "fsdp_roots", None)
    if roots is None:
        raise ValueError(f"run.parallel: fsdp is not supported for the {getattr(task, 'name', 'this')} stage; "
                         "use run.parallel=ddp")  # fmt: skip
    _start_from_rank0(task, device)
    options: dict = {}
    policy = _mixed_precision(device, amp)
    if policy is not None:
        options["mp_policy"] = policy
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    nets = list(roots())
    for net in nets:
        for unit in fsdp_units(net):
            fully_shard(unit, **options)
        fully_shard(net, **options)
        if net is not task.trainable:  # a teacher: nothing to keep gathered for
            net.set_reshard_after_forward(True, recurse=False)
    buffers = _BufferBroadcast()
    task.trainable.register_forward_pre_hook(buffers)
    task.__dict__.update(_fsdp_roots=nets, _fsdp_buffers=buffers)  # what no_sync and reshard act on
    return task


class _BufferBroadcast:
    """A forward pre-hook of the sharded network: rank 0's buffers everywhere before a training forward, when DDP's
    `broadcast_buffers` would: unless the previous training forward ran under `no_sync` (DDP syncs buffers after a
    forward that syncs gradients only), so BatchNorm's running statistics evolve on every rank as under DDP."""

    def __init__(self) -> None:
        self.next, self.grad_sync = True, True  # broadcast at the next forward; gradients reduced (not no_sync)

    def __call__(self, module: torch.nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self.next:
            with torch.no_grad():
                for b in module.buffers():
                    tdist.broadcast(b, 0)
        self.next = self.grad_sync


def ddp_module(task: torch.nn.Module) -> torch.nn.Module:
    """What the task's training forward calls: the DDP wrapper of `task.trainable`, or the module itself (also when
    sharded by `wrap_fsdp`, whose hooks live on the module)."""
    return task.__dict__.get("_ddp") or task.trainable


def no_sync(task: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Around the forward and backward passes of a micro-batch that does not end an optimiser step (gradient
    accumulation): DDP's `no_sync` on the task's wrapper, or FSDP2's `set_requires_gradient_sync(False)` on its
    roots (the gradients accumulate unsharded until the last micro-batch reduce-scatters them), so the gradient
    communication happens once per step; nothing without a wrapper."""
    ddp = task.__dict__.get("_ddp")
    if ddp is not None:
        return ddp.no_sync()
    roots = task.__dict__.get("_fsdp_roots")
    return _fsdp_no_sync(roots, task.__dict__["_fsdp_buffers"]) if roots else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(roots: list, buffers: _BufferBroadcast):
    for net in roots:
        net.set_requires_gradient_sync(False)
    buffers.grad_sync = False
    try:
        yield
    finally:
        for net in roots:
            net.set_requires_gradient_sync(True)
        buffers.grad_sync = True


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def reshard(task: torch.nn.Module) -> None:
    """Put the FSDP roots of a task back to their shards. FSDP2 keeps a root gathered after its forward pass until
    its backward (student) or the EMA update (teacher) reshards it; a step dropped after the forward pass (a
    non-finite loss) has neither, and would leave full tensors where the optimiser, clipping and checkpoints expect
    the shards. Nothing for a task that is not sharded."""
    for net in task.__dict__.get("_fsdp_roots", ()):
        net.reshard()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds parameters sharded by `wrap_fsdp` (DTensors)."""
    return any(is_dtensor(p) for p in module.parameters())


def _full_options(every_rank: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors, gathered one by one: to rank 0's CPU memory (the other ranks get nothing), or to every rank
    return StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)


def full_state_dict(module: torch.nn.Module, every_rank: bool = False) -> dict:
    """`module.state_dict()` with plain full tensors: for a sharded module gathered to rank 0's CPU memory (an empty
    dict on the other ranks; a collective: every rank calls it), or with `every_rank` to every rank's device, else
    the module's own state dict.

    What checkpoints and exports hold, so that a sharded run writes the files a DDP run writes.
    """
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(every_rank))


def full_copy(module: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`module` itself, or for a sharded one a plain copy on every rank (a collective): `build()` loaded with the
    gathered full state (buffers as this rank has them). What evaluation and exports use: evaluation runs a
    different number of batches per rank, which a sharded forward (an all-gather per unit) cannot."""
    if not is_sharded(module):
        return module
    with torch.random.fork_rng(devices=[]):  # its initial weights, overwritten below, leave the run's stream alone
        copy = build().to(next(module.parameters()).device)
    copy.load_state_dict(full_state_dict(module, every_rank=True))
    return copy.train(module.training)


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """`module.load_state_dict(state)` (strict) from plain full tensors; a sharded module keeps this rank's slice of
    each. Every rank calls it with the whole state (each reads the checkpoint)."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def _param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names in `module` of the optimiser's parameters, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with plain full tensors, numbered as torch numbers them (the layout a DDP run saves,
    so either kind of run resumes from the other's checkpoint). For the parameters of a sharded `module` gathered to
    rank 0 (an empty dict on the other ranks; a collective: every rank calls it)."""
    if not any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer, options=_full_options())
    if not D.is_main_process():
        return {}
    # torch names the parameters here (their names in `module`); number them back in the optimiser's order
    index = {name: i for i, name in enumerate(_param_names(module, optimizer))}
    return {
        "state": {index[name]: value for name, value in osd["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in osd["param_groups"]],
    }


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` from what `full_optimizer_state` (or a DDP run) saved; for a sharded
    `module` each rank keeps its slice. Every rank calls it with the whole state."""
    if not any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if len(state["param_groups"]) != len(optimizer.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(state["param_groups"], optimizer.param_groups)
    ):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                         "group")  # the message torch's load_state_dict gives for the same mismatch  # fmt: skip
    names = _param_names(module, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**s, "params": [names[i] for i in s["params"]]} for s in state["param_groups"]],
    }
    # not strict: a parameter that had no gradient yet has no state (DINO's frozen last layer in the first epoch);
    # torch then gives it a state of its own (a step of 1, zero moments), which a DDP resume would not: removed
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if i not in state["state"]:
            optimizer.state.pop(p, None)
