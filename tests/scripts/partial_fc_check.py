"""Run by tests/test_losses_partial_fc.py through `bash train.sh cpu 2 ...`: Partial FC across two processes.

Every rank draws the same full batch and classifier from one seed, keeps its own uneven share of the batch (rank 0
the first 5 rows, rank 1 the next 7) and its shard of the classes, and saves the loss and the gradients it got, so
the test can compare them with one process computing the unsharded loss on everything.
"""

import sys
from pathlib import Path

import torch

from dino_recog import distributed as D
from dino_recog.losses.partial_fc import LabelCorrection, PartialFC

SPLIT = (5, 7)
CLASSES, DIM = 11, 8
CORRECTION = LabelCorrection(start_step=1, alpha=0.5, threshold=0.3, t=0.1, momentum=0.5)
CASES = {  # name: (kind, s, margins, epsilon)
    "ce": ("ce", 1.0, (1.0, 0.0, 0.0), 0.1),
    "cosface": ("cosface", 30.0, (1.0, 0.0, 0.35), 0.0),
    "arcface": ("arcface", 30.0, (1.0, 0.5, 0.0), 0.0),
    "combined": ("combined", 16.0, (1.2, 0.3, 0.1), 0.0),
}


def share(full: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SPLIT[:rank])
    return full[start : start + SPLIT[rank]]


def main(out_dir: str) -> None:
    with D.session("cpu"):
        rank = D.get_rank()
        g = torch.Generator().manual_seed(0)
        features = torch.randn(sum(SPLIT), DIM, generator=g)
        labels = torch.randint(0, CLASSES, (sum(SPLIT),), generator=g)
        weight = torch.randn(CLASSES, DIM, generator=g)
        saved = {"rank": rank, "features": features, "labels": labels, "weight": weight}
        for name, (kind, s, margins, eps) in CASES.items():
            for rate in (1.0, 0.5):
                pfc = PartialFC(DIM, CLASSES, kind, s, margins, rate, eps, seed=3)
                with torch.no_grad():
                    pfc.weight.copy_(weight[pfc.first : pfc.first + pfc.num_local])
                f = share(features, rank).clone().requires_grad_(True)
                loss = pfc(f, share(labels, rank))
                loss.backward()
                saved[f"{name}@{rate}"] = {
                    "loss": loss.detach(), "feature_grad": f.grad, "weight_grad": pfc.weight.grad,
                    "first": pfc.first, "num_local": pfc.num_local, "index": pfc.last_index,
                }  # fmt: skip
        # Label correction: the second step corrects with the classifier and the prototypes of the first.
        pfc = PartialFC(DIM, CLASSES, "ce", sample_rate=1.0, correction=CORRECTION)
        with torch.no_grad():
            pfc.weight.copy_(3 * weight[pfc.first : pfc.first + pfc.num_local])
        losses = [pfc(share(features, rank), share(labels, rank)).detach() for _ in range(2)]
        saved["correction"] = {"losses": losses, "prototypes": pfc.prototypes, "corrected": int(pfc.corrected)}
        torch.save(saved, Path(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
