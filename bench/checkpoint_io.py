"""Time to write and to load a stage-1 training checkpoint, sharded (DCP directory) vs single file, on the CPU.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 bench/checkpoint_io.py --arch vit_large
    python -m torch.distributed.run --nproc-per-node 2 bench/checkpoint_io.py --arch vit_base --dir /tmp/ckio

The state is a real stage-1 run's: `build_dino_task` (student and EMA teacher with their DINO heads, out_dim 65536)
sharded with FSDP2 over the processes (`run.parallel: fsdp`), and AdamW with its two moments for every student
parameter. Both formats go through `TrainingRun.save` and `TrainingRun.resume`, the code a run uses: `full` gathers
every tensor to rank 0, which writes one file, and every rank reads that whole file back to keep its slice; `sharded`
has every rank write its own shards and read only what it needs. Times are wall-clock from the barrier before to the
barrier after, on rank 0; the checkpoint is deleted afterwards. ViT-L/16's state is about 5 GB: a full load holds
the whole file in every process, so `--write-only full` lets a run on a small machine leave that load out.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from dino_recog.optim import build_optimizer  # noqa: E402
from dino_recog.tasks import build_dino_task  # noqa: E402
from dino_recog.training import TrainingRun  # noqa: E402

ARCHS = {  # ViT-B/16 and ViT-L/16 as the config spells them; tiny: a smoke test of the script
    "tiny": ["model.arch=vit_tiny", "model.depth=2", "model.out_dim=256"],
    "vit_base": ["model.arch=vit_base"],
    "vit_large": ["model.arch=vit_base", "model.depth=24", "model.embed_dim=1024", "model.num_heads=16"],
}


def config(arch: str, out: Path, fmt: str, resume: str = "") -> C.DinoConfig:
    overrides = [*ARCHS[arch], f"run.output_dir={out}", "run.parallel=fsdp", f"run.checkpoint_format={fmt}",
                 "run.device=cpu", "run.amp=fp32", "eval.eval_every=0", f"run.resume={resume}",
                 "run.keep_last=1"]  # fmt: skip
    return C.load(ROOT / "cfg_dino.yaml", overrides, cls=C.DinoConfig)


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="vit_large")
    parser.add_argument("--formats", nargs="+", choices=["sharded", "full"], default=["sharded", "full"])
    parser.add_argument("--write-only", nargs="*", choices=["sharded", "full"], default=[],
                        help="formats whose load is not measured (a full load of ViT-L needs ~8 GB per process)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written (and deleted)")
    args = parser.parse_args()
    with dist.session("cpu") as device:
        made = tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir) if dist.is_main_process() else None
        base = Path(dist.broadcast_object(made))
        cfg = config(args.arch, base, "full")
        task = build_dino_task(cfg).to(device)
        parallel.wrap(task, device, "fsdp")
        optimizer = build_optimizer("adamw", task.param_groups(), 0.0, 0.04, 0.9)
        for p in task.trainable.parameters():  # AdamW's moments for every parameter (lr 0: the weights stay)
            p.grad = torch.zeros_like(p)
        optimizer.step()
        n = sum(p.numel() for p in task.trainable.parameters())
        if dist.is_main_process():
            print(f"{args.arch}: {n / 1e6:.1f} M student parameters, {dist.get_world_size()} processes, FSDP")
            print("| format | checkpoint | size GB | write s | load s |\n|---|---|---|---|---|", flush=True)
        try:
            for fmt in args.formats:
                out = base / fmt
                run = TrainingRun(config(args.arch, out, fmt), task, {"optimizer": optimizer}, 100)
                path: list[Path] = []
                write = timed(lambda r=run, p=path: p.append(r.save(1)))
                run.close()
                size = size_of(path[0]) if dist.is_main_process() else 0
                load = float("nan")
                if fmt not in args.write_only:
                    again = TrainingRun(config(args.arch, out, fmt, str(path[0])), task, {"optimizer": optimizer}, 100)
                    load = timed(again.resume)
                    again.close()
                if dist.is_main_process():  # row by row: a later format may run out of memory
                    print(f"| {fmt} | {path[0].name} | {size / 1e9:.2f} | {write:.1f} | {load:.1f} |", flush=True)
                dist.run_on_main(lambda o=out: shutil.rmtree(o))
        finally:
            dist.barrier()
            dist.run_on_main(lambda: shutil.rmtree(base, ignore_errors=True))


if __name__ == "__main__":
    main()
