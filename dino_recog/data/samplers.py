"""Identity-balanced sampling for metric learning."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PKSampler"]


class PKSampler(Sampler[list[int]]):
    """Batches of P identities x K images each (Hermans et al. 2017), for DataLoader(batch_sampler=...).

    Each identity's images are shuffled and cut into chunks of K once per epoch (an identity with fewer than K images
    is sampled with replacement); an epoch has (number of chunks) // (P x world) batches, the same on every rank.
    Every step draws P x world distinct identities, weighted by their remaining chunks, and gives rank r the r-th
    group of P, so ranks never share an identity within a step. The draw depends only on (seed, epoch): every rank
    computes the same plan, and `set_epoch` reshuffles.

    Args:
        pids: the identity of every sample of the data set, in data set order.
        num_identities: P per process.
        num_instances: K.
        rank, world_size: this process and the number of processes.
        seed: base seed, shared by all ranks.
    """

    def __init__(self, pids: Sequence[int], num_identities: int, num_instances: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:  # fmt: skip
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.index_by_pid[int(pid)].append(i)
        self.pids = sorted(self.index_by_pid)
        self.p, self.k = num_identities, num_instances
        self.rank, self.world = rank, world_size
        self.seed, self.epoch = seed, 0
        per_step = self.p * self.world
        if len(self.pids) < per_step:
            raise ValueError(
                f"{len(self.pids)} identities cannot fill a step of {self.p} identities per process x {self.world} "
                f"processes; lower data.num_identities or the number of processes"
            )
        chunks = sum(max(len(v) // self.k, 1) for v in self.index_by_pid.values())
        self.num_batches = max(chunks // per_step, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self, rng: np.random.Generator, pid: int) -> list[list[int]]:
        idx = self.index_by_pid[pid]
        if len(idx) < self.k:
            return [rng.choice(idx, self.k, replace=True).tolist()]
        perm = rng.permutation(idx).tolist()
        return [perm[j : j + self.k] for j in range(0, len(perm) - self.k + 1, self.k)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = {pid: self._chunks(rng, pid) for pid in self.pids}
        per_step = self.p * self.world
        for _ in range(self.num_batches):
            avail = [pid for pid in self.pids if remaining[pid]]
            if len(avail) < per_step:  # refill the exhausted identities rather than end the epoch early
                for pid in self.pids:
                    if not remaining[pid]:
                        remaining[pid] = self._chunks(rng, pid)
                avail = self.pids
            weights = np.array([len(remaining[pid]) for pid in avail], dtype=np.float64)
            chosen = rng.choice(len(avail), per_step, replace=False, p=weights / weights.sum())
            step = [remaining[avail[c]].pop() for c in chosen]
            yield [i for chunk in step[self.rank * self.p : (self.rank + 1) * self.p] for i in chunk]

    def __len__(self) -> int:
        return self.num_batches
