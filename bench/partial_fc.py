"""Memory and time of the classifier step: the replicated CosFace classifier (DDP) beside Partial FC.

    python bench/partial_fc.py [--classes 10000 100000 430000] [--dim 768] [--batch 32] [--processes 2]
    python bench/partial_fc.py --gpu             # one process on the GPU: ViT-S/16 stage-2 step at 430 K classes

Each (classifier, classes) pair runs in fresh processes (`bash train.sh cpu N bench/partial_fc.py --one ...`), so the
peak resident memory of a rank (getrusage) is its own. A step is what stage 2 does for that loss on a batch of
embeddings that stand in for the backbone's: forward, backward (the DDP gradient all-reduce of the replicated one;
the embedding all-gather of Partial FC), SGD with momentum. Reported per rank: the state (weights + gradients +
momentum) from the tensors themselves, the peak RSS above the process's RSS before the classifier was built, and the
median step time of `--steps` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("replicated", "partial_fc@1.0", "partial_fc@0.1")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(variant: str, classes: int, dim: int, batch: int, steps: int, out: Path) -> None:
    """Run inside `train.sh`: one variant on every rank; rank 0 writes the result to `out`."""
    import torch

    from dino_recog import distributed as D
    from dino_recog.losses import CosFaceLoss, PartialFC

    with D.session("cpu"):
        base = _rss_mb()
        if variant == "replicated":
            loss_fn = CosFaceLoss(dim, classes)
            params = list(loss_fn.parameters())
            model = torch.nn.parallel.DistributedDataParallel(loss_fn) if D.get_world_size() > 1 else loss_fn
        else:
            model = loss_fn = PartialFC(dim, classes, "cosface", sample_rate=float(variant.split("@")[1]))
            params = list(loss_fn.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(D.get_rank())
        times = []
        for i in range(steps + 1):
            f = torch.randn(batch, dim, generator=g, requires_grad=True)
            y = torch.randint(0, classes, (batch,), generator=g)
            D.barrier()
            t = time.perf_counter()
            loss = model(f, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            D.barrier()
            if i:
                times.append(time.perf_counter() - t)
        state = sum(p.numel() * p.element_size() * 3 for p in params) / 2**20  # weight, gradient, momentum
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        rows = D.all_gather_object({"state_mb": state, "peak_rss_mb": peak, "step_s": statistics.median(times)})
        if D.is_main_process():
            out.write_text(json.dumps({"variant": variant, "classes": classes, "ranks": rows}))


def gpu(classes: int, steps: int) -> dict:
    """ViT-S/16 stage-2 step at 256x128, batch 64 (16 x 4), CE + triplet + CosFace with and without Partial FC."""
    import torch
    from dino_step import sync  # bench/ is the script's directory

    from dino_recog import config as C
    from dino_recog.tasks import build_reid_task

    device = torch.device("cuda")
    results = {}
    for name, extra in [("replicated", []), ("partial_fc@0.1", ["loss.partial_fc=true"])]:
        cfg = C.load(ROOT / "configs/market1501/vit_small_transreid_ssl.yaml",
                     ["model.pretrained=", "loss.cosface_weight=1", *extra], C.RecogConfig)  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        task = build_reid_task(cfg, classes).to(device)
        params = [p for g in task.param_groups() for p in g["params"]]
        params += [p for g in task.shard_param_groups() for p in g["params"]]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        x = torch.randn(64, 3, 256, 128, device=device)
        y = torch.randint(0, classes, (16,), device=device).repeat_interleave(4)
        times = []
        for i in range(steps + 3):
            sync(device)
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss, _ = task((x, y), None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t)
        results[name] = {"images_per_s": 64 / statistics.median(times),
                         "peak_gb": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
        del task, opt
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 430_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32, help="embeddings per process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.classes[0], args.dim, args.batch, args.steps, Path(args.one[1]))
        return
    if args.gpu:
        print(json.dumps(gpu(args.classes[-1], args.steps), indent=2))
        return
    results = []
    print(f"{'classes':>8} {'classifier':>15} {'state MB/rank':>14} {'peak RSS MB/rank':>17} {'step s':>8}")
    for classes in args.classes:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = ["bash", str(ROOT / "train.sh"), "cpu", str(args.processes), "bench/partial_fc.py", "--one",
                       variant, str(out), "--classes", str(classes), "--dim", str(args.dim), "--batch",
                       str(args.batch), "--steps", str(args.steps)]  # fmt: skip
                env = {**os.environ, "PYTHON": sys.executable}
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if r.returncode:  # e.g. killed for memory: say so and go on
                    row = {"variant": variant, "classes": classes, "error": r.stderr.strip().splitlines()[-1:]}
                    print(f"{classes:>8} {variant:>15} failed: {row['error']}")
                    results.append(row)
                    continue
                row = json.loads(out.read_text())
            worst = {k: max(rank[k] for rank in row["ranks"]) for k in row["ranks"][0]}
            print(f"{classes:>8} {variant:>15} {worst['state_mb']:>14.0f} {worst['peak_rss_mb']:>17.0f} "
                  f"{worst['step_s']:>8.3f}")  # fmt: skip
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
