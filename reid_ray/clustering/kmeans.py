"""k-means pseudo-labels with faiss (GPU when faiss sees one, CPU otherwise) and exact kNN.

    >>> res = kmeans_labels(features, num_clusters=500, seed=0)
    >>> res.labels        # (N,) int64 in [0, num_clusters)
    >>> res.centroids     # (num_clusters, D) float32, L2-normalised (MMT resets its classifier with them)

As OpenUnReID's `label_generators/kmeans.py`: `faiss.Kmeans`, then labels by the
nearest centroid. Added here: a clear error when there are more clusters than
samples, counts of empty and tiny clusters, and contiguous labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reid_ray import ReidRayError

try:
    import faiss
except ImportError:  # neither extra installed: a clear error where clustering starts, not at import
    faiss = None

FAISS_MISSING = ("faiss is not installed: pip install -e '.[cpu]' (faiss-cpu) or, on CUDA machines, "
                 "pip install -e '.[gpu]' (faiss-gpu for CUDA 13)")


def require_faiss():
    if faiss is None:
        raise ReidRayError(FAISS_MISSING)
    return faiss


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None) if faiss is not None else None
    return int(get()) if get is not None else 0


@dataclass
class ClusterResult:
    labels: np.ndarray                 # (N,) int64; -1 = outlier (DBSCAN only)
    centroids: np.ndarray | None       # (C, D) float32, L2-normalised; None for DBSCAN
    stats: dict[str, float] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more labellings (self-paced: tight, loose)


def _as_float32(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def kmeans_labels(features, num_clusters: int, *, niter: int = 300, seed: int = 0, nredo: int = 1,
                  max_points_per_centroid: int = 256, min_points_per_centroid: int = 1,
                  early_stop: bool = True, tiny: int = 2, use_gpu: bool | None = None) -> ClusterResult:
    """Cluster (N, D) features into `num_clusters` with faiss k-means.

    early_stop=False forces all `niter` iterations (faiss's early_stop_threshold=-1).
    Clusters with fewer than `tiny` members are counted in stats (`tiny_clusters`),
    empty ones in `empty_clusters`; labels stay in [0, num_clusters) so a classifier
    of that size can be reset from the centroids.
    """
    x = _as_float32(features)
    n, d = x.shape
    if num_clusters < 1 or num_clusters > n:
        raise ReidRayError(f"k-means: num_clusters={num_clusters} but there are {n} samples; "
                           f"choose num_clusters between 1 and {n}")
    require_faiss()
    gpu = faiss_gpus() > 0 if use_gpu is None else use_gpu
    km = faiss.Kmeans(d, num_clusters, niter=niter, seed=seed, nredo=nredo, gpu=gpu, verbose=False,
                      max_points_per_centroid=max_points_per_centroid,
                      min_points_per_centroid=min_points_per_centroid, spherical=False)
    if not early_stop:
        km.cp.early_stop_threshold = -1  # older faiss has no such field: then it always runs niter
    km.train(x)
    _, idx = km.index.search(x, 1)
    labels = idx[:, 0].astype(np.int64)
    centroids = km.centroids.astype(np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    sizes = np.bincount(labels, minlength=num_clusters)
    stats = {"num_clusters": float((sizes > 0).sum()), "empty_clusters": float((sizes == 0).sum()),
             "tiny_clusters": float(((sizes > 0) & (sizes < tiny)).sum()), "singletons": float((sizes == 1).sum()),
             "kmeans_objective": float(km.obj[-1]) if len(km.obj) else float("nan"),
             "kmeans_iterations": float(len(km.obj))}
    return ClusterResult(labels, centroids, stats)


def knn(features, k: int, *, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (cosine for L2-normalised features).

    Returns (similarities (N, k) float32, indices (N, k) int64), each row sorted,
    the sample itself first. faiss `IndexFlatIP`, on GPU when available.
    """
    x = _as_float32(features)
    if not 1 <= k <= len(x):
        raise ReidRayError(f"kNN: k={k} but there are {len(x)} samples")
    require_faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    if (faiss_gpus() > 0 if use_gpu is None else use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    sims, idx = index.search(x, k)
    return sims, idx.astype(np.int64)
