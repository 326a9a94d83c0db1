"""Run by tests/test_extract.py through `bash train.sh cpu 2 ...`: the feature cache under torchrun.

Each rank writes OUT/rank<r>.json with how often it extracted and digests of what each call returned.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from dino_recog import distributed as D
from dino_recog import feature_cache
from dino_recog.data import datasets as ds
from dino_recog.data.transforms import reid_test_transform
from dino_recog.models import build_backbone


def main(images: str, out: str) -> None:
    calls = []
    extract = feature_cache.extract_features
    feature_cache.extract_features = lambda *a, **k: calls.append(1) or extract(*a, **k)
    with D.session("cpu") as device:
        torch.manual_seed(0)  # the same weights on both ranks
        model = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
        tf = reid_test_transform((32, 16), (0.5,) * 3, (0.5,) * 3)
        paths = sorted(str(p) for p in Path(images).glob("*.png"))
        data = ds.ImageDataset([ds.Record(p, i, 0) for i, p in enumerate(paths)], tf, train=False)
        shared, rank = Path(out) / "cache", D.get_rank()
        digests, counts = [], []
        # 1: a miss everywhere (rank 0 writes); 2: a hit everywhere; 3: rank 1 looks in an empty folder (as on a file
        # system that is not shared), so both ranks must extract again instead of one waiting for the other
        for cache_dir in (shared, shared, shared if rank == 0 else Path(out) / "elsewhere"):
            feats, pids, _ = feature_cache.cached_features(model, data, device, cache_dir, batch_size=2)
            digests.append(hashlib.sha256(feats.numpy().tobytes() + pids.tobytes()).hexdigest())
            counts.append(len(calls))
            D.barrier()  # the next call starts after rank 0 has written
        files = sorted(p.name for p in shared.iterdir())
        Path(out, f"rank{rank}.json").write_text(json.dumps({"counts": counts, "digests": digests, "files": files}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
