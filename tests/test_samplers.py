from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from dino_recog.data import datasets as ds
from dino_recog.data.samplers import PKSampler, SeededBatches
from dino_recog.data.transforms import MultiCropTransform


def make_pids():
    # 20 identities with 1..9 images each (some below K)
    return [pid for pid in range(20) for _ in range(1 + pid % 9)]


def test_batches_are_p_by_k_with_k_per_identity():
    pids = make_pids()
    sampler = PKSampler(pids, num_identities=4, num_instances=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for b in batches:
        assert len(b) == 12
        counts = Counter(pids[i] for i in b)
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_two_ranks_get_disjoint_identities_and_equal_lengths():
    pids = make_pids()
    r0 = PKSampler(pids, 3, 2, rank=0, world_size=2, seed=5)
    r1 = PKSampler(pids, 3, 2, rank=1, world_size=2, seed=5)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(r0) == len(r1)
    for x, y in zip(b0, b1):
        assert not {pids[i] for i in x} & {pids[i] for i in y}


def test_reseeded_per_epoch_and_deterministic():
    pids = make_pids()
    s = PKSampler(pids, 4, 2, seed=0)
    first = list(s)
    assert list(s) == first  # same epoch, same plan
    s.set_epoch(1)
    assert list(s) != first


def test_identities_with_few_images_are_sampled_with_replacement():
    pids = [0, 1, 1, 2, 2, 2]
    batch = next(iter(PKSampler(pids, 3, 4)))
    assert Counter(pids[i] for i in batch) == {0: 4, 1: 4, 2: 4}


def test_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match="3 identities cannot fill a step of 2 identities per process x 2 processes"):
        PKSampler([0, 1, 2], 2, 2, world_size=2)


def test_augmentation_depends_on_neither_workers_nor_the_starting_batch(small_demo, tmp_path):
    paths = sorted(str(p) for p in (small_demo / "lup" / "images").rglob("*.jpg"))[:24]
    dataset = ds.ImageDataset(paths, MultiCropTransform((32, 16), (0.4, 1.0), 2, (16, 8), (0.05, 0.4)))
    batches = SeededBatches(BatchSampler(DistributedSampler(dataset, 1, 0, seed=5), 4, drop_last=True), seed=5)

    def crops(workers: int, start: int) -> list[torch.Tensor]:
        batches.set_epoch(3, start)
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=ds.collate_skip_none,
            generator=torch.Generator(),
        )  # as the training scripts do: no draw from the global stream
        return [torch.cat([c.flatten() for c in batch[0]]) for batch, _ in loader]

    torch.manual_seed(0)
    full = crops(0, 0)
    after = torch.rand(3)  # the main process's stream, which drives stochastic depth, is not touched by augmentation
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
    assert len(full) == 6 and all(torch.equal(a, b) for a, b in zip(full, crops(2, 0)))
    assert all(torch.equal(a, b) for a, b in zip(full[2:], crops(2, 2)))
    # the same image twice in one batch (an identity with fewer than K images) is augmented differently
    pk = SeededBatches(PKSampler([0] * 1 + [1] * 8, 2, 4), seed=0)
    pk_loader = DataLoader(ds.ImageDataset(paths[:9], dataset.transform), batch_sampler=pk,
                           collate_fn=ds.collate_skip_none)  # fmt: skip
    (batch, _), *_ = pk_loader
    first = batch[0][0][[i for i, idx in enumerate(batch[3].tolist()) if idx == 0]]  # global crop 1 of image 0
    assert len(first) == 4 and not torch.equal(first[0], first[1])
