"""PairedLoader / ShuffleSampler: uniform target sampling, identical global batches on 1 or N ranks."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from reid_ray import ReidRayError
from reid_ray.data.loader import epoch_batches
from reid_ray.data.paired import PairedLoader, ShuffleSampler, build_shuffle_loader


class Indexed(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        i, seed = item
        return {"img": torch.tensor([float(i)]), "index": i, "seed": seed}


def test_each_epoch_is_a_permutation_and_ranks_partition_the_global_batches():
    single = list(ShuffleSampler(20, 8, 1, 0, seed=3))
    assert len(single) == 16 and len({i for i, _ in single}) == 16
    ranks = [list(ShuffleSampler(20, 8, 2, r, seed=3)) for r in range(2)]
    merged = []
    for b in range(2):  # rank 0 then rank 1 within each global batch == the single-process order
        merged += ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4]
    assert merged == single
    s = ShuffleSampler(20, 8, 1, 0, seed=3)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in single]


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ReidRayError, match="divide evenly"):
        ShuffleSampler(20, 9, 2, 0)
    with pytest.raises(ReidRayError, match="fewer than one batch"):
        ShuffleSampler(5, 8, 1, 0)


def test_paired_loader_zips_and_restarts_the_shorter_source():
    source = build_shuffle_loader(Indexed(8), 4, seed=1)      # 2 batches an epoch
    target = build_shuffle_loader(Indexed(24), 4, seed=2)     # 6 batches an epoch
    loader = PairedLoader(source, target)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert set(batches[0]) == {"img", "index", "seed", "t_img", "t_index", "t_seed"}
    assert sorted(torch.cat([b["t_index"] for b in batches]).tolist()) == list(range(24))
    first_pass = torch.cat([b["index"] for b in batches[:2]]).tolist()
    assert sorted(first_pass) == list(range(8))
    assert torch.cat([b["index"] for b in batches[2:4]]).tolist() != first_pass  # reshuffled source pass
    assert isinstance(source, DataLoader)


def _indices(batches):
    return [b["index"].tolist() for b in batches]


def test_iters_restart_the_loader_with_a_new_seed_each_pass():
    loader = build_shuffle_loader(Indexed(12), 4, seed=5)   # 3 batches a pass
    loader.sampler.set_epoch(2)
    batches = list(epoch_batches(loader, 8))
    assert len(batches) == 8
    passes = [sorted(sum(_indices(batches[i:i + 3]), [])) for i in (0, 3)]
    assert passes == [list(range(12))] * 2                     # each pass a whole permutation...
    assert _indices(batches[:3]) != _indices(batches[3:6])      # ... drawn anew
    loader.sampler.set_epoch(2)
    assert _indices(epoch_batches(loader, 8)) == _indices(batches)  # a function of (seed, epoch): resumable
    loader.sampler.set_epoch(3)
    assert _indices(epoch_batches(loader, 8)) != _indices(batches)
    loader.sampler.set_epoch(2)
    assert _indices(epoch_batches(loader, None)) == _indices(batches[:3])  # no iters: one pass


def test_iters_give_the_same_global_batches_on_two_ranks():
    def run(world):
        out = []
        for r in range(world):
            loader = build_shuffle_loader(Indexed(12), 4, rank=r, world_size=world, seed=5)
            loader.sampler.set_epoch(1)
            out.append(_indices(epoch_batches(loader, 7)))
        return [sum((out[r][b] for r in range(world)), []) for b in range(7)]
    assert run(2) == run(1)


def test_paired_loader_source_passes_depend_on_the_epoch_only():
    def epoch(e):
        source = build_shuffle_loader(Indexed(8), 4, seed=1)
        loader = PairedLoader(source, build_shuffle_loader(Indexed(24), 4, seed=2))
        loader.sampler.set_epoch(e)
        return [b["index"].tolist() for b in loader]
    assert epoch(3) == epoch(3)  # not a count carried over from earlier epochs: a resumed run sees the same
