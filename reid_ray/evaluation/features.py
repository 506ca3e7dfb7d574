"""Feature extraction: model + loader -> L2-normalised features with pids and cameras."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def extract_features(model, loader, *, flip: bool = False, device: str | torch.device = "cpu",
                     normalize: bool = True):
    """(features (N, D) float32 on CPU, pids (N,), camids (N,)), in loader order.

    The model is called in eval mode on batches of images and must return (B, D)
    features. `flip=True` averages the features of each image and its mirror.
    `model` may be a list of models: one pass over the loader (each batch decoded and
    transformed once) feeds them all, and a list of such triples comes back.
    The forward passes run under `torch.inference_mode` (no autograd bookkeeping at all); the
    features are joined outside it, so they come back as ordinary tensors that a memory may update in
    place or a loss may use.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    pids, camids = [], []
    with torch.inference_mode():
        for batch in loader:
            img = batch["img"].to(device, non_blocking=True)
            flipped = torch.flip(img, dims=[3]) if flip else None
            for m, out in zip(models, feats):
                f = m(img)
                if flip:
                    f = f + m(flipped)
                if normalize:
                    f = F.normalize(f, dim=1)
                out.append(f.float().cpu())
            pids.append(batch["pid"])
            camids.append(batch["camid"])
    for m, training in zip(models, was_training):
        m.train(training)
    pid, camid = torch.cat(pids), torch.cat(camids)
    res = [(torch.cat(f), pid, camid) for f in feats]
    return res if isinstance(model, (list, tuple)) else res[0]


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (M, N) between rows of x (M, D) and y (N, D)."""
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp_(min=0)
