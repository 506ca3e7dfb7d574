"""Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017).

For each anchor a in a P×K batch, with Euclidean distances d:
    L_a = [m + max_{p: y_p = y_a} d(a, p) - min_{n: y_n ≠ y_a} d(a, n)]_+      (margin m = 0.3)
or, with soft margin, L_a = log(1 + exp(max_p d(a, p) - min_n d(a, n))). L = mean_a L_a.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D) -> (M, N) Euclidean distances (clamped for a stable gradient at 0)."""
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative distance of each anchor: (B,), (B,)."""
    same = labels[:, None] == labels[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
    d_an = dist.masked_fill(same, float("inf")).min(1).values
    return d_ap, d_an


class TripletLoss(nn.Module):
    def __init__(self, margin: float = 0.3, soft_margin: bool = False):
        super().__init__()
        self.margin, self.soft_margin = margin, soft_margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats (B, D), labels (B,) -> scalar."""
        d_ap, d_an = hard_example_mining(euclidean_dist(feats, feats), labels)
        if self.soft_margin:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()
