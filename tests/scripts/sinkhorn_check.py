"""Run by tests/test_losses_dinov2.py through `bash train.sh cpu 2 ...`: the DINOv2 losses across two processes.

Every rank draws the same full data from one seed and keeps its own uneven share (rank 0 the first 5 rows, rank 1 the
next 7), so the test can compare what the two processes computed together with one process on all of it.
"""

import sys
from pathlib import Path

import torch

from dino_recog import distributed as D
from dino_recog.losses import IBOTPatchLoss, sinkhorn_knopp

SPLIT = (5, 7)
K = 6


def share(full: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SPLIT[:rank])
    return full[start : start + SPLIT[rank]]


def main(out_dir: str) -> None:
    with D.session("cpu"):
        rank = D.get_rank()
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(sum(SPLIT), K, generator=g) * 3
        mine = share(logits, rank)
        targets = sinkhorn_knopp(mine, 0.1)  # (n_r, K), 3 iterations
        converged = sinkhorn_knopp(mine, 0.1, iterations=200)
        # The marginals over the global batch: per sample (local) and per prototype (summed over both processes).
        prototype_mass = D.all_reduce_sum(converged.sum(0))  # (K,)
        # Rank 1 holds no row at all: it must still join every collective, and rank 0 gets the one-process answer.
        lonely = sinkhorn_knopp(mine if rank == 0 else mine[:0], 0.1)

        # The iBOT centre: the mean over the masked patches of both processes (uneven counts).
        patches = torch.randn(sum(SPLIT), K, generator=g)
        ibot = IBOTPatchLoss(K, center_momentum=0.5)
        masks = torch.zeros(1, SPLIT[rank], dtype=torch.bool)
        masks[:] = True
        ibot(torch.zeros(SPLIT[rank], K), share(patches, rank), masks, 0.1)
        torch.save(
            {
                "rank": rank,
                "world": D.get_world_size(),
                "logits": logits,
                "targets": targets,
                "converged": converged,
                "prototype_mass": prototype_mass,
                "lonely": lonely,
                "patches": patches,
                "ibot_center": ibot.center,
            },
            Path(out_dir, f"rank{rank}.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1])
