import numpy as np
import pytest
import torch
from PIL import Image

from reid_ray import ReidRayError
from reid_ray.evaluation.visualize import cluster_map, cluster_purity, ranked_indices, ranked_lists

# 2 queries x 6 gallery images; q0 = pid 1 cam 0, q1 = pid 2 cam 1
D = [[0.1, 0.5, 0.2, 0.3, 0.6, 0.4],
     [0.6, 0.1, 0.5, 0.4, 0.3, 0.2]]
QP, QC = [1, 2], [0, 1]
GP, GC = [1, 2, 1, 3, 1, 2], [0, 0, 1, 1, 1, 1]


def images(folder, n, prefix):
    """n tiny PNGs in blue/yellow shades (never the green or red of a border)."""
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i}.png"
        Image.new("RGB", (16, 32), (40 * i % 256, 40 * i % 256, 200)).save(p)
        paths.append(str(p))
    return paths


def test_ranked_indices_drop_same_pid_same_camera():
    # q0 by distance: g0 g2 g3 g5 g1 g4, g0 (pid 1, cam 0) dropped; q1: g1 g5 g4 g3 g2 g0, g5 (pid 2, cam 1) dropped
    idx, hits = ranked_indices(np.array(D), [0, 1], 4, QP, GP, QC, GC)
    assert idx == [[2, 3, 5, 1], [1, 4, 3, 2]]
    assert hits == [[True, False, False, False], [True, False, False, False]]
    idx, hits = ranked_indices(torch.tensor(D), [1], 10, QP, GP, QC, GC)  # fewer left than asked: all of them
    assert idx == [[1, 4, 3, 2, 0]] and hits == [[True, False, False, False, False]]


def test_ranked_indices_without_labels_keeps_everything():
    idx, hits = ranked_indices(torch.tensor(D), [0, 1], 3)
    assert idx == [[0, 2, 3], [1, 5, 4]] and hits is None
    idx, hits = ranked_indices(np.array(D), [0], 2, QP, GP)  # pids without cameras: flags, nothing dropped
    assert idx == [[0, 2]] and hits == [[True, True]]


def test_ranked_indices_exclude_self():
    d = torch.tensor([[0.0, 0.3, 0.1, 0.2],
                      [0.3, 0.0, 0.2, 0.1],
                      [0.1, 0.2, 0.0, 0.3],
                      [0.2, 0.1, 0.3, 0.0]])
    idx, hits = ranked_indices(d, [0, 1, 2, 3], 3, exclude_self=True)
    assert idx == [[2, 3, 1], [3, 2, 0], [0, 1, 3], [1, 0, 2]] and hits is None
    pids, cams = [0, 0, 1, 1], [0, 1, 0, 1]
    idx, hits = ranked_indices(d, [0, 3], 3, pids, pids, cams, cams, exclude_self=True)
    assert idx == [[2, 3, 1], [1, 0, 2]] and hits == [[False, False, True], [False, False, True]]
    with pytest.raises(ReidRayError, match="same images"):
        ranked_indices(torch.tensor(D), [0], 3, exclude_self=True)


def _colour_share(path, rgb):
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return (np.abs(px - np.array(rgb)).max(-1) < 30).mean()


def test_ranked_lists_writes_a_png(tmp_path):
    q, g = images(tmp_path, 2, "q"), images(tmp_path, 6, "g")
    out = ranked_lists(q, g, torch.tensor(D), tmp_path / "out" / "ranked.png", num_queries=5, top=4,
                       q_pids=QP, g_pids=GP, q_camids=QC, g_camids=GC)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ranked.png"]  # no temp file left
    assert _colour_share(out, (0, 170, 0)) > 0 and _colour_share(out, (220, 0, 0)) > 0  # green and red borders
    plain = ranked_lists(q, g, np.array(D), tmp_path / "plain.png", num_queries=1, top=3)
    with Image.open(plain) as img:
        assert img.format == "PNG"
    assert _colour_share(plain, (0, 170, 0)) == 0 and _colour_share(plain, (220, 0, 0)) == 0
    with pytest.raises(ReidRayError, match="2 queries and 5 gallery"):
        ranked_lists(q, g[:5], np.array(D), tmp_path / "bad.png")


def blobs(n=20, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(3, dim)
    return np.concatenate([c + 0.01 * rng.standard_normal((n, dim)) for c in centres]), np.repeat([0, 1, 2], n)


def test_cluster_purity():
    x, ids = blobs()
    assert cluster_purity(ids, ids) == 1.0
    assert cluster_purity(np.zeros(60, int), ids) == pytest.approx(1 / 3)
    # cluster 5 = three of id 0 and one of id 1, cluster 7 = two of id 2: (3 + 2) / 6; outliers do not count
    assert cluster_purity([5, 5, 5, 5, 7, 7, -1, -1], [0, 0, 0, 1, 2, 2, 1, 2]) == pytest.approx(5 / 6)
    assert np.isnan(cluster_purity([-1, -1], [0, 1]))


def test_cluster_map(tmp_path):
    x, ids = blobs()
    path, stats = cluster_map(x, ids, tmp_path / "c.png", truth=ids, title="blobs")
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert stats == {"points": 60, "clusters": 3, "outliers": 0, "shown": 60, "cluster_purity": 1.0}
    _, stats = cluster_map(torch.from_numpy(x), np.zeros(60, int), tmp_path / "c.png", truth=ids, method="tsne")
    assert stats["clusters"] == 1 and stats["cluster_purity"] == pytest.approx(1 / 3)
    labels = ids.copy()
    labels[::4] = -1  # outliers of any identity leave the purity at 1
    path, stats = cluster_map(x, labels, tmp_path / "o.png", truth=np.arange(60) * (labels == -1), max_points=40)
    assert stats == {"points": 60, "clusters": 3, "outliers": 15, "shown": 40, "cluster_purity": 1.0}
    _, stats = cluster_map(x, ids, tmp_path / "n.png")
    assert "cluster_purity" not in stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "n.png", "o.png"]
