"""Source + target batches side by side, for methods that train on both domains at once (ECN, MAR).

    source = build_train_loader(src_table, src_labels, tcfg, lcfg, rank=r, world_size=w, seed=s)
    target = build_shuffle_loader(tgt_dataset, global_batch=64, rank=r, world_size=w, seed=s)
    loader = PairedLoader(source, target)
    loader.sampler.set_epoch(epoch)
    for batch in loader:      # source keys as they are ("img", "label", ...), target keys prefixed "t_"
        ...

The target loader draws images uniformly without replacement (ECN and MAR sample the
target at random, not by identity); like PKSampler, rank r takes its contiguous share of
every global batch, so 1 or N workers see the same global batches and augmentations.
One pass of the target set is one pass of the loader; the source loader is restarted when it runs out.
Each of the two loaders finishes its own batches (`loader.FinishingLoader`: uint8 images made float on the
training process's device), so the `t_` images arrive finished, as the source's do.
An epoch of a fixed number of iterations restarts the whole loader (`data.loader.epoch_batches`, as the
authors' `IterLoader`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from reid_ray import ReidRayError
from reid_ray.data.sampler import rank_share


class ShuffleSampler(Sampler):
    """Yields (index, augmentation seed) for one rank of a uniformly shuffled, DDP-sharded epoch."""

    def __init__(self, n: int, global_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % num_replicas:
            raise ReidRayError(f"batch size {global_batch} must divide evenly over {num_replicas} workers")
        if n < global_batch:
            raise ReidRayError(f"the target set has {n} images, fewer than one batch of {global_batch}; "
                               "lower the batch size")
        self.n, self.batch, self.num_replicas, self.rank = n, global_batch, num_replicas, rank
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        base = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + 7) % 2**62
        return rank_share(perm, self.batch, self.num_replicas, self.rank, base)

    def __len__(self) -> int:
        return self.n // self.batch * (self.batch // self.num_replicas)


def build_shuffle_loader(dataset: Dataset, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                         lcfg=None) -> DataLoader:
    """A loader over `dataset` (items indexed by (index, seed)) with this rank's share of each global batch;
    `lcfg` (a LoaderConfig) sets its processes and pinning (none by default)."""
    from reid_ray.data.loader import make_loader

    sampler = ShuffleSampler(len(dataset), global_batch, world_size, rank, seed)
    return make_loader(dataset, lcfg, batch_size=global_batch // world_size, sampler=sampler, drop_last=True)


class _BothSamplers:
    def __init__(self, *samplers):
        self.samplers, self.epoch = samplers, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.samplers:
            s.set_epoch(epoch)


class PairedLoader:
    """Zips a source loader with a target loader, the target's batches under `prefix` keys; one pass is one pass of
    the target loader (`lead="target"`) or of the source loader (`lead="source"`), the other restarted whenever it
    runs out, its epoch e + 1_000·c on its c-th restart (a function of (seed, epoch): resumable)."""

    def __init__(self, source: DataLoader, target: DataLoader, prefix: str = "t_", lead: str = "target"):
        self.source, self.target, self.prefix, self.lead = source, target, prefix, lead
        self.sampler = _BothSamplers(source.sampler, target.sampler)

    def __len__(self) -> int:
        return len(self.target if self.lead == "target" else self.source)

    def __iter__(self) -> Iterator[dict]:
        lead, other = (self.target, self.source) if self.lead == "target" else (self.source, self.target)
        it, start, cycles = iter(other), other.sampler.epoch, 0
        for lb in lead:
            try:
                ob = next(it)
            except StopIteration:  # a new pass of the other loader, its order a function of (epoch, pass)
                cycles += 1
                other.sampler.set_epoch(start + 1_000 * cycles)
                it = iter(other)
                ob = next(it)
            sb, tb = (ob, lb) if self.lead == "target" else (lb, ob)
            yield {**sb, **{self.prefix + k: v for k, v in tb.items()}}
