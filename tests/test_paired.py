"""PairedLoader / ShuffleSampler: uniform target sampling, identical global batches on 1 or N ranks."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from reid_ray import ReidRayError
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
