from collections import Counter

import pytest

from dino_recog.data.samplers import PKSampler


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
