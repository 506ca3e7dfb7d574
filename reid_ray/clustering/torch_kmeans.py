"""k-means and exact kNN in torch: the GPU engine where faiss has no GPU build.

    >>> centroids, labels, objective, iterations = torch_kmeans(x, 500, device=torch.device("cuda"))
    >>> sims, idx = torch_knn(x, 31, device=torch.device("cuda"))
    # callers go through kmeans_labels(..., backend="torch") and knn(..., backend="torch") (kmeans.py)

Why torch: faiss stays the first choice (its GPU build where it is installed, faiss-cpu on every CPU), but
no faiss GPU wheel reaches many GPU boxes: faiss-gpu and faiss-gpu-cu12 are CUDA 12 builds, the CUDA 13
one needs ~311 MiB of cuVS libraries beside it. torch is on every box, and the
PseudoLabeler actor (or rank 0 with `--clustering local`) already holds a GPU share.

The algorithm is faiss's `Clustering::train` (faiss/Clustering.cpp), not k-means++: subsample to
`max_points_per_centroid` × k points; start from k distinct random points; Lloyd iterations (assign
each point to its nearest centroid, move each centroid to the mean of its points); an empty cluster is
re-seeded by splitting a large one (picked with weight size - 1: a copy of its centroid, the two nudged
apart by ±1/1024 in alternate dimensions, as faiss does); stop early once the objective (the sum of
squared distances) no longer decreases, as faiss's `early_stop_threshold = 0`; `nredo` restarts keep the
lowest objective. The draws come from torch's generator, seeded as faiss seeds its own; the float sums run
in another order, so the two agree by objective, not label for label (tests/test_torch_kmeans.py).

Distances are ‖x‖² - 2x·c + ‖c‖², one matmul per block of rows (never `cdist`, never more than
`BLOCK_ELEMENTS` distances at once), in float32 with TF32 off.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

BLOCK_ELEMENTS = 1 << 24  # floats in one block of distances or similarities: 64 MiB
_EPS = 1 / 1024           # faiss's perturbation of a split centroid


@contextlib.contextmanager
def _full_float32():
    """Exact float32 matmuls (no TF32, which a training process may have allowed) for distances."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _rows(columns: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, columns))


def nearest(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance, index) of each row's nearest centroid, block by block of rows."""
    c_sq, step = (c * c).sum(1), _rows(len(c))
    dist = torch.empty(len(x), device=x.device)
    idx = torch.empty(len(x), dtype=torch.int64, device=x.device)
    for lo in range(0, len(x), step):
        d, i = torch.addmm(c_sq, x[lo:lo + step], c.T, alpha=-2).min(1)  # ‖c‖² - 2x·c; ‖x‖² added after
        dist[lo:lo + step], idx[lo:lo + step] = (d + x_sq[lo:lo + step]).clamp_(min=0), i
    return dist, idx


def _split_empty(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """faiss's `split_clusters`: each empty cluster takes half of a large one (weight size - 1)."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    h = counts.double().cpu()
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1
    for ci in empty:
        cj = int(torch.multinomial((h - 1).clamp(min=0), 1, generator=gen))
        c[ci] = c[cj] * (1 + _EPS * sign)
        c[cj] = c[cj] * (1 - _EPS * sign)
        h[ci] = h[cj] / 2
        h[cj] -= h[ci]
    return len(empty)


def _lloyd(x: torch.Tensor, c: torch.Tensor, niter: int, early_stop: bool,
           gen: torch.Generator) -> tuple[torch.Tensor, float, int]:
    """One k-means run from centroids `c`: (centroids, the last iteration's objective, iterations)."""
    x_sq, k, prev, obj, it, before = (x * x).sum(1), len(c), float("inf"), float("nan"), 0, None
    for it in range(1, niter + 1):
        dist, assign = nearest(x, x_sq, c)
        obj = float(dist.double().sum())
        counts = torch.bincount(assign, minlength=k)
        c = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp(min=1)[:, None].float()
        _split_empty(c, counts, gen)
        # no longer improving (faiss: early_stop_threshold 0); or the same assignment again, whose objective
        # a GPU's unordered float sums can still move in its last bits
        if early_stop and (obj >= prev or (before is not None and torch.equal(assign, before))):
            break
        prev, before = obj, assign
    return c, obj, it


def torch_kmeans(features: np.ndarray, k: int, *, device: torch.device, niter: int = 300, seed: int = 0,
                 nredo: int = 1, max_points_per_centroid: int = 256,
                 early_stop: bool = True) -> tuple[np.ndarray, np.ndarray, float, int]:
    """k-means of (N, D) float32 features on `device`: (raw centroids (k, D), labels (N,) int64 by the
    nearest final centroid, the best restart's last objective, its iterations)."""
    with _full_float32(), torch.no_grad():
        x_all = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
        if not bool(torch.isfinite(x_all).all()):
            raise RuntimeError("k-means: the features contain NaN or inf")
        gen = torch.Generator().manual_seed(seed)  # on the host: the same draws on every device
        x = x_all
        if len(x) > k * max_points_per_centroid:  # faiss's subsampling of the training set
            x = x_all[torch.randperm(len(x), generator=gen)[:k * max_points_per_centroid].to(device)]
        if len(x) == k:  # faiss's corner case: every point is a centroid
            best = (x.clone(), 0.0, 1)
        else:
            best = None
            for redo in range(nredo):
                gen.manual_seed(seed + 1 + redo * 15486557)  # faiss's seed of restart `redo`
                init = x[torch.randperm(len(x), generator=gen)[:k].to(device)].clone()
                run = _lloyd(x, init, niter, early_stop, gen)
                if best is None or run[1] < best[1]:
                    best = run
        c, obj, iterations = best
        _, labels = nearest(x_all, (x_all * x_all).sum(1), c)
        return c.cpu().numpy(), labels.cpu().numpy(), obj, iterations


def torch_knn(features: np.ndarray, k: int, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product: (similarities (N, k) float32, indices (N, k) int64), each
    row sorted, most similar first (the sample itself for distinct unit vectors), as faiss's IndexFlatIP."""
    with _full_float32(), torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
        sims, idx, step = [], [], _rows(len(x))
        for lo in range(0, len(x), step):
            s, i = (x[lo:lo + step] @ x.T).topk(k, dim=1)
            sims.append(s.cpu())
            idx.append(i.cpu())
        return torch.cat(sims).numpy(), torch.cat(idx).numpy().astype(np.int64)
