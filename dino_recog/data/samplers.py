"""Identity-balanced sampling for metric learning."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

__all__ = ["PKSampler", "RandomPKSampler", "ResumableDistributedSampler", "SeededBatches"]


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
        num_batches: batches per epoch; 0 = as many as the chunks fill (exhausted identities are refilled when
            more are asked for).
    """

    def __init__(self, pids: Sequence[int], num_identities: int, num_instances: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_batches: int = 0) -> None:  # fmt: skip
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
        self.num_batches = num_batches or max(chunks // per_step, 1)

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


class RandomPKSampler(Sampler[list[int]]):
    """P x K batches for data sets of millions of images and hundreds of thousands of identities (LUPerson-NL).

    Each step is drawn on its own from (seed, epoch, step): P x world distinct identities, each with probability
    proportional to its number of images (the identities of uniformly drawn images), rank r taking the r-th group of
    P, and K images of each (without replacement where it has K, with replacement otherwise). Memory is three integer
    arrays over the images, work per step O(P x K x world), and an epoch can start at any step at no cost (resume).
    Unlike `PKSampler`, an epoch does not visit every image exactly once.

    Args:
        pids: the identity of every sample (any integer array-like).
        num_identities, num_instances: P per process and K.
        rank, world_size: this process and the number of processes.
        seed: base seed, shared by all ranks.
        num_batches: batches per epoch; 0 = images // (P x K x world).
    """

    def __init__(self, pids: Sequence[int] | np.ndarray, num_identities: int, num_instances: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_batches: int = 0) -> None:  # fmt: skip
        pids = np.asarray(pids)
        self.order = np.argsort(pids, kind="stable")  # the images grouped by identity
        _, self.starts, self.counts = np.unique(pids[self.order], return_index=True, return_counts=True)
        self.p, self.k, self.rank, self.world = num_identities, num_instances, rank, world_size
        self.seed, self.epoch = seed, 0
        if len(self.counts) < self.p * self.world:
            raise ValueError(
                f"{len(self.counts)} identities cannot fill a step of {self.p} identities per process x {self.world} "
                f"processes; lower data.num_identities or the number of processes"
            )
        self.num_batches = num_batches or max(len(pids) // (self.p * self.k * self.world), 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _identities(self, rng: np.random.Generator) -> np.ndarray:
        """P x world distinct identities, image-weighted; uniform over the rest if a few huge ones keep recurring."""
        need, n = self.p * self.world, int(self.counts.sum())
        chosen = np.empty(0, dtype=np.int64)
        for _ in range(8):
            ids = np.searchsorted(self.starts, rng.integers(0, n, 2 * need), side="right") - 1
            ids = np.concatenate([chosen, ids])
            _, first = np.unique(ids, return_index=True)
            chosen = ids[np.sort(first)][:need]
            if len(chosen) == need:
                return chosen
        rest = np.setdiff1d(np.arange(len(self.counts)), chosen)
        return np.concatenate([chosen, rng.choice(rest, need - len(chosen), replace=False)])

    def batch(self, b: int) -> list[int]:
        """Batch `b` of the current epoch on this rank."""
        ids = self._identities(np.random.default_rng([self.seed, self.epoch, b]))[self.rank * self.p :][: self.p]
        rng = np.random.default_rng([self.seed, self.epoch, b, self.rank, 1])
        out = []
        for j in ids:
            n = int(self.counts[j])
            offsets = rng.choice(n, self.k, replace=n < self.k)
            out.extend(self.order[self.starts[j] + offsets].tolist())
        return out

    def iter_from(self, start: int) -> Iterator[tuple[int, list[int]]]:
        """(b, batch b) from batch `start` on, without drawing the ones before."""
        return ((b, self.batch(b)) for b in range(start, self.num_batches))

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for _, batch in self.iter_from(0))

    def __len__(self) -> int:
        return self.num_batches


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of an epoch from batch `start` on, each index paired with the seed of its augmentation.

    What makes a run resumable in the middle of an epoch: the epoch's batches come in the same order whatever batch
    it starts from (the wrapped sampler is a function of seed and epoch), and each sample's augmentation is drawn from
    a seed of its own, a function of (seed, epoch, rank, batch, position in the batch), which `ImageDataset` uses for
    the transform. Augmentation then depends neither on where the epoch started nor on the number of DataLoader
    workers, and the same image twice in one batch (PK sampling with replacement) is augmented twice differently.

    Args:
        batches: a batch sampler (PKSampler, or BatchSampler over a DistributedSampler); its `set_epoch` (or that of
            the sampler a BatchSampler wraps) is called by `set_epoch`.
        seed: base seed of the run.
        rank: this process.
    """

    def __init__(self, batches: Sampler[list[int]], seed: int, rank: int = 0) -> None:
        self.batches, self.seed, self.rank = batches, seed, rank
        self.epoch, self.start, self.by_samples = 0, 0, False

    def set_epoch(self, epoch: int, start: int = 0, consumed: int = 0) -> None:
        """Iterate epoch `epoch`, skipping its first `start` batches (they were trained before a checkpoint).

        Args:
            consumed: when the checkpoint was written by another number of processes, the samples of the epoch all of
                them had trained on: a ResumableDistributedSampler starts after them (its batches then numbered from
                `start`); other samplers skip `start` batches of this run's plan.
        """
        self.epoch, self.start = epoch, start
        inner = self.batches.sampler if isinstance(self.batches, BatchSampler) else self.batches
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        self.by_samples = hasattr(inner, "set_consumed") and consumed > 0
        if hasattr(inner, "set_consumed"):
            inner.set_consumed(consumed)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.by_samples:  # the sampler already starts after the samples trained on
            batches = enumerate(self.batches, self.start)
        elif hasattr(self.batches, "iter_from"):  # each batch drawn on its own: start where asked
            batches = self.batches.iter_from(self.start)
        else:  # the plan of the whole epoch is still drawn, so the remaining batches are the same
            batches = ((b, batch) for b, batch in enumerate(self.batches) if b >= self.start)
        for b, batch in batches:
            seeds = np.random.default_rng([self.seed, self.epoch, self.rank, b]).integers(0, 2**62, len(batch))
            yield [(int(i), int(s)) for i, s in zip(batch, seeds)]

    def __len__(self) -> int:
        """Batches of a whole epoch, also when it starts later: iteration numbers stay those of the full epoch."""
        return len(self.batches)


class ResumableDistributedSampler(DistributedSampler):
    """A DistributedSampler (drop_last) that can start an epoch after the samples a run on another number of
    processes already trained on.

    The epoch's permutation depends on (seed, epoch) only, and rank r of W takes its positions r, r + W, ...: after
    every rank has drawn n samples, the run has consumed exactly the first n x W of the permutation, whatever W was.
    `set_consumed(c)` makes this run split the rest of the permutation (from position c) over its own processes, so
    no sample of the epoch is trained twice or skipped (but those of an incomplete last batch).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.consumed = 0

    def set_consumed(self, consumed: int) -> None:
        """Start the epoch at position `consumed` of its permutation (0: the whole epoch)."""
        self.consumed = consumed

    def __iter__(self) -> Iterator[int]:
        if not self.consumed:
            return super().__iter__()
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()[: self.total_size]  # DistributedSampler's
        rest = order[self.consumed :]
        rest = rest[: len(rest) // self.num_replicas * self.num_replicas]
        return iter(rest[self.rank :: self.num_replicas])
