"""ECN's exemplar memory and invariance loss (Zhong et al., "Invariance Matters: Exemplar Memory
for Domain Adaptive Person Re-identification", CVPR 2019; authors' code `reid/loss/invariance.py`).

The memory K (N_t, d) holds one L2-normalised slot per target training image, zero-initialised.
For a target feature f = f(x_{t,i}) (B, d), unit norm:
    p(j | x_{t,i}) = exp(K[j]ᵀ f / β) / Σ_{j'} exp(K[j']ᵀ f / β)                   (Eq. 3)
and after the step, for the images of the (global) batch:
    K[i] ← α·K[i] + (1 − α)·f(x_{t,i}),   K[i] ← K[i] / ‖K[i]‖₂                    (Eq. 2)
Exemplar invariance (Eq. 4) is L = −log p(i | x_{t,i}); camera invariance (Eq. 5) is the same loss
on a CamStyle image x̂_{t,i}; neighbourhood invariance (Eqs. 6-7) spreads the target over the k
slots most similar to f:
    w_{i,j} = 1/k for j ∈ M(x_{t,i}, k),  w_{i,i} = 1,   L = −Σ_j w_{i,j} log p(j | x_{t,i}).
As in the authors' `smooth_hot`, M is the top-k of *all* slots by K·f (the own slot included: when
it is among them, only k − 1 other slots get 1/k), the own slot is then set to 1, and the target
vector is not renormalised (it sums to 1 + (k − 1)/k or 2).

The authors' `ExemplarMemory` is a legacy (non-static) autograd Function that updates K inside
`backward`, one sample at a time. Here K·f is `losses/memory.MemoryProduct` (a static Function:
vectorised update, also in `backward`, after K has served the gradient) inside a small Module that,
under DDP, all-gathers the rows to write and their indices in `forward`, so every rank applies the
same update and the memories stay identical (collectives never run inside `backward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.losses.memory import MemoryProduct, all_gather_rows


@torch.no_grad()
def update_memory(memory: torch.Tensor, feats: torch.Tensor, indices: torch.Tensor, alpha: float) -> None:
    """Eq. 2 in place: memory (N, d); feats (B, d); indices (B,) distinct int64; 0 ≤ alpha ≤ 1."""
    new = alpha * memory[indices] + (1 - alpha) * feats.to(memory.dtype)
    memory[indices] = F.normalize(new, dim=1)


class ExemplarMemory(nn.Module):
    """The exemplar memory K (a buffer: saved in state dicts, never optimised)."""

    def __init__(self, num_samples: int, num_features: int):
        super().__init__()
        self.register_buffer("memory", torch.zeros(num_samples, num_features))

    def forward(self, inputs: torch.Tensor, indices: torch.Tensor, alpha: float,
                write: torch.Tensor | None = None) -> torch.Tensor:
        """Similarities K·f (B, N) of inputs (B, d) (Eq. 3 before the 1/β); after backward, the rows
        selected by the bool mask `write` (default: all) of every rank are written to slots `indices`.
        """
        rows = inputs if write is None else inputs[write]
        idx = indices if write is None else indices[write]
        feats, idx = all_gather_rows(rows.detach()), all_gather_rows(idx)
        return MemoryProduct.apply(inputs, self.memory, feats, idx, float(alpha), update_memory)


def neighbourhood_targets(sims: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """w (B, N) of Eq. 6, as the authors' `smooth_hot`: 1/k on the top-k slots by similarity, 1 on i."""
    top = sims.topk(k, dim=1).indices
    w = torch.zeros_like(sims).scatter_(1, top, 1.0 / k)
    return w.scatter_(1, indices[:, None], 1.0)


def invariance_loss(logits: torch.Tensor, indices: torch.Tensor, knn: int = 0) -> torch.Tensor:
    """logits = K·f/β (B, N), indices (B,) -> scalar. knn = 0: Eq. 4/5 (cross entropy on the own
    slot); knn = k > 0: Eqs. 7-8 with the neighbourhood targets (batch mean, as the authors)."""
    if knn <= 0:
        return F.cross_entropy(logits, indices)
    w = neighbourhood_targets(logits.detach(), indices, knn)
    return -(w * F.log_softmax(logits, dim=1)).sum(1).mean()
