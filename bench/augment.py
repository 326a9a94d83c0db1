"""Multi-crop augmentation throughput: images per CPU-second of one worker process, ours against lightly.

    bash bench/lightly_env.sh                  # once: lightly in its own venv, bench/.venv-lightly
    python bench/augment.py                    # CPU: per-process images/s on generated JPEGs of three sizes
    python bench/augment.py --gpu              # GPU machine: DataLoader workers + training step, CPU vs GPU path

CPU mode. Each variant runs in its own process (so that no process setting of one, e.g. our glibc heap setting,
reaches another) with ``torch.set_num_threads(1)``, and times decode + 2 global + ``--local`` local crops of every
generated JPEG. A round runs every variant once; variants alternate round by round so that load from other jobs
hits all of them alike, and the median round is reported, in images per CPU-second of the process (``process_time``:
per core, and little affected by other jobs) and per wall-second. Variants:

- ours, CPU path: ``MultiCropTransform`` (what a DataLoader worker runs by default);
- ours, GPU-path worker part: ``MultiCropTransform(gpu_augment=True)``, decode + crop + resize + flip to uint8;
- lightly ``DINOTransform`` (bench/.venv-lightly), same crop sizes, scales, probabilities and number of crops; its
  crop aspect range is torchvision's (3/4, 4/3) while ours is relative to the output aspect (identical at square
  sizes), which changes the crop shape, not the work;
- lightly again with our glibc heap setting in the environment, to show what that setting alone gives it.

Each runs at our person-crop sizes (2 x 256x128 + N x 128x64) and at DINO's square sizes (2 x 224 + N x 96).

GPU mode (``--gpu``) measures what the training loop sees: a DataLoader with ``--workers`` processes over a folder of
JPEGs (``--data``, default generated person crops), batch 64, then the transfer, and for the GPU path
``BatchAugment`` on the device: (a) data only, images/s of the loader; (b) training, images/s of
``engine.train_one_epoch`` (ViT-S/16, the default configuration) fed by that loader; (c) the same step on crops
already on the device (the model's ceiling, as bench/dino_step.py). The data bottleneck is gone when (b) reaches (c).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table
ROOT = Path(__file__).resolve().parents[1]
LIGHTLY_PYTHON = ROOT / "bench" / ".venv-lightly" / "bin" / "python"
SIZES = {"person 128x64": (128, 64), "person 256x128": (256, 128), "ImageNet 375x500": (375, 500)}
CROPS = {"rectangular 256x128 / 128x64": ((256, 128), (128, 64)), "square 224 / 96": ((224, 224), (96, 96))}
# our glibc heap setting (transforms.keep_freed_memory), as environment variables for the control variant
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}
VARIANTS = {
    "ours: CPU path": ("ours", {}),
    "ours: GPU-path worker part (uint8 crops)": ("ours_uint8", {}),
    "lightly DINOTransform": ("lightly", {}),
    "lightly, with our glibc heap setting": ("lightly", MALLOC_ENV),
}


def natural_jpegs(folder: Path, n: int, h: int, w: int, seed: int) -> list[Path]:
    """Photo-like JPEGs (smooth random colours, texture, sensor noise; quality 90): they decode like photographs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = Image.fromarray(rng.uniform(0, 255, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.uint8))
        tex = Image.fromarray(rng.uniform(0, 255, (max(h // 4, 2), max(w // 4, 2), 3)).astype(np.uint8))
        a = 0.75 * np.asarray(base.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        a += 0.25 * np.asarray(tex.resize((w, h), Image.Resampling.BILINEAR), np.float32) + rng.normal(0, 4, a.shape)
        paths.append(folder / f"{h}x{w}_{i:04d}.jpg")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def build_transform(kind: str, global_size, local_size, n_local: int):
    if kind == "lightly":
        from lightly.transforms import DINOTransform

        return DINOTransform(global_crop_size=tuple(global_size), local_crop_size=tuple(local_size),
                             n_local_views=n_local)  # fmt: skip
    sys.path.insert(0, str(ROOT))
    from dino_recog.data.transforms import MultiCropTransform

    return MultiCropTransform(global_size, (0.4, 1.0), n_local, local_size, (0.05, 0.4),
                              gpu_augment=kind == "ours_uint8")  # fmt: skip


def run(transform, paths: list[str], n_crops: int) -> int:
    """Decode every file as the data set does (full load, RGB) and make its crops; returns the image count."""
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            views = transform(im.convert("RGB"))
        assert len(views) == n_crops
    return len(paths)


def worker(args) -> None:
    """One round of one variant (in its own process): times every (crop setting, source size) pair."""
    import torch

    torch.set_num_threads(1)
    files = json.loads(Path(args.files).read_text())
    out = {}
    for crops, (g, loc) in CROPS.items():
        t = build_transform(args.worker, g, loc, args.local)
        for size in SIZES:
            paths = files[size]

            run(t, paths, 2 + args.local)  # warm-up: first-call costs and caches
            c0, w0 = time.process_time(), time.perf_counter()
            n = run(t, paths, 2 + args.local)
            out[f"{crops} | {size}"] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0, "n": n}
    print(json.dumps(out))


def cpu_benchmark(args) -> None:
    variants = dict(VARIANTS)
    if not LIGHTLY_PYTHON.exists():
        print(f"# {LIGHTLY_PYTHON} missing (bash bench/lightly_env.sh): lightly not measured", flush=True)
        variants = {k: v for k, v in variants.items() if v[0] != "lightly"}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: [str(p) for p in natural_jpegs(Path(tmp), args.images, h, w, seed)]
                 for seed, (name, (h, w)) in enumerate(SIZES.items())}  # fmt: skip
        (Path(tmp) / "files.json").write_text(json.dumps(files))
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for name, (kind, env) in variants.items():
                python = str(LIGHTLY_PYTHON) if kind == "lightly" else sys.executable
                cmd = [python, __file__, "--worker", kind, "--files", str(Path(tmp) / "files.json"),
                       "--local", str(args.local)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                                **env})  # fmt: skip
                if res.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
                rounds[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"# round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)

    def rate(name: str, key: str, clock: str) -> float:
        return statistics.median(x[key]["n"] / x[key][clock] for x in rounds[name])

    print(f"\n# {2 + args.local} crops per image (2 global + {args.local} local), {args.images} JPEGs per source size, "
          f"median of {args.rounds} rounds, one process per variant, 1 thread")  # fmt: skip
    print("\n| crops | source JPEG | variant | images / CPU-s | images / wall-s | vs lightly (CPU-s) |")
    print("|---|---|---|---|---|---|")
    for key in rounds[next(iter(rounds))][0]:
        crops, size = key.split(" | ")
        base = rate("lightly DINOTransform", key, "cpu_s") if "lightly DINOTransform" in rounds else None
        for name in variants:
            cpu = rate(name, key, "cpu_s")
            ratio = f"{cpu / base:.2f}x" if base else "-"
            print(f"| {crops} | {size} | {name} | {cpu:.1f} | {rate(name, key, 'wall_s'):.1f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))


def gpu_benchmark(args) -> None:
    """Images/s of the loader, and of training fed by it, for the CPU and the GPU augmentation paths."""
    import itertools
    import tempfile as tf

    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    from dino_step import training_parts  # bench/dino_step.py: the same training set-up

    from dino_recog import config as C
    from dino_recog.data import datasets as ds
    from dino_recog.data.batch_augment import BatchAugment
    from dino_recog.data.transforms import MultiCropTransform
    from dino_recog.engine import train_one_epoch
    from dino_recog.runlog import RunLog

    device = torch.device(args.device)
    cfg = C.load(ROOT / "cfg_dino.yaml", [*args.base, "run.log_every=1000000000"], C.DinoConfig)
    cr = cfg.crops
    tmp = tf.TemporaryDirectory()
    if args.data:
        paths = ds.list_image_folder(args.data)
    else:
        paths = [str(p) for p in natural_jpegs(Path(tmp.name), 1024, 256, 128, 0)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {len(paths)} images, {args.workers} workers, batch {args.batch}, "
          f"{2 + cr.local_crops_number} crops ({cr.global_crops_size} / {cr.local_crops_size})")  # fmt: skip

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def loader(gpu_path: bool) -> DataLoader:
        t = MultiCropTransform(cr.global_crops_size, cr.global_crops_scale, cr.local_crops_number,
                               cr.local_crops_size, cr.local_crops_scale, gpu_augment=gpu_path)  # fmt: skip
        data = ds.ImageDataset(paths, transform=t)
        sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=10**9)
        return DataLoader(data, args.batch, sampler=sampler, num_workers=args.workers, drop_last=True,
                          pin_memory=device.type == "cuda", collate_fn=ds.collate_skip_none,
                          persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)  # fmt: skip

    augment = BatchAugment(cr.mean, cr.std, seed=0).to(device)
    rows = []

    def report(label: str, what: str, rate: float) -> None:
        rows.append((label, what, rate))
        print(f"{label:<62} {what:<10} {rate:9.1f} img/s", flush=True)

    def measure(gpu_path: bool) -> None:
        label = "GPU path (workers: uint8 crops; BatchAugment on the device)" if gpu_path else "CPU path (workers)"
        batches = iter(loader(gpu_path))
        on_device = augment if gpu_path else None

        def data_only(n: int) -> None:
            for i in range(n):
                (crops, *_), _ = next(batches)
                crops = [c.to(device, non_blocking=True) for c in crops]
                if on_device is not None:
                    crops = on_device(crops, i)
            sync()

        data_only(args.warmup)
        t0 = time.perf_counter()
        data_only(args.steps)
        report(label, "data only", args.batch * args.steps / (time.perf_counter() - t0))

        task, optimizer, scaler, schedule, opts = training_parts(cfg, device, args.steps)
        with tf.TemporaryDirectory() as logdir:
            runlog = RunLog(Path(logdir))

            def epoch(e: int, source, steps: int, augment_fn) -> float:
                """The real training loop over `steps` batches of `source`; images/s."""
                sync()
                t0 = time.perf_counter()
                task.augment = augment_fn
                train_one_epoch(task, itertools.islice(source, steps), optimizer, scaler, schedule, e, runlog, opts)
                sync()
                return args.batch * steps / (time.perf_counter() - t0)

            epoch(0, batches, args.warmup, on_device)
            report(label, "training", epoch(1, batches, args.steps, on_device))
            if gpu_path:  # the same step on one batch already on the device: the model's own speed
                (crops, *_), _ = next(batches)
                fixed = [((augment([c.to(device) for c in crops], 0), None, None, None), 0)] * args.steps
                report("model only (crops already on the device)", "training", epoch(2, iter(fixed), args.steps, None))
            runlog.close()

    for gpu_path in (False, True):
        measure(gpu_path)
    print("\n| augmentation | measured | images/s |\n|---|---|---|")
    for label, what, value in rows:
        print(f"| {label} | {what} | {value:.1f} |")
    tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=int, default=8, help="local crops per image (official 8)")
    p.add_argument("--images", type=int, default=32, help="generated JPEGs per source size")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the median round is reported")
    p.add_argument("--json", help="also write the raw round timings here")
    p.add_argument("--gpu", action="store_true", help="DataLoader + training throughput, CPU vs GPU path")
    p.add_argument("--device", default="cuda", help="--gpu: the training device")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="--gpu: DataLoader workers")
    p.add_argument("--batch", type=int, default=64, help="--gpu: images per batch")
    p.add_argument("--steps", type=int, default=30, help="--gpu: timed iterations")
    p.add_argument("--warmup", type=int, default=5, help="--gpu: untimed iterations first")
    p.add_argument("--data", help="--gpu: folder of images (default: 1024 generated 256x128 JPEGs)")
    p.add_argument("--override", nargs="*", default=[], dest="base", help="--gpu: cfg_dino.yaml key=value overrides")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.gpu:
        gpu_benchmark(args)
    else:
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
