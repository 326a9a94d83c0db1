"""Run by tests/test_evaluation.py through `bash train.sh cpu 2 ...`: sharded feature extraction, saved by rank 0."""

import sys

import torch

from dino_recog import distributed as D
from dino_recog.data import datasets as ds
from dino_recog.data.transforms import reid_test_transform
from dino_recog.evaluation import extract_features
from dino_recog.models import build_backbone


def main(market: str, out: str) -> None:
    with D.session("cpu") as device:
        torch.manual_seed(0)  # the same weights on both ranks
        model = build_backbone("vit_small", img_size=(32, 16), patch_size=8, depth=2, embed_dim=32, num_heads=2)[0]
        tf = reid_test_transform((32, 16), (0.5,) * 3, (0.5,) * 3)
        data = ds.ImageDataset(ds.load_market1501(market).query, tf, train=False)
        feats, pids, camids = extract_features(model, data, device, batch_size=4)
        if D.is_main_process():
            torch.save({"feats": feats, "pids": torch.as_tensor(pids), "camids": torch.as_tensor(camids)}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
