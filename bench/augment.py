"""Multi-crop augmentation throughput: images per CPU-second of one worker process, ours against lightly.

    bash bench/lightly_env.sh                  # once: lightly in its own venv, bench/.venv-lightly
    python bench/augment.py                    # CPU: per-process images/s on generated JPEGs of three sizes
    python bench/augment.py --gpu --workers 4 8 --official DIR   # GPU machine: end to end, every pipeline

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

GPU mode (``--gpu``) measures what the training loop sees: a DataLoader with each of ``--workers`` process counts over
a folder of JPEGs (``--data``, default generated person crops), batch 64, for each pipeline of ``--paths``: ours with
``crops.decode=cpu`` (colour on the CPU, or with ``gpu_augment`` on the device), ours with ``crops.decode=gpu``
(bytes and boxes from the workers; decode, crop and colour on the device), and with ``--official DIR`` the official
DINO pipeline (its ``DataAugmentationDINO``, crop sizes set to ours, fed to its own ``train_one_epoch``). Each gives
(a) data only, images/s of the loader plus what runs on the device before the model; (b) training, images/s of
``engine.train_one_epoch`` (of its loop for the official one) fed by that loader. bench/dino_step.py gives the
model's ceiling (crops already on the device); the data bottleneck is gone when (b) reaches it.
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


PATHS = {  # --paths name -> what it measures
    "cpu": "decode=cpu, colour on the CPU (workers: decode, crop, colour)",
    "gpu_augment": "decode=cpu + gpu_augment (workers: decode, crop; colour on the device)",
    "gpu_decode": "decode=gpu (workers: JPEG bytes + boxes; decode, crop, colour on the device)",
    "official": "official DINO pipeline (its DataAugmentationDINO at our crop sizes, its train_one_epoch)",
}
TINY = ["model.patch_size=8", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.out_dim=256",
        "model.hidden_dim=64", "model.bottleneck_dim=32", "crops.global_crops_size=[64,32]",
        "crops.local_crops_size=[32,16]", "crops.local_crops_number=2"]  # fmt: skip


class _Epoch:
    """`steps` batches of an iterator, with a length (the official loop asks for len(data_loader))."""

    def __init__(self, batches, steps: int, official: bool) -> None:
        self.batches, self.steps, self.official = batches, steps, official

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            (crops, *_), n_bad = next(self.batches)
            yield (crops, None) if self.official else ((crops, None, None, None), n_bad)


def gpu_benchmark(args) -> None:
    """Images/s of the loader, and of training fed by it, for each augmentation path and number of workers."""
    import tempfile as tf

    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    from dino_step import official, training_parts  # bench/dino_step.py: the same training set-up

    from dino_recog import config as C
    from dino_recog.data import datasets as ds
    from dino_recog.data.batch_augment import BatchAugment
    from dino_recog.data.device_decode import DeviceCrops, EncodedMultiCrop, collate_encoded
    from dino_recog.data.transforms import MultiCropTransform
    from dino_recog.engine import train_one_epoch
    from dino_recog.runlog import RunLog

    device = torch.device(args.device)
    args.tiny = args.tiny or False
    args.base = [*(TINY if args.tiny else [f"model.arch={args.arch}"]), *args.base]
    cfg = C.load(ROOT / "cfg_dino.yaml", [*args.base, "run.log_every=1000000000"], C.DinoConfig)
    cr = cfg.crops
    tmp = tf.TemporaryDirectory()
    if args.data:
        paths = ds.list_image_folder(args.data)
    else:
        paths = [str(p) for p in natural_jpegs(Path(tmp.name), args.images_e2e, 256, 128, 0)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = "tiny ViT" if args.tiny else f"{cfg.model.arch}/{cfg.model.patch_size}"
    print(f"# {name}, torch {torch.__version__}, {model}, {len(paths)} images, batch {args.batch}, "
          f"{2 + cr.local_crops_number} crops ({cr.global_crops_size} / {cr.local_crops_size})", flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def loader(path: str, workers: int) -> DataLoader:
        kw = dict(global_crops_scale=cr.global_crops_scale, local_crops_number=cr.local_crops_number,
                  local_crops_scale=cr.local_crops_scale)  # fmt: skip
        collate = ds.collate_skip_none
        if path == "official":
            main_dino = _official_module(args.official)
            t = main_dino.DataAugmentationDINO(cr.global_crops_scale, cr.local_crops_scale, cr.local_crops_number)
            # the same output pixels as ours: its RandomResizedCrop(224) / (96) made (h, w) crops
            t.global_transfo1.transforms[0].size = t.global_transfo2.transforms[0].size = tuple(cr.global_crops_size)
            t.local_transfo.transforms[0].size = tuple(cr.local_crops_size)
        elif path == "gpu_decode":
            t = EncodedMultiCrop(cr.global_crops_size, local_crops_size=cr.local_crops_size, **kw)
            collate = collate_encoded
        else:
            t = MultiCropTransform(cr.global_crops_size, local_crops_size=cr.local_crops_size,
                                   gpu_augment=path == "gpu_augment", **kw)  # fmt: skip
        data = ds.ImageDataset(paths, transform=t)
        sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=10**9)
        return DataLoader(data, args.batch, sampler=sampler, num_workers=workers, drop_last=True,
                          pin_memory=device.type == "cuda", collate_fn=collate, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers else None)  # fmt: skip

    augment = BatchAugment(cr.mean, cr.std, seed=0).to(device)
    decode = DeviceCrops()
    rows = []

    def report(label: str, workers: int, what: str, rate: float) -> None:
        rows.append((label, workers, what, rate))
        print(f"{label:<40} {workers:>2} workers {what:<10} {rate:9.1f} img/s", flush=True)

    def measure(path: str, workers: int) -> None:
        batches = iter(loader(path, workers))
        on_device = path in ("gpu_augment", "gpu_decode")

        def data_only(n: int) -> None:
            for i in range(n):
                (crops, *_), _ = next(batches)
                if path == "gpu_decode":
                    crops = decode(crops, device)
                crops = [c.to(device, non_blocking=True) for c in crops]
                if on_device:
                    crops = augment(crops, i)
            sync()

        data_only(args.warmup)
        t0 = time.perf_counter()
        data_only(args.steps)
        report(path, workers, "data only", args.batch * args.steps / (time.perf_counter() - t0))
        if path == "official":
            args.repeats = 1
            r = official(args.official, args, None, device, loader=_Epoch(batches, args.steps, official=True))
            report(path, workers, "training", r["images_per_s"])
            return
        task, optimizer, scaler, schedule, opts = training_parts(cfg, device, args.steps)
        task.augment = augment if on_device else None
        task.decode = decode if path == "gpu_decode" else None
        with tf.TemporaryDirectory() as logdir:
            runlog = RunLog(Path(logdir))

            def epoch(e: int) -> float:
                """The real training loop over `steps` batches of the loader; images/s."""
                sync()
                t0 = time.perf_counter()
                train_one_epoch(task, _Epoch(batches, args.steps, False), optimizer, scaler, schedule, e, runlog, opts)
                sync()
                return args.batch * args.steps / (time.perf_counter() - t0)

            epoch(0)
            if args.profile and path == "gpu_decode":
                tag = model.replace("/", "").replace(" ", "_")
                rate = _profiled(epoch, device, Path(args.profile) / f"augment_{tag}_w{workers}")
            else:
                rate = epoch(1)
            report(path, workers, "training", rate)
            runlog.close()

    for workers in args.workers:
        for path in args.paths.split(","):
            if path == "official" and not args.official:
                continue
            measure(path, workers)
    print("\n| pipeline | workers | measured | images/s |\n|---|---|---|---|")
    for label, workers, what, value in rows:
        print(f"| {PATHS[label]} | {workers} | {what} | {value:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "model": model, "rows": rows}, indent=1))
    tmp.cleanup()


def _official_module(dino_dir: str):
    sys.path.insert(0, dino_dir)
    import main_dino  # facebookresearch/dino, from its own checkout (bench/gpu_env.sh)

    return main_dino


def _profiled(epoch, device, name: Path) -> float:
    """One timed epoch under torch.profiler; the trace (gzipped) and the operator table beside `name`."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    name.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        rate = epoch(1)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json", "rb") as src, gzip.open(f"{name}.json.gz", "wb") as dst:
            dst.write(src.read())
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(f"{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    del torch
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=int, default=8, help="local crops per image (official 8)")
    p.add_argument("--images", type=int, default=32, help="generated JPEGs per source size")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the median round is reported")
    p.add_argument("--json", help="also write the raw round timings (--gpu: the table) here")
    p.add_argument("--gpu", action="store_true", help="DataLoader + training throughput, CPU vs GPU path")
    p.add_argument("--device", default="cuda", help="--gpu: the training device")
    p.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count()], help="--gpu: DataLoader workers "
                   "(several: each measured)")
    p.add_argument("--paths", default="cpu,gpu_augment,gpu_decode,official", help="--gpu: pipelines to measure, of "
                   + ", ".join(PATHS))
    p.add_argument("--arch", default="vit_small", help="--gpu: model.arch")
    p.add_argument("--tiny", action="store_true", help="--gpu: a 2-block 32-d ViT on 64x32 / 32x16 crops (smoke)")
    p.add_argument("--official", metavar="DIR", help="--gpu: checkout of facebookresearch/dino, timed end to end")
    p.add_argument("--images-e2e", type=int, default=1024, help="--gpu: generated 256x128 JPEGs (without --data)")
    p.add_argument("--profile", metavar="DIR", help="--gpu: torch.profiler trace of the decode=gpu training here")
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
