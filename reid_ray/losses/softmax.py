"""Label-smoothed cross entropy (Szegedy et al., CVPR 2016; used by BoT, Luo et al. 2019).

    q_i = 1 - ε + ε/C  if i = y,  else ε/C
    L = Σ_i -q_i log p_i                       (averaged over the batch)
"""

from __future__ import annotations

import torch
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits (B, C), targets (B,) int64 -> scalar."""
        log_probs = torch.log_softmax(logits, dim=1)
        c = logits.shape[1]
        q = torch.full_like(log_probs, self.epsilon / c)
        q.scatter_(1, targets[:, None], 1 - self.epsilon + self.epsilon / c)
        return (-q * log_probs).sum(1).mean()
