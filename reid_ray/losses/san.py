"""SAN's decoder losses (Jin et al., "Semantics-Aligned Representation Learning for Person
Re-identification", AAAI 2020, Sec. 3).

Reconstruction (L_rec): L1 between the decoded texture T̂ and the pseudo ground-truth texture T,
per sample (no cross-worker communication under DDP):
    L_rec = 1/B Σ_b 1/(3·H·W) ‖T̂_b - T_b‖_1                T̂, T: (B, 3, H, W), normalised alike
Triplet ReID constraints (L_TR) on the decoder: the block features of the same identity are
pulled together and pushed from other identities, here as batch-hard triplets (margin m = 0.3)
on each up-sampling block's globally pooled output, averaged over the blocks:
    L_TR = 1/|S| Σ_{s ∈ S} L_tri(GAP(D_s(x)), y)            D_s(x) pooled: (B, C_s)
"""

from __future__ import annotations

import torch
from torch import nn

from reid_ray.losses.triplet import TripletLoss


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W), (B, 3, H, W) -> scalar: the mean absolute error."""
    return (pred.float() - target.float()).abs().mean()


class DecoderTripletLoss(nn.Module):
    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.triplet = TripletLoss(margin)

    def forward(self, block_feats: list[torch.Tensor] | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """block_feats: one (B, C_s) pooled feature per decoder block; labels (B,) -> scalar."""
        return torch.stack([self.triplet(f.float(), labels) for f in block_feats]).mean()
