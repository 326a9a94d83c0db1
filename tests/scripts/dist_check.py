"""Run by tests/test_distributed.py through `bash train.sh cpu 2 ...`: exercises the collectives of distributed.py."""

import json
import sys
from pathlib import Path

import torch

from dino_recog import distributed as D


def main(out_dir: str) -> None:
    with D.session("cpu"):
        rank, world = D.get_rank(), D.get_world_size()
        summed = D.all_reduce_mean(torch.tensor([float(rank + 1)])) * world
        # Rank r holds r + 2 rows whose values encode (rank, row), so order and trimming can be checked.
        mine = torch.stack([torch.tensor([rank, i], dtype=torch.float32) for i in range(rank + 2)])
        gathered = torch.cat(D.all_gather_variable(mine)).tolist()
        seed = D.seed_everything(7)
        picked = D.broadcast_object({"from": rank} if rank == 0 else None)
        D.barrier()
        result = {
            "rank": rank,
            "world": world,
            "sum": summed.item(),
            "gathered": gathered,
            "seed": seed,
            "broadcast": picked,
            "threads": torch.get_num_threads(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
