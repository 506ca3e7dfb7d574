"""Mutual Mean-Teaching losses (Ge et al., "Mutual Mean-Teaching: Pseudo Label Refinery for
Unsupervised Domain Adaptation on Person Re-identification", ICLR 2020).

Soft cross entropy (Eq. 6): the other network's mean-net class probabilities as targets,
    L_sid = mean_i  -Σ_c softmax(z_ref_i)_c · log softmax(z_i)_c
Softmax-triplet (Eq. 7-8): with batch-hard mining on the student's distances,
    τ_i = exp(d_an) / (exp(d_ap) + exp(d_an))
hard labels (MMT's L_tri, margin-free form): L = mean_i -log τ_i
soft labels (L_stri): the reference τ computed from the other mean-net's distances
at the same (positive, negative) pairs, L = mean_i BCE(τ_i, τ_ref_i).
Shapes: logits (B, C); features (B, D); labels (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.losses.triplet import euclidean_dist


class SoftCrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        target = F.softmax(ref_logits, dim=1).detach()
        return (-target * F.log_softmax(logits, dim=1)).sum(1).mean()


def _mine(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the hardest positive and hardest negative of each anchor."""
    same = labels[:, None] == labels[None, :]
    ap = dist.masked_fill(~same, float("-inf")).argmax(1)
    an = dist.masked_fill(same, float("inf")).argmin(1)
    return ap, an


class SoftmaxTripletLoss(nn.Module):
    """Hard labels when `ref_feats` is None (-log τ); soft targets from `ref_feats` otherwise (BCE)."""

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, ref_feats: torch.Tensor | None = None):
        dist = euclidean_dist(feats, feats)
        ap, an = _mine(dist.detach(), labels)
        rows = torch.arange(len(feats), device=feats.device)
        log_tau = F.log_softmax(torch.stack([dist[rows, ap], dist[rows, an]], 1), dim=1)  # [log(1-τ), log τ]
        if ref_feats is None:
            return -log_tau[:, 1].mean()
        ref = euclidean_dist(ref_feats, ref_feats).detach()
        target = F.softmax(torch.stack([ref[rows, ap], ref[rows, an]], 1), dim=1)
        return (-target * log_tau).sum(1).mean()
