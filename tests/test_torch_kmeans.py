"""The torch clustering engine (clustering/torch_kmeans.py) against faiss-cpu, on this CPU: k-means by objective
and by the agreement of the labellings (never label for label: the random draws differ), kNN exactly; and the
engine each `clustering.backend` picks. No GPU needed: the torch path runs on the CPU here."""

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score as nmi

from reid_ray import ReidRayError
from reid_ray.clustering import kmeans as km
from reid_ray.clustering import torch_kmeans as tk
from reid_ray.clustering.client import ClusterSpec, run_clustering
from reid_ray.clustering.kmeans import clustering_engine, kmeans_labels, knn


def blobs(k=20, n=2000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def unit(n=3000, d=64, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kmeans_matches_faiss_by_objective_and_labelling_on_clustered_data():
    x, truth = blobs()
    f = kmeans_labels(x, 20, seed=0, nredo=3, backend="faiss")
    t = kmeans_labels(x, 20, seed=0, nredo=3, backend="torch")
    assert t.stats["kmeans_objective"] == pytest.approx(f.stats["kmeans_objective"], rel=0.01)
    assert nmi(f.labels, t.labels) > 0.98 and nmi(truth, t.labels) > 0.95
    assert set(t.stats) == set(f.stats) and t.stats["empty_clusters"] == 0
    assert t.labels.dtype == np.int64 and t.centroids.dtype == np.float32 and t.centroids.shape == (20, 32)
    np.testing.assert_allclose(np.linalg.norm(t.centroids, axis=1), 1, atol=1e-5)
    assert (kmeans_labels(x, 20, seed=0, nredo=3, backend="torch").labels == t.labels).all()  # seeded


@pytest.mark.parametrize("early_stop", [False, True])
def test_kmeans_matches_faiss_by_objective_on_random_data(early_stop):
    x = unit()
    f = kmeans_labels(x, 60, seed=1, niter=20, early_stop=early_stop, backend="faiss")
    t = kmeans_labels(x, 60, seed=1, niter=20, early_stop=early_stop, backend="torch")
    assert t.stats["kmeans_objective"] == pytest.approx(f.stats["kmeans_objective"], rel=0.01)
    if not early_stop:
        assert t.stats["kmeans_iterations"] == f.stats["kmeans_iterations"] == 20


def test_kmeans_in_small_blocks_subsampled_equals_one_block(monkeypatch):
    x, _ = blobs(k=8, n=900, d=16, seed=2)
    whole = kmeans_labels(x, 8, seed=3, nredo=5, max_points_per_centroid=40, backend="torch")  # 320 of 900 train
    monkeypatch.setattr(tk, "BLOCK_ELEMENTS", 8 * 7)  # 7 rows a block: many blocks, a ragged last one
    blocked = kmeans_labels(x, 8, seed=3, nredo=5, max_points_per_centroid=40, backend="torch")
    assert (blocked.labels == whole.labels).all() and len(blocked.labels) == 900


def test_an_empty_cluster_is_split_from_a_large_one_as_faiss_does():
    c = torch.tensor([[1.0, 2.0], [0.0, 0.0], [4.0, 4.0]])
    counts = torch.tensor([1, 0, 9])  # cluster 1 is empty; only cluster 2 (size - 1 = 8 > 0) can be split
    assert tk._split_empty(c, counts, torch.Generator().manual_seed(0)) == 1
    eps = 1 / 1024
    torch.testing.assert_close(c[1], torch.tensor([4 * (1 + eps), 4 * (1 - eps)]))
    torch.testing.assert_close(c[2], torch.tensor([4 * (1 - eps), 4 * (1 + eps)]))
    torch.testing.assert_close(c[0], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("block", [None, 64 * 5])
def test_knn_equals_faiss(monkeypatch, block):
    if block:
        monkeypatch.setattr(tk, "BLOCK_ELEMENTS", block)  # 64 rows of 1500: ragged blocks
    x = unit(n=1500, d=32, seed=4)
    fs, fi = knn(x, 20, backend="faiss")
    ts, ti = knn(x, 20, backend="torch")
    assert ts.shape == fs.shape == (1500, 20) and ts.dtype == np.float32 and ti.dtype == np.int64
    np.testing.assert_allclose(ts, fs, atol=1e-5)
    assert (ti[:, 0] == np.arange(1500)).all()  # the sample itself first
    gap = np.diff(fs, axis=1)  # (negative) gaps between neighbours: a tie makes the order arbitrary
    untied = np.ones_like(fi, bool)
    untied[:, 1:] &= gap < -1e-5
    untied[:, :-1] &= gap < -1e-5
    assert untied.mean() > 0.9 and (ti[untied] == fi[untied]).all()


def test_each_backend_picks_its_engine(monkeypatch):
    if not torch.cuda.is_available():  # this machine: faiss-cpu for auto and faiss, torch on the CPU for torch
        assert clustering_engine("auto") == ("faiss", torch.device("cpu"))
        assert clustering_engine("faiss") == ("faiss", torch.device("cpu"))
        assert clustering_engine("torch") == ("torch", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU box without faiss's GPU build
    monkeypatch.setattr(km, "faiss_gpus", lambda: 0)
    assert clustering_engine("auto") == ("torch", torch.device("cuda"))
    assert clustering_engine("faiss") == ("faiss", torch.device("cpu"))
    assert clustering_engine("Torch") == ("torch", torch.device("cuda"))
    assert clustering_engine("auto", use_gpu=False) == ("faiss", torch.device("cpu"))
    monkeypatch.setattr(km, "faiss_gpus", lambda: 1)  # ... and with it: faiss first
    assert clustering_engine("auto") == ("faiss", torch.device("cuda"))
    assert clustering_engine("torch") == ("torch", torch.device("cuda"))
    monkeypatch.setattr(km, "faiss", None)  # a GPU box with torch only
    monkeypatch.setattr(km, "faiss_gpus", lambda: 0)
    assert clustering_engine("auto") == ("torch", torch.device("cuda"))
    with pytest.raises(ReidRayError, match="faiss is not installed"):
        clustering_engine("faiss")
    with pytest.raises(ReidRayError, match=r"^clustering.backend='gpu'; valid: auto, faiss, torch$"):
        clustering_engine("gpu")


@pytest.mark.parametrize("algorithm", ["kmeans", "dbscan"])
def test_backend_torch_through_run_clustering_gives_faiss_clusters(algorithm):
    x, truth = blobs(k=6, n=300, d=16, seed=1)
    spec = ClusterSpec(algorithm=algorithm, num_clusters=6, nredo=3, k1=15, k2=4)
    f = run_clustering(x, spec, epoch=0, truth=truth)
    t = run_clustering(x, ClusterSpec(**{**spec.__dict__, "backend": "torch"}), epoch=0, truth=truth)
    assert nmi(f.labels, t.labels) > 0.999 and t.stats["nmi"] > 0.99
    assert t.centroids.shape == f.centroids.shape
    assert (t.stats["cluster_with_torch"], t.stats["cluster_on_gpu"]) == (1.0, float(torch.cuda.is_available()))
    if not torch.cuda.is_available():
        assert (f.stats["cluster_with_torch"], f.stats["cluster_on_gpu"]) == (0.0, 0.0)  # auto: faiss-cpu here
