"""P×K identity sampling (Hermans et al., "In Defense of the Triplet Loss", 2017), DDP-aware.

Every global batch holds P identities × K images. With W ranks, each rank takes
P/W of the identities of every global batch, so the ranks see disjoint shares
whose union is exactly the single-process batch: the same seed gives the same
global batches on 1 or N workers. Batches are deterministic per (seed, epoch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from reid_ray import ReidRayError


class PKSampler(Sampler[int]):
    """Yields (index, augmentation seed) for one rank; batch with `batch_size=P*K/num_replicas`.

    labels: identity label of every dataset index. Identities with fewer than K
    images are sampled with replacement (as torchreid's RandomIdentitySampler).
    """

    def __init__(self, labels: Sequence[int], num_instances: int = 4, num_identities: int = 16,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_identities % num_replicas:
            raise ReidRayError(f"P={num_identities} identities per batch must divide evenly over "
                               f"{num_replicas} workers; choose P as a multiple of the worker count")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.k, self.p = num_instances, num_identities
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, lab in enumerate(labels):
            if lab >= 0:  # negative labels (un-clustered outliers) are never sampled
                self.by_label[int(lab)].append(i)
        if len(self.by_label) < self.p:
            raise ReidRayError(f"P×K sampling needs at least P={self.p} identities, the data has "
                               f"{len(self.by_label)}; lower num_identities")
        self.labels_sorted = sorted(self.by_label)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        """This epoch's global batches, each a list of P groups of K indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: dict[int, list[list[int]]] = {}
        for lab in self.labels_sorted:
            idxs = np.array(self.by_label[lab])
            if len(idxs) < self.k:
                idxs = rng.choice(idxs, size=self.k, replace=True)
            idxs = rng.permutation(idxs)
            n = len(idxs) // self.k * self.k
            groups[lab] = [idxs[i:i + self.k].tolist() for i in range(0, n, self.k)]
        batches = []
        available = [lab for lab in self.labels_sorted if groups[lab]]
        while len(available) >= self.p:
            chosen = rng.choice(len(available), size=self.p, replace=False)
            batches.append([groups[available[c]].pop() for c in chosen])
            available = [lab for lab in available if groups[lab]]
        return batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(dataset index, augmentation seed) pairs. The seed depends on the sample's place in the
        global batch, not on the rank, so augmentations are the same on 1 or N workers."""
        share = self.p // self.num_replicas
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for b, batch in enumerate(self.global_batches()):
            for g in range(self.rank * share, (self.rank + 1) * share):
                for j, idx in enumerate(batch[g]):
                    yield idx, (base + (b * self.p + g) * self.k + j) % 2**63

    def __len__(self) -> int:
        return len(self.global_batches()) * (self.p // self.num_replicas) * self.k
