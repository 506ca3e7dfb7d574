"""SpCL's hybrid memory and unified contrastive loss (Ge et al., "Self-paced Contrastive Learning with
Hybrid Memory for Domain Adaptive Object Re-ID", NeurIPS 2020, Sec. 3.1-3.2; authors' `spcl/models/hm.py`).

The memory holds M = C_s + N_t unit rows: one centroid w_k per source class, then one instance
feature v_i per target training image, and a label per row: the source class for w_k, and for v_i
its target cluster, or a label of its own when i is un-clustered. A label's "prototype" is the mean
of its rows, so a target cluster's centroid c_k is recomputed from its instances at every step.
For a unit feature f with positive prototype z⁺ (Eq. 2):

    L_f = −log  exp(⟨f, z⁺⟩/τ) / ( Σ_k exp(⟨f, w_k⟩/τ) + Σ_k exp(⟨f, c_k⟩/τ) + Σ_k exp(⟨f, v_k⟩/τ) )

with ⟨f, c_k⟩ the mean of ⟨f, v⟩ over the cluster's rows (the authors average the similarities, which is
the dot product with the unnormalised mean). After the backward, each written row r (a source class's
centroid for a source image, the image's own instance row for a target image) is updated (Eq. 3-4):

    r ← m·r + (1 − m)·f,   r ← r / ‖r‖₂          (m = momentum, 0.2 in the paper)

one sample after another, in the global batch's order, as the authors' loop does (a source class
appears K times in a P×K batch). As ECN's memory, the product is `losses/memory.MemoryProduct`, which
updates in `backward`, after the gradient has used the old rows; under DDP the module all-gathers the rows
to write and their indices in `forward`, so every rank applies the same update. Each call's backward thus
updates the memory before the backward of any earlier call runs (autograd takes the later call first): a
method that calls the memory twice, source batch then target batch, as the authors' trainer does, takes
the source gradient against rows the target batch has already moved (`methods/spcl.py`, `memory_calls`).

A label with no row in the memory (possible only where the labels leave a gap) is masked out of the
softmax, as the authors' mask of labels with rows does, rather than entering it with a logit of 0. The
authors' masked softmax (exp without the max shift, +1e-6) is computed here as a stable log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.losses.memory import MemoryProduct, all_gather_rows


@torch.no_grad()
def momentum_update(memory: torch.Tensor, feats: torch.Tensor, indices: torch.Tensor, momentum: float) -> None:
    """Eq. 3-4 in place, one sample at a time in batch order: a row written twice takes both, in turn."""
    n = len(indices)
    if n == 0:
        return
    sorted_idx, perm = torch.sort(indices, stable=True)
    pos = torch.arange(n, device=indices.device)
    first = torch.ones(n, dtype=torch.bool, device=indices.device)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    occurrence = torch.empty_like(pos)
    occurrence[perm] = pos - start            # 0 for an index's first appearance in the batch, 1 for its second...
    for r in range(int(occurrence.max()) + 1):
        sel = occurrence == r
        rows = indices[sel]
        new = momentum * memory[rows] + (1 - momentum) * feats[sel].to(memory.dtype)
        memory[rows] = F.normalize(new, dim=1)


def unified_contrastive_loss(logits: torch.Tensor, row_labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per sample (B,): logits (B, M) = ⟨f, row⟩/τ; each label's logit is the mean over its rows, and
    a label without rows stays out of the softmax."""
    num_labels = int(row_labels.max()) + 1
    counts = torch.bincount(row_labels, minlength=num_labels)
    per_label = torch.zeros(logits.shape[0], num_labels, device=logits.device, dtype=logits.dtype)
    per_label.index_add_(1, row_labels, logits)
    per_label = (per_label / counts.clamp(min=1).to(logits.dtype)).masked_fill(counts == 0, float("-inf"))
    return F.cross_entropy(per_label, targets, reduction="none")


class HybridMemory(nn.Module):
    """Rows (source centroids, then target instances) and their labels, as buffers (checkpointed, never optimised)."""

    def __init__(self, num_features: int, num_rows: int, temp: float = 0.05, momentum: float = 0.2):
        super().__init__()
        self.temp, self.momentum = temp, momentum
        self.register_buffer("features", torch.zeros(num_rows, num_features))
        self.register_buffer("labels", torch.arange(num_rows))

    def forward(self, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (B,) of unit features `inputs` (B, d) whose own rows are `rows` (B,)."""
        write_feats, write_rows = all_gather_rows(inputs.detach()), all_gather_rows(rows)
        scores = MemoryProduct.apply(inputs, self.features, write_feats, write_rows, self.momentum, momentum_update)
        logits = scores / self.temp
        return unified_contrastive_loss(logits, self.labels, self.labels[rows])
