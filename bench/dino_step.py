"""Images/s, peak memory and model FLOPs utilisation of one full DINO training step, with each speed option on/off.

    python bench/dino_step.py                                     # GPU: ViT-S/16, 2x256x128 + 8x128x64, batch 64
    python bench/dino_step.py --official /path/to/facebookresearch/dino   # + the official step, same GPU, same run
    python bench/dino_step.py --tiny --device cpu                 # CPU: a 4-block 64-d ViT on 64x32 / 32x16 crops
    python bench/dino_step.py --arch vit_base --profile OUT       # ViT-B/16; torch.profiler traces at batch 64, 256

A step is exactly what `engine.train_one_epoch` runs for the DINO task (teacher forward on the global crops, student
forward on all crops, DINO loss, backward, gradient clipping, optimiser step, EMA of the teacher), timed over whole
epochs of `--steps` iterations on crops that already sit on the device, so the number is the model's speed, not the data
pipeline's (bench/augment.py measures that). Each variant is the default configuration with some `key=value`
overrides of cfg_dino.yaml.

`--official DIR` imports `main_dino.py`, `utils.py` and `vision_transformer.py` from a checkout of
facebookresearch/dino (not part of this repository) and times its own `train_one_epoch` on the same crops, model
size, head and optimiser (its default fp16 autocast, DDP over one process as its launcher does). On the CPU
(`--device cpu`, the smoke run of bench/gpu_suite.sh) its ``.cuda()`` calls are made no-ops so that its loop runs.

`--profile DIR` runs a few steps of the default variant under ``torch.profiler`` at each batch of
`--profile-batches` and saves the Chrome trace (gzipped) and the table of the operators by device time there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_recog import config as C  # noqa: E402
from dino_recog.cli import apply_speed_options  # noqa: E402
from dino_recog.engine import LoopOptions, train_one_epoch  # noqa: E402
from dino_recog.optim import build_optimizer  # noqa: E402
from dino_recog.runlog import RunLog  # noqa: E402
from dino_recog.tasks import build_dino_task, dino_schedule  # noqa: E402

# variant name -> cfg_dino.yaml overrides on top of the defaults
VARIANTS = {
    "default (bf16, SDPA, fused AdamW)": [],
    "fp16 + GradScaler": ["run.amp=fp16"],
    "fp32": ["run.amp=fp32"],
    "explicit attention": ["run.fused_attn=false"],
    "foreach AdamW (not fused)": ["run.fused_optimizer=false"],
    "torch.compile": ["run.compile=true"],
    "activation checkpointing": ["run.grad_checkpointing=true"],
    "DINOv2 (iBOT + KoLeo, masked global crops)": ["dino.version=v2"],
}
CUDA_ONLY = ("fp16 + GradScaler", "fp32", "foreach AdamW (not fused)")
# dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets, SXM parts)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def synthetic_crops(batch: int, n_global: int, global_size, n_local: int, local_size, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, *global_size, generator=g) for _ in range(n_global)]
    crops += [torch.randn(batch, 3, *local_size, generator=g) for _ in range(n_local)]
    return [c.to(device) for c in crops]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(run_epoch, steps: int, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Epoch 0 warms up (and compiles); epochs 1..repeats are timed; the best epoch is reported."""
    run_epoch(0)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for epoch in range(1, repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        run_epoch(epoch)
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": batch * steps / best, "step_ms": 1000 * best / steps, "peak_gib": peak}


def training_parts(cfg: C.DinoConfig, device: torch.device, steps_per_epoch: int):
    """What train_dino.main builds for one process (no DDP): the task, optimiser, scaler, schedule, loop options."""
    task = build_dino_task(cfg).to(device)
    apply_speed_options(cfg.run, task.student.backbone, task.teacher.backbone)
    optimizer = build_optimizer(cfg.train.optimizer, task.param_groups(), 0.0, cfg.train.weight_decay,
                                cfg.train.momentum, cfg.run.fused_optimizer)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
    opts = LoopOptions(steps_per_epoch, cfg.run.amp, cfg.train.clip_grad, cfg.run.log_every)
    return task, optimizer, scaler, dino_schedule(cfg, steps_per_epoch), opts


def ours(overrides: list[str], args, crops: list[torch.Tensor], device: torch.device) -> tuple[dict, float]:
    """Our training step (the real engine.train_one_epoch) under `overrides`; returns timings and FLOPs per step."""

    cfg = C.load(ROOT / "cfg_dino.yaml", [*args.base, *overrides, "run.log_every=1000000000"], C.DinoConfig)
    task, optimizer, scaler, schedule, opts = training_parts(cfg, device, args.steps)
    batch = ((crops, None, None, None), 0)
    loader = [batch] * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(Path(tmp))

        def run_epoch(epoch: int) -> None:
            train_one_epoch(task, loader, optimizer, scaler, schedule, epoch, runlog, opts)

        result = time_epochs(run_epoch, args.steps, args.batch, device, args.repeats)
        runlog.close()
    flops = step_flops(task, crops, cfg.run.amp, device) if not overrides else float("nan")
    return result, flops


def step_flops(task, crops, amp: str, device) -> float:
    """Model FLOPs of one step (teacher forward + student forward and backward), counted by PyTorch's FlopCounter.
    Recomputation is not counted: this is model FLOPs, as in MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from dino_recog.engine import autocast_context

    counter = FlopCounterMode(display=False)
    with counter, autocast_context(device, amp):
        with torch.no_grad():
            t = task.teacher(crops[:2])
        loss = task.dino_loss(task.student(crops), t, 0.04)
        loss.backward()
    task.student.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def official(dino_dir: str, args, crops: list[torch.Tensor], device: torch.device, loader=None) -> dict:
    """The official `main_dino.train_one_epoch` on the same crops (ViT, head size and optimiser as its defaults), or
    fed by `loader` (`args.steps` batches an epoch; bench/augment.py's end-to-end run of its pipeline)."""
    import argparse as ap

    import torch.distributed as tdist
    import torch.nn as nn

    sys.path.insert(0, dino_dir)
    import main_dino  # noqa: F401  (facebookresearch/dino, from its own checkout)
    import utils
    import vision_transformer as vits

    if (
        not tdist.is_initialized()
    ):  # its DINOLoss all-reduces the centre: it needs a process group, as under its launcher
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    cfg = C.load(ROOT / "cfg_dino.yaml", args.base, C.DinoConfig)
    m = cfg.model
    kw, arch = dict(patch_size=m.patch_size), m.arch
    if m.depth or m.embed_dim or m.num_heads:
        if not args.tiny:
            raise SystemExit("--official compares the named architectures only (no depth/embed_dim/num_heads "
                             "overrides)")  # fmt: skip
        arch = "vit_tiny"  # --tiny: its smallest ViT, to prove that its loop runs (no comparison)
    student = vits.__dict__[arch](drop_path_rate=m.drop_path_rate, **kw)
    teacher = vits.__dict__[arch](**kw)
    dim = student.embed_dim
    student = utils.MultiCropWrapper(student, vits.DINOHead(dim, m.out_dim, use_bn=m.use_bn_in_head,
                                                            norm_last_layer=m.norm_last_layer))  # fmt: skip
    teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(dim, m.out_dim, m.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)
    student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index or 0] if device.type == "cuda"
                                                  else None)  # fmt: skip
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    n_crops = len(crops) if crops is not None else 2 + cfg.crops.local_crops_number
    epochs = args.repeats + 1
    loss = main_dino.DINOLoss(m.out_dim, n_crops, cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp,
                              cfg.dino.warmup_teacher_temp_epochs, epochs).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    scaler = torch.cuda.amp.GradScaler()
    n = epochs * args.steps
    lr = utils.cosine_scheduler(cfg.train.lr * args.batch / 256.0, cfg.train.min_lr, epochs, args.steps, 1)
    wd = utils.cosine_scheduler(cfg.train.weight_decay, cfg.train.weight_decay_end, epochs, args.steps)
    mom = utils.cosine_scheduler(cfg.dino.momentum_teacher, 1, epochs, args.steps)
    assert len(lr) == len(wd) == len(mom) == n
    targs = ap.Namespace(epochs=epochs, clip_grad=cfg.train.clip_grad, freeze_last_layer=cfg.dino.freeze_last_layer)
    fixed = [(crops, None)] * args.steps

    def run_epoch(epoch: int) -> None:
        main_dino.train_one_epoch(student, teacher, teacher, loss, fixed if loader is None else loader, optimizer, lr,
                                  wd, mom, epoch, scaler, targs)  # fmt: skip

    if device.type == "cpu":  # its loop moves the crops with .cuda() and syncs its meters on CUDA: no-ops here
        torch.Tensor.cuda = lambda self, *a, **k: self
        utils.SmoothedValue.synchronize_between_processes = lambda self: None
        torch.cuda.synchronize = lambda *a, **k: None
    return time_epochs(run_epoch, args.steps, args.batch, device, args.repeats)


def profile(args, device: torch.device, out: Path) -> None:
    """torch.profiler over a few steps of the default variant at each batch of `--profile-batches`: where the
    milliseconds go. Saves dino_step_<arch>_b<batch>.json.gz (Chrome trace) and .txt (operators by device time)."""
    import gzip

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = C.load(ROOT / "cfg_dino.yaml", [*args.base, "run.log_every=1000000000"], C.DinoConfig)
    cr, arch = cfg.crops, f"{cfg.model.arch}{cfg.model.patch_size}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for batch in (int(b) for b in args.profile_batches.split(",")):
        crops = synthetic_crops(batch, 2, cr.global_crops_size, cr.local_crops_number, cr.local_crops_size, device)
        steps = max(args.steps // 4, 1)
        task, optimizer, scaler, schedule, opts = training_parts(cfg, device, steps)
        loader = [((crops, None, None, None), 0)] * steps
        with tempfile.TemporaryDirectory() as tmp:
            runlog = RunLog(Path(tmp))
            train_one_epoch(task, loader, optimizer, scaler, schedule, 0, runlog, opts)  # warm-up
            sync(device)
            with torch_profile(activities=activities) as prof:
                train_one_epoch(task, loader, optimizer, scaler, schedule, 1, runlog, opts)
                sync(device)
            runlog.close()
        name = out / f"dino_step_{arch}_b{batch}"
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json", "rb") as src, gzip.open(f"{name}.json.gz", "wb") as dst:
                dst.write(src.read())
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        Path(f"{name}.txt").write_text(f"# {steps} steps, batch {batch}\n{table}\n")
        print(f"# profile at batch {batch}: {name}.json.gz, {name}.txt", flush=True)
        del task, optimizer


def show(r: dict) -> None:
    print(
        f"{r['variant']:<45} {r['images_per_s']:9.1f} img/s {r['step_ms']:8.2f} ms {r['peak_gib']:6.2f} GiB", flush=True
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="4-block 64-d ViT, patch 8, 64x32 / 32x16 crops (CPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="iterations per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (the best is reported)")
    p.add_argument("--variants", default="all", help="comma-separated variant names' prefixes, all, or none")
    p.add_argument("--official", metavar="DIR", help="checkout of facebookresearch/dino to time beside ours")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--arch", default="vit_small", help="model.arch (not with --tiny)")
    p.add_argument("--profile", metavar="DIR", help="save torch.profiler traces of the default variant here")
    p.add_argument("--profile-batches", default="64,256", help="--profile: batches to profile")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.base = ["model.patch_size=8", "model.depth=4", "model.embed_dim=64", "model.num_heads=4",
                     "model.out_dim=1024", "crops.global_crops_size=[64,32]", "crops.local_crops_size=[32,16]",
                     "crops.local_crops_number=4"]  # fmt: skip
    else:
        args.base = [f"model.arch={args.arch}"]
    base = C.load(ROOT / "cfg_dino.yaml", args.base, C.DinoConfig)
    cr = base.crops
    crops = synthetic_crops(args.batch, 2, cr.global_crops_size, cr.local_crops_number, cr.local_crops_size, device)
    size = f"{cr.local_crops_size[0]}x{cr.local_crops_size[1]}"
    desc = (f"{base.model.arch}/{base.model.patch_size}"
            + (f" depth {base.model.depth} dim {base.model.embed_dim}" if args.tiny else "")
            + f", 2x{cr.global_crops_size[0]}x{cr.global_crops_size[1]} + {cr.local_crops_number}x"
            f"{size}, batch {args.batch}, K={base.model.out_dim}")  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"# DINO step, {desc}, {name}, torch {torch.__version__}")

    rows, flops = [], float("nan")
    chosen = [v for v in VARIANTS if args.variants == "all" or any(v.startswith(s) for s in args.variants.split(","))]
    if device.type == "cpu":  # precision and fused kernels are CUDA-only options
        chosen = [v for v in chosen if v not in CUDA_ONLY]
    for v in chosen:
        torch.manual_seed(0)
        r, f = ours(VARIANTS[v], args, crops, device)
        if v.startswith("default"):
            flops = f
        rows.append({"variant": "ours: " + v, **r})
        show(rows[-1])
    if args.official:
        torch.manual_seed(0)
        r = official(args.official, args, crops, device)
        rows.append({"variant": "official facebookresearch/dino (fp16)", **r})
        show(rows[-1])

    print()
    print("| variant | images/s | ms/step | peak GiB | MFU |")
    print("|---|---|---|---|---|")
    for r in rows:
        mfu = ""
        if peak and flops == flops:
            mfu = f"{100 * flops / (r['step_ms'] / 1000) / (peak * 1e12):.1f}%"
        peak_s = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "-"
        print(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['step_ms']:.2f} | {peak_s} | {mfu} |")
    if flops == flops:
        print(f"\nmodel FLOPs per step {flops / 1e12:.3f} TFLOP ({flops / args.batch / 1e9:.1f} GFLOP per image)"
              + (f"; MFU against {peak} TFLOP/s dense bf16" if peak else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": desc, "device": name, "flops_per_step": flops,
                                               "rows": rows}, indent=2))  # fmt: skip
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile(args, device, Path(args.profile))


if __name__ == "__main__":
    main()
