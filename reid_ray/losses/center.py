"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016),
as BoT adds it (Luo et al., CVPRW 2019, Sec. 4.5; the authors' layers/center_loss.py and engine/trainer.py).

One learnable centre c_j per training identity (C, D), drawn from N(0, 1) as the authors do. With the
squared distances clamped to [1e-12, 1e12] (the authors' numerical guard; outside it the gradient is 0):
    L_C = 1/B Σ_i ||f_i - c_{y_i}||²                  (B the batch; the paper writes ½ Σ_i, the code this)
The network sees β·L_C (β = `center_loss_weight`, 0.0005) through its own optimiser; the centres take their
own plain SGD step (lr 0.5, no momentum, no weight decay, no schedule) on the gradient of β·L_C multiplied by
1/β, i.e. on ∂L_C/∂c, so their update does not depend on β:
    c_j ← c_j - lr · 2/B Σ_{i: y_i = j} (c_j - f_i)
`gradient` gives ∂L_C/∂c from features the network's step does not see again (detached), `sgd_step` applies it.
Shapes: features (B, D), labels (B,) int64 in [0, C).
"""

from __future__ import annotations

import torch
from torch import nn


def center_distances(feats: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B,) squared distances ||f_i - c_{y_i}||², clamped to [1e-12, 1e12] (computed as the difference itself,
    exact for close points; the authors expand ||f||² + ||c||² - 2 f·c over all centres, the same value)."""
    d = feats.float() - centers[labels]
    return (d * d).sum(1).clamp(min=1e-12, max=1e12)


class CenterLoss(nn.Module):
    """The centres (a buffer: they never enter the network's optimiser) and L_C. `forward` is the loss the
    network's gradient flows through (the centres held fixed); `gradient` and `sgd_step` move the centres."""

    def __init__(self, num_classes: int, feat_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("centers", torch.randn(num_classes, feat_dim, generator=generator))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_C of a batch (a scalar), differentiable in `feats` only."""
        return center_distances(feats, labels, self.centers).mean()

    def gradient(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """∂L_C/∂c (C, D) at this batch, the features held fixed: the authors' centre gradient times 1/β."""
        with torch.enable_grad():
            c = self.centers.detach().requires_grad_(True)
            loss = center_distances(feats.detach(), labels, c).mean()
            return torch.autograd.grad(loss, c)[0]

    @torch.no_grad()
    def sgd_step(self, grad: torch.Tensor, lr: float, ok: torch.Tensor | None = None) -> None:
        """c ← c - lr·grad (plain SGD); `ok` (a 0/1 device tensor, a device-side skip's flag): 0 leaves the
        centres as they were, whatever the gradient holds (NaN included)."""
        step = grad.to(self.centers.dtype) * lr
        if ok is not None:
            step = torch.where(ok > 0, step, torch.zeros_like(step))
        self.centers.sub_(step)
