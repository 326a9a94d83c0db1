"""Images/s and peak memory of one stage-2 (re-identification) training step at 256x128, speed options on/off.

    python bench/recog_step.py                         # GPU: ViT-S/16 (TransReID-SSL recipe) and ResNet-50 (BoT)
    python bench/recog_step.py --tiny --device cpu     # CPU: a 4-block 64-d ViT on 64x32 images

A step is what `engine.train_one_epoch` runs for the re-id task on one P x K batch already on the device (forward, the
configured losses, backward, clipping, optimiser step); each variant is a preset plus `key=value` overrides.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from dino_step import ROOT, show, sync, time_epochs  # bench/ is the script's directory

from dino_recog import config as C
from dino_recog.cli import apply_speed_options
from dino_recog.engine import LoopOptions, train_one_epoch
from dino_recog.optim import build_optimizer
from dino_recog.runlog import RunLog
from dino_recog.tasks import ReIDStep, build_reid_task

PRESETS = {
    "vit_small/16": "configs/market1501/vit_small_transreid_ssl.yaml",
    "resnet50 (BoT)": "configs/market1501/bot_r50.yaml",
}
VARIANTS = {
    "default (bf16, fused)": [],
    "fp32": ["run.amp=fp32"],
    "explicit attention": ["run.fused_attn=false"],
    "torch.compile": ["run.compile=true"],
    "channels_last": ["run.channels_last=true"],
}
NUM_CLASSES = 751  # Market-1501 training identities


def run(preset: str, overrides: list[str], args, device: torch.device) -> dict:
    cfg = C.load(ROOT / preset, [*args.base, *overrides, "model.pretrained=", "run.log_every=1000000000"],
                 C.RecogConfig)  # fmt: skip
    task = build_reid_task(cfg, NUM_CLASSES).to(device)
    apply_speed_options(cfg.run, task.model.backbone)
    t = cfg.train
    optimizer = build_optimizer(t.optimizer, task.param_groups(t.bias_lr_factor, t.head_lr_factor), t.lr,
                                t.weight_decay, t.momentum, cfg.run.fused_optimizer)  # fmt: skip
    optimizers = [optimizer, *task.extra_optimizers()]
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.amp == "fp16")
    opts = LoopOptions(args.steps, cfg.run.amp, t.clip_grad, cfg.run.log_every)
    p, k = cfg.data.num_identities, cfg.data.num_instances
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p * k, 3, *cfg.aug.size, generator=g).to(device)
    labels = torch.arange(p).repeat_interleave(k).to(device)
    loader = [((x, labels), 0)] * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(Path(tmp))

        def run_epoch(epoch: int) -> None:
            train_one_epoch(task, loader, optimizers, scaler, lambda it: ReIDStep(t.lr, it), epoch, runlog, opts)

        result = time_epochs(run_epoch, args.steps, p * k, device, args.repeats)
        runlog.close()
    sync(device)
    return {"batch": p * k, "size": list(cfg.aug.size), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="4-block 64-d ViT, patch 8, 64x32 images (CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    presets = dict(PRESETS)
    args.base = []
    if args.tiny:
        presets = {"vit tiny (4 blocks, 64-d)": PRESETS["vit_small/16"]}
        args.base = ["model.patch_size=8", "model.depth=4", "model.embed_dim=64", "model.num_heads=4",
                     "aug.size=[64,32]", "data.num_identities=8"]  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# stage-2 step, {name}, torch {torch.__version__}")
    rows = []
    for arch, preset in presets.items():
        for v, overrides in VARIANTS.items():
            is_vit = "resnet" not in arch
            if (v == "channels_last" and is_vit) or (v == "explicit attention" and not is_vit):
                continue
            if device.type == "cpu" and v == "fp32":
                continue
            torch.manual_seed(0)
            r = run(preset, overrides, args, device)
            rows.append({"variant": f"{arch}: {v}", **r})
            show(rows[-1])
    print("\n| model: variant | batch | images/s | ms/step | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "-"
        print(f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | {r['step_ms']:.2f} | {peak} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
