"""k-means pseudo-labels and exact kNN: faiss where it can run, torch on a GPU faiss cannot use.

    >>> res = kmeans_labels(features, num_clusters=500, seed=0)     # backend="auto"
    >>> res.labels        # (N,) int64 in [0, num_clusters)
    >>> res.centroids     # (num_clusters, D) float32, L2-normalised (MMT resets its classifier with them)

As OpenUnReID's `label_generators/kmeans.py`: `faiss.Kmeans`, then labels by the
nearest centroid. Added here: a clear error when there are more clusters than
samples, counts of empty and tiny clusters, and contiguous labels.

The engine (`clustering_engine`, the run's `clustering.backend`): `auto` takes faiss's GPU build where
it is installed and sees a GPU, else torch on this process's CUDA GPU (torch_kmeans.py says why), else
faiss-cpu; `faiss` always faiss; `torch` the torch path, on CUDA when there is one, else on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reid_ray import ReidRayError

try:
    import faiss
except ImportError:  # neither extra installed: a clear error where clustering starts, not at import
    faiss = None

FAISS_MISSING = ("faiss is not installed: pip install -e '.[cpu]' (faiss-cpu), or pip install -e '.[gpu]' "
                 "(faiss-gpu for CUDA 13); on a GPU, --set clustering.backend=torch clusters without faiss")


def require_faiss():
    if faiss is None:
        raise ReidRayError(FAISS_MISSING)
    return faiss


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None) if faiss is not None else None
    return int(get()) if get is not None else 0


BACKENDS = ("auto", "faiss", "torch")


def clustering_engine(backend: str = "auto", use_gpu: bool | None = None) -> tuple[str, torch.device]:
    """(engine, device) for `backend` (see the module docstring): ("faiss", cuda) is faiss's GPU build,
    ("torch", cuda) this process's current CUDA device. `use_gpu` False keeps it on the CPU, True on a GPU."""
    backend = str(backend).lower()
    if backend not in BACKENDS:
        raise ReidRayError(f"clustering.backend={backend!r}; valid: {', '.join(BACKENDS)}")
    cuda = use_gpu is not False and torch.cuda.is_available()
    if backend == "torch":
        return "torch", torch.device("cuda" if cuda else "cpu")
    if use_gpu is not False and faiss_gpus() > 0:
        return "faiss", torch.device("cuda")
    if backend == "auto" and cuda:
        return "torch", torch.device("cuda")
    require_faiss()
    return "faiss", torch.device("cpu")


@dataclass
class ClusterResult:
    labels: np.ndarray                 # (N,) int64; -1 = outlier (DBSCAN only)
    centroids: np.ndarray | None       # (C, D) float32, L2-normalised; None for DBSCAN
    stats: dict[str, float] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more labellings (self-paced: tight, loose)
    picture: bytes | None = None       # a PNG of the features in 2-D by pseudo-label (ClusterSpec.picture)


def _as_float32(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def kmeans_labels(features, num_clusters: int, *, niter: int = 300, seed: int = 0, nredo: int = 1,
                  max_points_per_centroid: int = 256, min_points_per_centroid: int = 1,
                  early_stop: bool = True, tiny: int = 2, use_gpu: bool | None = None,
                  backend: str = "auto") -> ClusterResult:
    """Cluster (N, D) features into `num_clusters` with faiss k-means (or its torch twin, `backend`).

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
    engine, device = clustering_engine(backend, use_gpu)
    if engine == "torch":
        from reid_ray.clustering.torch_kmeans import torch_kmeans
        centroids, labels, objective, iterations = torch_kmeans(
            x, num_clusters, device=device, niter=niter, seed=seed, nredo=nredo,
            max_points_per_centroid=max_points_per_centroid, early_stop=early_stop)
    else:
        km = faiss.Kmeans(d, num_clusters, niter=niter, seed=seed, nredo=nredo, gpu=device.type == "cuda",
                          verbose=False, max_points_per_centroid=max_points_per_centroid,
                          min_points_per_centroid=min_points_per_centroid, spherical=False)
        if not early_stop:
            km.cp.early_stop_threshold = -1  # older faiss has no such field: then it always runs niter
        km.train(x)
        labels = km.index.search(x, 1)[1][:, 0].astype(np.int64)
        centroids = km.centroids.astype(np.float32)
        objective = float(km.obj[-1]) if len(km.obj) else float("nan")
        iterations = len(km.obj)
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    sizes = np.bincount(labels, minlength=num_clusters)
    stats = {"num_clusters": float((sizes > 0).sum()), "empty_clusters": float((sizes == 0).sum()),
             "tiny_clusters": float(((sizes > 0) & (sizes < tiny)).sum()), "singletons": float((sizes == 1).sum()),
             "kmeans_objective": objective, "kmeans_iterations": float(iterations)}
    return ClusterResult(labels.astype(np.int64), centroids.astype(np.float32), stats)


def knn(features, k: int, *, use_gpu: bool | None = None, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (cosine for L2-normalised features).

    Returns (similarities (N, k) float32, indices (N, k) int64), each row sorted,
    the sample itself first. faiss `IndexFlatIP` (on GPU when faiss has one), or torch
    matmul + topk by row blocks (`backend`, see `clustering_engine`).
    """
    x = _as_float32(features)
    if not 1 <= k <= len(x):
        raise ReidRayError(f"kNN: k={k} but there are {len(x)} samples")
    engine, device = clustering_engine(backend, use_gpu)
    if engine == "torch":
        from reid_ray.clustering.torch_kmeans import torch_knn
        return torch_knn(x, k, device=device)
    index = faiss.IndexFlatIP(x.shape[1])
    if device.type == "cuda":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    sims, idx = index.search(x, k)
    return sims, idx.astype(np.int64)
