"""Feature extraction: model + loader -> L2-normalised features with pids and cameras."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, *, flip: bool = False, device: str | torch.device = "cpu",
                     normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, pids (N,), camids (N,)), in loader order.

    The model is called in eval mode on batches of images and must return (B, D)
    features. `flip=True` averages the features of each image and its mirror.
    """
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    for batch in loader:
        img = batch["img"].to(device, non_blocking=True)
        f = model(img)
        if flip:
            f = f + model(torch.flip(img, dims=[3]))
        if normalize:
            f = F.normalize(f, dim=1)
        feats.append(f.float().cpu())
        pids.append(batch["pid"])
        camids.append(batch["camid"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(pids), torch.cat(camids)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (M, N) between rows of x (M, D) and y (N, D)."""
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp_(min=0)
