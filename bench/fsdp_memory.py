"""Memory per process and step time of stage 1 under DDP and FSDP (`run.parallel`), on the CPU or a GPU.

    bash train.sh cpu 2 bench/fsdp_memory.py --arch vit_base --parallel ddp     # one configuration per launch
    bash train.sh cpu 2 bench/fsdp_memory.py --arch vit_large --parallel fsdp
    bash train.sh 0,1 2 bench/fsdp_memory.py --arch vit_large --parallel fsdp --batch 64

Each rank builds what train_dino.main builds (DINO v1 task from cfg_dino.yaml's defaults: ViT-B/16 or ViT-L/16, the
65536-prototype head, AdamW; 2 x 256x128 global + 8 x 128x64 local crops of random pixels), wraps it as
`run.parallel` says and runs `--steps` steps of the real `engine.train_one_epoch`, the first one untimed. It reports,
per rank:
- state: the bytes of the tensors this rank holds after a step: parameters and buffers of student and teacher (a
  sharded parameter counts its local slice), gradients, optimiser state. FSDP's target: DDP's / world size, plus
  about one gathered block;
- one block: the bytes of one transformer block's parameters, gradients and AdamW moments (what one unit adds);
- peak: on a GPU, torch's peak allocation during the timed steps; on the CPU, the process's peak resident memory
  (ru_maxrss: torch's libraries and the allocator's cache included, so only its difference between runs is the model);
- step: seconds per timed step.
Rank 0 prints one JSON line with every rank's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_recog import config as C  # noqa: E402
from dino_recog import distributed as dist  # noqa: E402
from dino_recog import parallel  # noqa: E402
from dino_recog.engine import LoopOptions, train_one_epoch  # noqa: E402
from dino_recog.optim import build_optimizer  # noqa: E402
from dino_recog.runlog import RunLog  # noqa: E402
from dino_recog.tasks import build_dino_task, dino_schedule  # noqa: E402

# ViT-L/16 is ViT-B/16 widened and deepened (the config names the three architectures up to base)
ARCHS = {
    "vit_base": ["model.arch=vit_base"],
    "vit_large": ["model.arch=vit_base", "model.depth=24", "model.embed_dim=1024", "model.num_heads=16"],
}


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local slice)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(task: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, buffers, gradients and optimiser state held by this rank."""
    params = list(task.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return local_bytes([*params, *task.buffers(), *(p.grad for p in params), *moments])


def block_bytes(task: torch.nn.Module) -> int:
    """One student block's parameters, gradients and two AdamW moments, gathered (4 copies of its weights)."""
    return 4 * sum(p.numel() * p.element_size() for p in task.student.backbone.blocks[0].parameters())


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=list(ARCHS), default="vit_base")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--batch", type=int, default=1, help="images per process")
    p.add_argument("--steps", type=int, default=2, help="steps, the first untimed")
    p.add_argument("--amp", default="fp32", help="run.amp (bf16 / fp16 act on a GPU only)")
    args = p.parse_args()

    crops_cfg = ["crops.global_crops_size=[256,128]", "crops.local_crops_size=[128,64]", "crops.local_crops_number=8"]
    overrides = [*ARCHS[args.arch], *crops_cfg, f"run.parallel={args.parallel}", f"run.amp={args.amp}",
                 f"data.batch_size_per_gpu={args.batch}", "run.log_every=1000000000", "eval.eval_every=0"]  # fmt: skip
    cfg = C.load(ROOT / "cfg_dino.yaml", overrides, C.DinoConfig)
    with dist.session("auto") as device:
        torch.manual_seed(0)
        task = build_dino_task(cfg).to(device)
        parallel.wrap(task, device, cfg.run.parallel, cfg.run.amp, cfg.run.fsdp_cpu_offload)
        t = cfg.train
        optimizer = build_optimizer(t.optimizer, task.param_groups(), 0.0, t.weight_decay, t.momentum,
                                    cfg.run.fused_optimizer)  # fmt: skip
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
        g = torch.Generator().manual_seed(dist.get_rank())
        crops = [torch.randn(args.batch, 3, 256, 128, generator=g) for _ in range(2)]
        crops += [torch.randn(args.batch, 3, 128, 64, generator=g) for _ in range(8)]
        batch = ((crops, None, None, None), 0)
        schedule = dino_schedule(cfg, 1)
        opts = LoopOptions(1, cfg.run.amp, t.clip_grad, cfg.run.log_every)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            runlog = RunLog(Path(tmp))
            for step in range(args.steps):
                if step == 1 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                dist.barrier()
                t0 = time.perf_counter()
                train_one_epoch(task, [batch], optimizer, scaler, schedule, step, runlog, opts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            runlog.close()
        row = {"rank": dist.get_rank(), "state_gib": state_bytes(task, optimizer) / 2**30,
               "one_block_gib": block_bytes(task) / 2**30, "peak_gib": peak_bytes(device) / 2**30,
               "step_s": min(times[1:] or times)}  # fmt: skip
        rows = dist.all_gather_object(row)
        if dist.is_main_process():
            head = {"arch": args.arch, "parallel": args.parallel, "world_size": dist.get_world_size(),
                    "batch_per_rank": args.batch, "device": str(device)}  # fmt: skip
            print(json.dumps({**head, "ranks": rows}), flush=True)


if __name__ == "__main__":
    main()
