"""Cluster Contrast's cluster memory and loss (Dai et al., "Cluster Contrast for Unsupervised Person
Re-Identification", ACCV 2022; the authors' `clustercontrast/models/cm.py`).

The memory holds one unit row c_k per pseudo-label (cluster) k, set at every refresh to the cluster's mean
feature, L2-normalised. For a unit feature f with cluster y, the loss is InfoNCE over the clusters:

    L_f = −log  exp(⟨f, c_y⟩/τ) / Σ_k exp(⟨f, c_k⟩/τ)          (τ = 0.05)

averaged over the batch. After the backward, the rows of the batch's clusters move towards their images:

    momentum   c_y ← m·c_y + (1 − m)·f,  c_y ← c_y/‖c_y‖₂   for every image, one after another in the batch's
               order (a cluster appears K times in a P×K batch): the authors' `CM`, their default since
               2021-11 ("batch hard update ... is sensitive to parameters")
    hard       the same update once per cluster, with the batch's image least similar to c_y (argmin ⟨f, c_y⟩):
               the authors' `CM_Hard` (`--use-hard`), the paper's first version

m is the weight of the old row (`--momentum 0.1` in the authors' commands). As SpCL's memory, the product is
`losses/memory.MemoryProduct`, which updates in `backward` after the gradient has used the old rows; under DDP the
module all-gathers the features and labels to write in `forward` (rank order), so every rank applies the same
update of the global batch, as the authors' single-process DataParallel batch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.losses.memory import MemoryProduct, all_gather_rows
from reid_ray.losses.spcl import momentum_update

UPDATES = ("momentum", "hard")


@torch.no_grad()
def hard_update(memory: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, momentum: float) -> None:
    """Each cluster of the batch once, with its image least similar to the row (the first such on a tie)."""
    sims = (feats.to(memory.dtype) * memory[labels]).sum(1)
    for label in torch.unique(labels):
        (at,) = torch.nonzero(labels == label, as_tuple=True)
        x = feats[at[torch.argmin(sims[at])]].to(memory.dtype)
        memory[label] = F.normalize(momentum * memory[label] + (1 - momentum) * x, dim=0)


class ClusterMemory(nn.Module):
    """The cluster rows, as a buffer (checkpointed, never optimised); `reset` at every pseudo-label refresh."""

    def __init__(self, num_features: int, temp: float = 0.05, momentum: float = 0.1, update: str = "momentum"):
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"update={update!r}: valid: {', '.join(UPDATES)}")
        self.temp, self.momentum, self.update = temp, momentum, update
        self.register_buffer("features", torch.zeros(0, num_features))

    @torch.no_grad()
    def reset(self, centroids: torch.Tensor) -> None:
        """One row per cluster: its mean feature, L2-normalised (the authors' memory at each epoch's start)."""
        self.features = F.normalize(centroids.to(self.features.device, torch.float32), dim=1)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's mean InfoNCE of features `inputs` (B, d; normalised here) against the rows of `labels` (B,)."""
        inputs = F.normalize(inputs, dim=1)
        write_feats, write_labels = all_gather_rows(inputs.detach()), all_gather_rows(labels)
        fn = momentum_update if self.update == "momentum" else hard_update
        scores = MemoryProduct.apply(inputs, self.features, write_feats, write_labels, self.momentum, fn)
        return F.cross_entropy(scores / self.temp, labels)
