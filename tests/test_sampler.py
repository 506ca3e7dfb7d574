from collections import Counter

import numpy as np
import pytest

from reid_ray import ReidRayError
from reid_ray.data.sampler import PKSampler

LABELS = np.repeat(np.arange(20), [3, 5, 8, 4, 6, 2, 9, 4, 4, 5, 7, 4, 4, 3, 6, 10, 4, 5, 4, 4])


def batches(sampler, per_rank):
    idx = [i for i, _ in sampler]
    return [idx[i:i + per_rank] for i in range(0, len(idx), per_rank)]


def test_every_batch_is_p_identities_times_k_images():
    s = PKSampler(LABELS, num_instances=4, num_identities=4, seed=3)
    bs = batches(s, 16)
    assert len(bs) > 3 and len(list(s)) == len(s)
    for b in bs:
        counts = Counter(LABELS[b].tolist())
        assert len(counts) == 4 and set(counts.values()) == {4}


def test_ranks_take_disjoint_shares_whose_union_is_the_single_process_batch():
    single = batches(PKSampler(LABELS, 4, 4, num_replicas=1, seed=7), 16)
    shares = [batches(PKSampler(LABELS, 4, 4, num_replicas=2, rank=r, seed=7), 8) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(single)
    for whole, a, b in zip(single, *shares):
        assert not set(LABELS[a]) & set(LABELS[b])  # different identities on each rank
        assert a + b == whole


def test_deterministic_per_seed_and_epoch():
    a, b = PKSampler(LABELS, 4, 4, seed=1), PKSampler(LABELS, 4, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PKSampler(LABELS, 4, 4, seed=2)) != first


def test_negative_labels_are_never_sampled():
    labels = LABELS.copy()
    labels[:20] = -1
    assert all(labels[i] >= 0 for i, _ in PKSampler(labels, 4, 4))


def test_augmentation_seeds_do_not_depend_on_the_worker_count():
    single = list(PKSampler(LABELS, 4, 4, seed=7))
    split = [list(PKSampler(LABELS, 4, 4, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert sorted(single) == sorted(split[0] + split[1])  # same (index, seed) pairs
    assert len({seed for _, seed in single}) == len(single)  # every sample its own draw


def test_p_must_divide_over_workers():
    with pytest.raises(ReidRayError, match="multiple of the worker count"):
        PKSampler(LABELS, 4, 5, num_replicas=2)
