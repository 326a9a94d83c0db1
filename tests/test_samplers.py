from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from dino_recog.data import datasets as ds
from dino_recog.data.samplers import PKSampler, RandomPKSampler, SeededBatches
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


def test_random_pk_gives_distinct_identities_across_ranks_k_images_each_and_starts_anywhere():
    pids = np.array(make_pids())[np.random.default_rng(0).permutation(len(make_pids()))]  # not grouped
    ranks = [RandomPKSampler(pids, 3, 4, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(ranks[0]) == len(pids) // (3 * 4 * 2)
    for s in ranks:
        s.set_epoch(2)
    for b in range(len(ranks[0])):
        step = [ranks[r].batch(b) for r in range(2)]
        ids = [[int(pids[i]) for i in batch] for batch in step]
        for batch in ids:  # P x K: K images of each identity, in a row
            assert len(batch) == 12 and all(len(set(batch[j : j + 4])) == 1 for j in range(0, 12, 4))
        groups = [set(batch) for batch in ids]
        assert len(groups[0]) == len(groups[1]) == 3 and not groups[0] & groups[1]  # no identity on both ranks
        for batch in step:  # without replacement where the identity has K images
            for j in range(0, 12, 4):
                chunk = batch[j : j + 4]
                assert len(set(chunk)) == 4 or (pids == pids[chunk[0]]).sum() < 4
    full = list(ranks[0])
    assert [b for _, b in ranks[0].iter_from(2)] == full[2:]  # a resumed epoch draws what the whole one would
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != full
    assert len(RandomPKSampler(pids, 3, 4, num_batches=50)) == 50


def test_random_pk_draws_identities_in_proportion_to_their_images():
    pids = np.repeat(np.arange(40), np.where(np.arange(40) < 20, 2, 20))  # 20 ids x 2 images, 20 ids x 20
    s = RandomPKSampler(pids, 4, 2, seed=0, num_batches=2000)
    drawn = Counter(int(pids[i]) for b in s for i in b[::2])
    small, large = sum(drawn[i] for i in range(20)), sum(drawn[i] for i in range(20, 40))
    # image-weighted: the identities with 10x the images are drawn about 10x as often (4 distinct of 40 a step
    # pulls it a little towards 1; uniform over identities would give 1)
    assert 7 < large / small < 11, (small, large)
    with pytest.raises(ValueError, match="40 identities cannot fill a step of 8 identities per process x 6 processes"):
        RandomPKSampler(pids, 8, 2, world_size=6)


def test_seeded_batches_start_a_random_pk_epoch_where_asked():
    pids = make_pids()
    inner = RandomPKSampler(pids, 2, 2, seed=1)
    whole = SeededBatches(inner, seed=4)
    whole.set_epoch(1)
    later = SeededBatches(RandomPKSampler(pids, 2, 2, seed=1), seed=4)
    later.set_epoch(1, start=3)
    assert list(later) == list(whole)[3:] and len(later) == len(whole)
