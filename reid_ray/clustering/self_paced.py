"""SpCL's self-paced pseudo-labels: DBSCAN at three radii and the two reliability criteria.

Ge et al., "Self-paced Contrastive Learning with Hybrid Memory for Domain Adaptive Object Re-ID",
NeurIPS 2020, Sec. 3.3. With I(f_i) the cluster of image i at radius eps, and I_loose / I_tight its
clusters at eps ± eps_gap (an outlier's cluster is itself alone):

    R_indep(f_i) = |I(f_i) ∩ I_loose(f_i)| / |I(f_i) ∪ I_loose(f_i)|     a cluster that stays itself when
                                                                          the radius grows is independent
    R_comp(f_i)  = |I(f_i) ∩ I_tight(f_i)| / |I(f_i) ∪ I_tight(f_i)|     a point that stays with its cluster
                                                                          when the radius shrinks is compact

Clusters with R_indep below the α-threshold and points with R_comp below the β-threshold become
un-clustered instances. The thresholds are fixed at the first refresh, as the α = β = 0.9 quantiles
"from the top" (the 90 % most reliable clusters and clustered points pass then), so that later epochs,
with better features, keep more. A cluster's R_indep is the largest over its members (the authors'
code); the authors' code then keeps, per cluster, only the points of the cluster's best R_comp, where
the paper (followed here) compares every point to the global β-threshold.

    res = self_paced_dbscan(features, eps=0.6, eps_gap=0.02)   # in the PseudoLabeler actor
    r_indep, r_comp = reliability(res.labels, res.extra["tight"], res.extra["loose"])
"""

from __future__ import annotations

import numpy as np

from reid_ray.clustering.kmeans import ClusterResult


def self_paced_dbscan(features, eps: float = 0.6, eps_gap: float = 0.02, min_samples: int = 4, k1: int = 30,
                      k2: int = 6, backend: str = "auto") -> ClusterResult:
    """DBSCAN on one Jaccard distance matrix at eps, eps - gap (tight) and eps + gap (loose)."""
    from sklearn.cluster import DBSCAN  # here: ~1 s to import, in every process that imports the methods

    from reid_ray.clustering.dbscan import jaccard_distance

    dist = jaccard_distance(features, k1, k2, backend=backend)
    runs = {name: DBSCAN(eps=e, min_samples=min_samples, metric="precomputed").fit_predict(dist).astype(np.int64)
            for name, e in (("labels", eps), ("tight", eps - eps_gap), ("loose", eps + eps_gap))}
    labels = runs["labels"]
    stats = {"num_clusters": float(labels.max() + 1), "outliers": float((labels < 0).sum()),
             "num_clusters_tight": float(runs["tight"].max() + 1), "num_clusters_loose": float(runs["loose"].max() + 1),
             "jaccard_pairs": float(dist.nnz)}
    return ClusterResult(labels, None, stats, extra={"tight": runs["tight"], "loose": runs["loose"]})


def _singletons(labels: np.ndarray) -> np.ndarray:
    """Outliers (-1) as clusters of their own, after the real ones."""
    out = labels.copy()
    out[labels < 0] = labels.max() + 1 + np.arange((labels < 0).sum())
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per point i: |A(i) ∩ B(i)| / |A(i) ∪ B(i)| for the partitions a and b (labels ≥ 0)."""
    size_a, size_b = np.bincount(a)[a], np.bincount(b)[b]
    _, pair, counts = np.unique(np.stack([a, b], 1), axis=0, return_inverse=True, return_counts=True)
    inter = counts[pair.reshape(-1)]
    return inter / (size_a + size_b - inter)


def reliability(labels: np.ndarray, tight: np.ndarray, loose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R_indep per cluster (C,), R_comp per point (N,)); outliers of `labels` get R_comp 0."""
    clustered = labels >= 0
    base, t, lo = _singletons(labels), _singletons(tight), _singletons(loose)
    indep_point = _iou(base, lo)
    r_indep = np.zeros(labels.max() + 1)
    np.maximum.at(r_indep, labels[clustered], indep_point[clustered])
    r_comp = np.where(clustered, _iou(base, t), 0.0)
    return r_indep, r_comp


def thresholds(labels: np.ndarray, r_indep: np.ndarray, r_comp: np.ndarray, alpha: float = 0.9,
               beta: float = 0.9) -> tuple[float, float]:
    """The α / β thresholds at the first refresh: the (1 - α) quantile of R_indep over clusters of more
    than one image, and the (1 - β) quantile of R_comp over clustered points."""
    clustered = labels >= 0
    sizes = np.bincount(labels[clustered], minlength=len(r_indep))
    multi = r_indep[sizes > 1]
    indep = float(np.quantile(multi, 1 - alpha)) if len(multi) else 0.0
    comp = float(np.quantile(r_comp[clustered], 1 - beta)) if clustered.any() else 0.0
    return indep, comp


def select_reliable(labels: np.ndarray, r_indep: np.ndarray, r_comp: np.ndarray, indep_thr: float,
                    comp_thr: float) -> np.ndarray:
    """Labels with unreliable clusters and points turned into outliers (-1), the kept clusters relabelled
    0..K-1 in order."""
    keep = labels >= 0
    keep[keep] = (r_indep[labels[keep]] >= indep_thr) & (r_comp[keep] >= comp_thr)
    out = np.full_like(labels, -1)
    kept = np.unique(labels[keep])
    out[keep] = np.searchsorted(kept, labels[keep])
    return out


def unique_outliers(labels: np.ndarray) -> np.ndarray:
    """Each outlier (-1) its own label after the clusters: the un-clustered instances of the hybrid memory."""
    return _singletons(labels) if (labels < 0).any() else labels.copy()
