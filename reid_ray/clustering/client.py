"""How a method asks for pseudo-labels, independent of where the clustering runs.

A method calls `clusterer.refresh(local_features, epoch)` on every rank with the
features of its contiguous shard of the target training set; every rank gets the
same `ClusterResult` for the whole set, in dataset order.

`LocalClusterer` (here, Ray-free) gathers the shards to rank 0 with
torch.distributed, clusters in-process and broadcasts the result: the
`--clustering local` path, for debugging and for comparison in benchmarks.
`reid_ray.distributed.actor.ActorClusterer` sends the shards to the run's
`PseudoLabeler` Ray actor instead.

A method says what to compute (`Method.cluster_spec`); the run says with what engine
(`clustering.backend`, added by `run_spec` in shared code, so no method needs to know).
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from reid_ray.clustering.kmeans import ClusterResult, clustering_engine, kmeans_labels
from reid_ray.clustering.metrics import cluster_quality


@dataclass
class ClusterSpec:
    """What to compute at a refresh (the method's hyperparameters)."""

    algorithm: str = "kmeans"          # kmeans | dbscan (on the k-reciprocal Jaccard distance) | self_paced
                                       # (DBSCAN at eps and eps ± eps_gap, clustering/self_paced.py)
    num_clusters: int = 500
    seed: int = 0
    niter: int = 300
    nredo: int = 1                     # k-means restarts (the best objective wins)
    max_points_per_centroid: int = 256
    early_stop: bool = True
    eps: float = 0.6                   # DBSCAN radius on the Jaccard distance (SpCL's default)
    eps_gap: float = 0.02              # self_paced: the tight and loose radii are eps ∓ eps_gap
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    backend: str = "auto"              # auto | faiss | torch: the run's clustering.backend (kmeans.clustering_engine)
    picture: bool = False              # draw the refresh's features in 2-D by pseudo-label (the run's clustering.pictures)


def run_spec(method_cls, cfg) -> ClusterSpec:
    """The method's spec with the run's `clustering.backend`."""
    return dataclasses.replace(method_cls.cluster_spec(cfg), backend=cfg.clustering.backend,
                               picture=cfg.clustering.pictures)


def run_clustering(features: np.ndarray, spec: ClusterSpec, epoch: int, truth: np.ndarray | None = None,
                   cameras: np.ndarray | None = None) -> ClusterResult:
    """Cluster the whole target set; adds quality metrics when ground truth is known (analysis only).

    The stats say which engine clustered (`cluster_with_torch` 1 / faiss 0) and where (`cluster_on_gpu`)."""
    t = time.perf_counter()
    engine, device = clustering_engine(spec.backend)  # resolved once: "auto" becomes faiss or torch here
    if spec.algorithm == "kmeans":
        res = kmeans_labels(features, spec.num_clusters, niter=spec.niter, seed=spec.seed + epoch, nredo=spec.nredo,
                            max_points_per_centroid=spec.max_points_per_centroid, early_stop=spec.early_stop,
                            backend=engine)
    elif spec.algorithm == "dbscan":
        from reid_ray.clustering.dbscan import dbscan_labels
        res = dbscan_labels(features, spec.eps, spec.min_samples, spec.k1, spec.k2, backend=engine)
        res.centroids = cluster_means(features, res.labels)
    elif spec.algorithm == "self_paced":
        from reid_ray.clustering.self_paced import self_paced_dbscan
        res = self_paced_dbscan(features, spec.eps, spec.eps_gap, spec.min_samples, spec.k1, spec.k2, backend=engine)
    else:
        from reid_ray import ReidRayError
        raise ReidRayError(f"unknown clustering algorithm {spec.algorithm!r}; valid: kmeans, dbscan, self_paced")
    res.stats.update(cluster_time=time.perf_counter() - t, cluster_with_torch=float(engine == "torch"),
                     cluster_on_gpu=float(device.type == "cuda"))
    if truth is not None:
        res.stats.update(cluster_quality(res.labels, truth, cameras))
    if spec.picture:  # with the picture, the clusters' silhouette: a label-free diagnostic, never selected on
        res.stats["silhouette"] = _silhouette(features, res.labels)
        res.picture = cluster_picture(features, res.labels, truth, epoch)
    return res


def _silhouette(features: np.ndarray, labels: np.ndarray) -> float:
    """The clusters' cosine silhouette (`evaluation.label_free.silhouette`), NaN with fewer than two clusters."""
    import torch

    from reid_ray import ReidRayError
    from reid_ray.evaluation.label_free import silhouette

    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, np.float32)), dim=1)
    try:
        return float(silhouette(x, torch.as_tensor(labels)))
    except ReidRayError:  # non-finite features: the refresh's own checks report those
        return float("nan")


def cluster_picture(features: np.ndarray, labels: np.ndarray, truth: np.ndarray | None, epoch: int) -> bytes:
    """The refresh's picture (`evaluation.visualize.cluster_map`: PCA of up to 1,000 seeded points coloured by
    pseudo-label, identity purity in the title where the true ids are known) as PNG bytes, which travel with the
    labels to the ranks (rank 0 logs them)."""
    import tempfile
    from pathlib import Path

    from reid_ray.evaluation.visualize import cluster_map

    with tempfile.TemporaryDirectory(prefix="reid-ray-clusters-") as d:
        path, _ = cluster_map(features, labels, Path(d) / "clusters.png", truth=truth, seed=0, max_points=1000,
                              title=f"target features at the refresh of epoch {epoch + 1}")
        return path.read_bytes()


def cluster_means(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """L2-normalised mean feature of each cluster (outliers, label -1, excluded)."""
    x = np.asarray(features, np.float32)
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    sums = np.zeros((k, x.shape[1]), np.float32)
    np.add.at(sums, labels[labels >= 0], x[labels >= 0])
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_same_across_ranks(res: ClusterResult) -> None:
    """Every rank must train on identical labels: compare a checksum of them across ranks."""
    digest = zlib.crc32(np.ascontiguousarray(res.labels).tobytes())
    if _distributed():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"pseudo-labels differ across ranks (checksums {digests})")
    res.stats["labels_checksum_ok"] = 1.0


class LocalClusterer:
    def __init__(self, spec: ClusterSpec, truth: np.ndarray | None = None, cameras: np.ndarray | None = None):
        self.spec, self.truth, self.cameras = spec, truth, cameras
        self.last: ClusterResult | None = None  # the latest refresh (its picture: the worker logs it)

    def refresh(self, local_features: np.ndarray, epoch: int) -> ClusterResult:
        t0 = time.perf_counter()
        if not _distributed():
            res = run_clustering(local_features, self.spec, epoch, self.truth, self.cameras)
            res.stats["gather_time"] = time.perf_counter() - t0 - res.stats["cluster_time"]
            check_same_across_ranks(res)
            self.last = res
            return res
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local_features)  # rank order = dataset order
        t1 = time.perf_counter()
        box = [None]
        if dist.get_rank() == 0:
            box[0] = run_clustering(np.concatenate(shards), self.spec, epoch, self.truth, self.cameras)
        t2 = time.perf_counter()
        dist.broadcast_object_list(box, src=0)
        res = box[0]
        res.stats.update({"gather_time": t1 - t0, "return_time": time.perf_counter() - t2})
        check_same_across_ranks(res)
        self.last = res
        return res
