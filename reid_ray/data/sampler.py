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


def group_by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    """Dataset indices per label; negative labels (un-clustered outliers) are left out."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        if lab >= 0:
            by_label[int(lab)].append(i)
    return by_label


def rank_share(stream: Sequence[int], batch: int, num_replicas: int, rank: int, base: int) -> Iterator[tuple[int, int]]:
    """(index, augmentation seed) of rank r's contiguous share of every full global batch of `stream`; the
    seed is fixed by the place in the stream, so 1 or N workers see the same batches and augmentations."""
    share = batch // num_replicas
    for b in range(len(stream) // batch):
        lo = b * batch + rank * share
        for pos in range(lo, lo + share):
            yield int(stream[pos]), (base + pos) % 2**63


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
        self.by_label = group_by_label(labels)  # un-clustered outliers (negative labels) are never sampled
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


class CrossCameraSampler(Sampler[int]):
    """Pseudo-label sampling as the authors' `RandomMultipleGallerySampler` (MMT, SpCL), DDP-aware.

    One pass visits every label once, in a random order: an anchor image at random, then K - 1 more of
    the same label from other cameras when it has some (else from its own camera), drawn without
    replacement when there are enough; a label of one image (an un-clustered instance) gives just that
    image. The groups are concatenated and cut into global batches of `batch_size` (the last, partial one
    dropped); rank r takes its contiguous share of each, so 1 or N workers see the same global batches.
    Yields (index, augmentation seed), the seed fixed by the place in the pass. Negative labels are skipped.
    """

    def __init__(self, labels: Sequence[int], camids: Sequence[int], num_instances: int = 4, batch_size: int = 64,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if batch_size % num_replicas:
            raise ReidRayError(f"batch size {batch_size} must divide evenly over {num_replicas} workers")
        self.k, self.batch = num_instances, batch_size
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.camids = np.asarray(camids)
        self.by_label = group_by_label(labels)
        self.labels_sorted = sorted(self.by_label)
        if sum(min(len(v), self.k) for v in self.by_label.values()) < batch_size:
            raise ReidRayError(f"pseudo-label sampling: fewer images than one batch of {batch_size}; lower the batch size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream(self) -> list[int]:
        """This pass's indices, group after group."""
        rng = np.random.default_rng([self.seed, self.epoch, 11])
        out: list[int] = []
        for lab in rng.permutation(self.labels_sorted):
            members = np.asarray(self.by_label[int(lab)])
            anchor = int(rng.choice(members))
            out.append(anchor)
            others = members[members != anchor]
            if not len(others):
                continue
            other_cams = others[self.camids[others] != self.camids[anchor]]
            pool = other_cams if len(other_cams) else others
            out.extend(int(i) for i in rng.choice(pool, size=self.k - 1, replace=len(pool) < self.k - 1))
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + 11
        return rank_share(self.stream(), self.batch, self.num_replicas, self.rank, base)

    def __len__(self) -> int:
        return len(self.stream()) // self.batch * (self.batch // self.num_replicas)
