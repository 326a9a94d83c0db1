"""Which runs repeat bit for bit on a GPU: two same-seed stage-1 runs per precision and attention kernel, and a
resume from a mid-epoch checkpoint against the uninterrupted run. Results go to docs/reliability.md.

    python bench/gpu_determinism.py [--out results.json]

Each run is the tiny stage-1 configuration of tests/conftest.py (a 2-block 32-wide ViT on 32x16 crops, 2
epochs of 12 steps, a checkpoint every 5 steps) on a generated demo pool, on `cuda` (any device works, the CPU too).
A run that is identical has the same loss at every step and the same teacher weights at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for optional in ("faiss", "lmdb"):  # only evaluation and LMDB data need them; a bare GPU image may lack them
    if importlib.util.find_spec(optional) is None:
        sys.modules[optional] = types.ModuleType(optional)

import torch  # noqa: E402

import train_dino  # noqa: E402
from dino_recog import checkpoint as ckpt  # noqa: E402
from dino_recog import config as C  # noqa: E402
from dino_recog.data.demo import generate  # noqa: E402
from dino_recog.runlog import read_jsonl  # noqa: E402

TINY = [
    "model.arch=vit_small", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16", "model.drop_path_rate=0.1",
    "crops.global_crops_size=[32,16]", "crops.local_crops_size=[16,8]", "crops.local_crops_number=2",
    "data.batch_size_per_gpu=8", "data.num_workers=2", "train.epochs=2", "train.warmup_epochs=1", "run.log_every=1",
    "eval.eval_every=0", "eval.export_every=1", "eval.saveckp_freq=0", "run.save_every_steps=5", "run.keep_last=20",
]  # fmt: skip


def run(images: Path, out: Path, *extra: str) -> list[float]:
    """One stage-1 run; its loss at every step."""
    args = [*TINY, f"data.train={{name: image_folder, root: {images}}}", f"run.output_dir={out}", *extra]
    train_dino.main(C.load(ROOT / "cfg_dino.yaml", args, cls=C.DinoConfig))
    return [r["loss"] for r in read_jsonl(out / "log.jsonl", "train")]


def differing(a: Path, b: Path, nets: tuple[str, ...] = ("student", "teacher", "dino_loss")) -> list[str]:
    sa, sb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    return [f"{n}.{k}" for n in nets for k in sa[n] if not torch.equal(sa[n][k], sb[n][k])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu_determinism-"))
    generate(work / "demo", seed=3, train_ids=30, test_ids=15, unlabeled_ids=16, distractors=4, junk=2)
    images = work / "demo" / "lup" / "images"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: dict = {"device": device, "torch": torch.__version__}
    for amp in ("fp32", "bf16"):
        for fused in ("true", "false"):
            name, extra = f"{amp}, fused_attn {fused}", (f"run.amp={amp}", f"run.fused_attn={fused}")
            a, b = run(images, work / f"{name}-1", *extra), run(images, work / f"{name}-2", *extra)
            results[name] = {
                "same loss curve": a == b,
                "largest loss difference": max(abs(x - y) for x, y in zip(a, b)),
                "different tensors at the end": len(
                    differing(*(work / f"{name}-{i}" / "checkpoint_0002.pth" for i in (1, 2)))
                ),  # fmt: skip
            }
            # the same run again, resumed from its mid-epoch checkpoint after iteration 15
            resumed = work / f"{name}-resumed"
            shutil.copytree(work / f"{name}-1", resumed)
            for path in resumed.glob("checkpoint*"):
                if path.name != "checkpoint_0001_000003.pth":
                    path.unlink()
            run(images, resumed, *extra)
            end = (work / f"{name}-1" / "checkpoint_0002.pth", resumed / "checkpoint_0002.pth")
            results[name]["resumed mid-epoch: different tensors"] = len(differing(*end))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
