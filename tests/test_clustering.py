import numpy as np
import pytest

from reid_ray import ReidRayError
from reid_ray.clustering.client import ClusterSpec, LocalClusterer
from reid_ray.clustering.kmeans import kmeans_labels, knn
from reid_ray.clustering.metrics import cluster_quality


def blobs(k=6, n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 10
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def test_kmeans_recovers_separated_clusters():
    x, truth = blobs()
    res = kmeans_labels(x, 6, seed=0, nredo=5)
    q = cluster_quality(res.labels, truth)
    assert q["nmi"] > 0.99 and q["pairwise_precision"] > 0.99 and q["pairwise_recall"] > 0.99
    assert res.centroids.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    assert res.stats["num_clusters"] == 6 and res.stats["empty_clusters"] == 0
    # deterministic for a seed
    assert (kmeans_labels(x, 6, seed=0, nredo=5).labels == res.labels).all()


def test_too_many_clusters_is_a_clear_error():
    with pytest.raises(ReidRayError, match="num_clusters=20 but there are 10 samples"):
        kmeans_labels(np.zeros((10, 4), np.float32), 20)


def test_tiny_and_singleton_clusters_are_counted():
    x, _ = blobs(k=3, n=60)
    x = np.concatenate([x, np.full((1, 16), 500, np.float32)])  # one far outlier
    res = kmeans_labels(x, 4, seed=0, nredo=3)
    assert res.stats["singletons"] >= 1 and res.stats["tiny_clusters"] >= 1


def test_knn_exact_neighbours():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, idx = knn(x, 2)
    assert idx[:, 0].tolist() == [0, 1, 2, 3] and idx[:, 1].tolist() == [1, 0, 3, 2]
    assert sims[0, 0] == pytest.approx(1.0)


def test_quality_metrics_hand_computed():
    pred, truth = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    q = cluster_quality(pred, truth, cameras=np.array([0, 1, 0, 1]))
    # predicted same-cluster pairs: (0,1), (2,3); true pairs: (0,1), (0,2), (1,2); correct: (0,1)
    assert q["pairwise_precision"] == pytest.approx(0.5) and q["pairwise_recall"] == pytest.approx(1 / 3)
    assert 0 <= q["camera_nmi"] <= 1


def test_local_clusterer_single_process():
    x, truth = blobs()
    res = LocalClusterer(ClusterSpec(num_clusters=6), truth).refresh(x, epoch=0)
    assert len(res.labels) == len(x) and "nmi" in res.stats and "gather_time" in res.stats


def dense_jaccard_reference(x, k1, k2):
    """The reference formulation on a dense matrix (small N only)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 2 - 2 * x @ x.T
    n = len(x)
    rank = np.argsort(d, axis=1, kind="stable")
    v = np.zeros((n, n), np.float32)

    def recip(i, k):
        return [c for c in rank[i, : k + 1] if i in rank[c, : k + 1]]
    for i in range(n):
        r = recip(i, k1)
        exp = list(r)
        for c in r:
            rc = recip(c, int(np.around(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                exp += rc
        exp = np.unique(exp)
        w = np.exp(-d[i, exp])
        v[i, exp] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    inter = np.stack([np.minimum(v[i][None], v).sum(1) for i in range(n)])
    return 1 - inter / (2 - inter)


def test_sparse_jaccard_matches_dense_reference():
    from reid_ray.clustering.dbscan import jaccard_distance
    x, _ = blobs(k=4, n=60, d=8, seed=3)
    ref = dense_jaccard_reference(x.astype(np.float64), k1=8, k2=3)
    m = jaccard_distance(x, k1=8, k2=3).tocoo()
    sparse, stored = m.toarray(), np.zeros((60, 60), bool)
    stored[m.row, m.col] = True  # the pairs formed, explicit zeros included
    np.testing.assert_allclose(sparse[stored], ref[stored], atol=1e-5)
    assert np.allclose(ref[~stored], 1.0, atol=1e-6)  # absent pairs are exactly the distance-1 pairs


def test_dbscan_finds_clusters_and_outliers():
    from reid_ray.clustering.dbscan import dbscan_labels
    x, truth = blobs(k=5, n=200, d=16, seed=1)
    x = np.concatenate([x, np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32) * 40])
    res = dbscan_labels(x, eps=0.6, min_samples=4, k1=15, k2=4)
    q = cluster_quality(res.labels[:200], truth)
    assert res.stats["num_clusters"] == 5 and q["pairwise_precision"] > 0.99
    assert res.centroids is None and len(res.labels) == 203


def test_local_clusterer_dbscan_gives_centroids_for_classifiers():
    x, truth = blobs(k=4, n=120)
    res = LocalClusterer(ClusterSpec(algorithm="dbscan", k1=10, k2=3), truth).refresh(x, epoch=0)
    k = res.labels.max() + 1
    assert res.centroids.shape == (k, 16) and "nmi" in res.stats
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    with pytest.raises(ReidRayError, match="valid: kmeans, dbscan"):
        LocalClusterer(ClusterSpec(algorithm="optics")).refresh(x, epoch=0)
