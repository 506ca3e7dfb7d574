"""Pictures of what a re-ID model retrieves and clusters, as PNG files.

    >>> ranked_lists(q_paths, g_paths, distmat, "ranked.png", q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
    >>> path, stats = cluster_map(features, pseudo_labels, "clusters.png", truth=true_ids)

`ranked_lists` is torchreid's `visrank` / fast-reid's `visualize_result`: one row per query, its top gallery
images beside it, bordered green (same identity) or red. `cluster_map` is a 2-D PCA (or t-SNE) map of features
coloured by pseudo-label, with the clusters' identity purity when the true ids are known. Both draw on a bare
matplotlib `Figure` (the Agg canvas, no pyplot state) and write atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reid_ray import ReidRayError, atomic_path

MATCH, MISMATCH, PLAIN, QUERY = (0, 170, 0), (220, 0, 0), (160, 160, 160), (0, 0, 0)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def ranked_indices(distmat, rows, top: int, q_pids=None, g_pids=None, q_camids=None, g_camids=None,
                   exclude_self: bool = False) -> tuple[list[list[int]], list[list[bool]] | None]:
    """For each query of `rows`: its (at most) `top` gallery indices by ascending distance, and whether each has
    the query's pid (None without pids).

    distmat: (Q, G) distances, numpy or torch; only the `rows` are ranked (`torch.topk`, no full sort; ties in
    topk's order). With pids and cameras, gallery entries of the query's pid AND camera are dropped first
    (Market-1501's protocol); `exclude_self` (query = gallery) drops gallery index = query index.
    """
    dist = torch.as_tensor(distmat).detach()
    rows = torch.as_tensor(rows, dtype=torch.int64, device=dist.device)
    d = dist.index_select(0, rows).double()
    drop = torch.zeros_like(d, dtype=torch.bool)
    labelled = q_pids is not None and g_pids is not None
    if labelled:
        qp = torch.as_tensor(q_pids, device=dist.device)[rows]
        gp = torch.as_tensor(g_pids, device=dist.device)
        if q_camids is not None and g_camids is not None:
            qc = torch.as_tensor(q_camids, device=dist.device)[rows]
            drop |= (gp[None, :] == qp[:, None]) & (torch.as_tensor(g_camids, device=dist.device)[None, :] == qc[:, None])
    if exclude_self:
        if dist.shape[0] != dist.shape[1]:
            raise ReidRayError(f"exclude_self: query and gallery must be the same images, got a {tuple(dist.shape)} "
                               "distance matrix")
        drop[torch.arange(len(rows), device=dist.device), rows] = True
    idx = torch.topk(d.masked_fill(drop, float("inf")), min(top, d.shape[1]), dim=1, largest=False).indices
    keep = ~drop.gather(1, idx)  # fewer than `top` entries left: the dropped ones came last
    indices = [i[k].tolist() for i, k in zip(idx.cpu(), keep.cpu())]
    if not labelled:
        return indices, None
    same = (gp[idx] == qp[:, None]).cpu()
    return indices, [s[k].tolist() for s, k in zip(same, keep.cpu())]


def _thumb(path, height: int, color: tuple[int, int, int]):
    """The image at `path` scaled to `height` pixels, in a `color` border."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.scale(img.convert("RGB"), height / img.height)
    return ImageOps.expand(img, border=max(2, height // 20), fill=color)


def ranked_lists(q_paths, g_paths, distmat, out_path, *, num_queries: int = 8, top: int = 10, q_pids=None,
                 g_pids=None, q_camids=None, g_camids=None, seed: int = 0, exclude_self: bool = False,
                 height: int = 128) -> Path:
    """One PNG at `out_path`: a row per query (`num_queries` of them drawn with a seeded RNG, in index order),
    the query image then its `top` gallery images by ascending distance (`ranked_indices`), each at `height`
    pixels with its distance under it.

    distmat: (Q, G) distances (smaller = more similar) between the images of `q_paths` and `g_paths`, numpy or
    torch. With pids, a gallery image is bordered green when it is the query's identity, red otherwise (with
    cameras too, the query's pid-and-camera entries are dropped first); without, grey. The images are pasted
    unresampled into one picture (PIL); matplotlib only writes the text on it.
    """
    from matplotlib.figure import Figure
    from PIL import Image

    dist = torch.as_tensor(distmat).detach()
    if dist.shape != (len(q_paths), len(g_paths)):
        raise ReidRayError(f"ranked_lists: distmat is {tuple(dist.shape)} for {len(q_paths)} queries and "
                           f"{len(g_paths)} gallery images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(q_paths), min(num_queries, len(q_paths)), replace=False))
    indices, matches = ranked_indices(dist, rows, top, q_pids, g_pids, q_camids, g_camids, exclude_self)
    d = dist[torch.as_tensor(rows, device=dist.device)].cpu()
    thumbs = [[_thumb(q_paths[q], height, QUERY)]
              + [_thumb(g_paths[g], height, PLAIN if matches is None else MATCH if hit else MISMATCH)
                 for g, hit in zip(ranked, matches[r] if matches else ranked)]
              for r, (q, ranked) in enumerate(zip(rows.tolist(), indices))]
    cell, tall = max(t.width for row in thumbs for t in row) + 8, thumbs[0][0].height
    gap, above, row_h = cell // 3, 14, tall + 32  # pixels: after the query, above each image, a row's height
    canvas = Image.new("RGB", (cell * (top + 1) + gap, row_h * len(rows)), "white")
    texts = []  # (x, y, text, vertical alignment) in canvas pixels
    for r, row in enumerate(thumbs):
        q, y = int(rows[r]), r * row_h + above
        for c, t in enumerate(row):
            x = c * cell + (gap if c else 0)
            canvas.paste(t, (x + (cell - t.width) // 2, y))
            texts.append((x + cell / 2, y - 2, f"rank {c}" if c else "query", "bottom"))
            if c:
                texts.append((x + cell / 2, y + tall + 2, f"{float(d[r, indices[r][c - 1]]):.3f}", "top"))
            elif q_pids is not None:
                cam = f" cam {_numpy(q_camids)[q]}" if q_camids is not None else ""
                texts.append((x + cell / 2, y + tall + 2, f"pid {_numpy(q_pids)[q]}{cam}", "top"))
    fig = Figure(figsize=(canvas.width / 100, canvas.height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="none")
    ax.set_axis_off()
    for x, y, text, va in texts:
        ax.text(x, y, text, ha="center", va=va, fontsize=6.5)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def cluster_purity(labels, truth) -> float:
    """Identity purity of a clustering: each non-outlier cluster's (label != -1) share of its majority true id,
    weighted by cluster size; nan when every point is an outlier."""
    from sklearn.metrics.cluster import contingency_matrix

    labels, truth = _numpy(labels), _numpy(truth)
    inlier = labels != -1
    if not inlier.any():
        return float("nan")
    table = contingency_matrix(truth[inlier], labels[inlier])  # (true ids, clusters)
    return float(table.max(0).sum() / table.sum())


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, 2) coordinates of the rows of `x`: PCA's first two components, or t-SNE after PCA to <= 50 dims."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(x)
    if x.shape[1] > 50:
        x = PCA(min(50, len(x)), random_state=seed).fit_transform(x)
    return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)


def cluster_map(features, labels, out_path, *, truth=None, seed: int = 0, max_points: int = 2000, title: str = "",
                method: str = "pca") -> tuple[Path, dict]:
    """A PNG at `out_path` of the features (N, D) in 2-D, coloured by pseudo-label (-1 = outlier: small, grey),
    at most `max_points` of them (a seeded draw); and its figures.

    method: "pca" (the first two components; well under a second for 2000 points) or "tsne" (PCA to 50 dims,
    then scikit-learn's t-SNE: clusters drawn apart, but about 40 s for 2000 points on 2 CPU cores).

    Returns (path, {"points": N, "clusters": non-outlier labels, "outliers": points labelled -1, "shown": points
    drawn[, "cluster_purity": `cluster_purity` in [0, 1] when the true ids `truth` are given]}), all over the N
    points; the purity is in the title too.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if method not in ("tsne", "pca"):
        raise ReidRayError(f"cluster_map: method must be 'tsne' or 'pca', got {method!r}")
    x, labels = _numpy(features).astype(np.float32).reshape(len(features), -1), _numpy(labels)
    if len(labels) != len(x) or (truth is not None and len(truth) != len(x)):
        raise ReidRayError(f"cluster_map: {len(x)} features but {len(labels)} labels"
                           + (f" and {len(truth)} true ids" if truth is not None else ""))
    if len(x) < 3 or x.shape[1] < 2:
        raise ReidRayError(f"cluster_map: needs at least 3 points of at least 2 dimensions, got {x.shape}")
    outlier = labels == -1
    stats = {"points": len(x), "clusters": len(np.unique(labels[~outlier])), "outliers": int(outlier.sum())}
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(len(x), max_points, replace=False)) if len(x) > max_points else np.arange(len(x))
    stats["shown"] = len(shown)
    xy, lab = _project(x[shown], method, seed), labels[shown]
    heading = (f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(shown)} of {len(x)} points: "
               f"{stats['clusters']} clusters, {stats['outliers']} outliers")
    if truth is not None:
        stats["cluster_purity"] = cluster_purity(labels, truth)
        heading += f", identity purity {stats['cluster_purity']:.3f}"
    fig = Figure(figsize=(7, 7))
    ax = fig.subplots()
    out_shown = lab == -1
    ax.scatter(*xy[out_shown].T, s=4, c="0.7", linewidths=0, label="outlier (-1)")
    ids, which = np.unique(lab[~out_shown], return_inverse=True)
    if len(ids) <= 20:
        colors = colormaps["tab10" if len(ids) <= 10 else "tab20"](which)
    else:  # neighbouring labels in far-apart colours
        colors = colormaps["turbo"](rng.permutation(len(ids))[which] / (len(ids) - 1))
    ax.scatter(*xy[~out_shown].T, s=7, c=colors, linewidths=0)
    if out_shown.any():
        ax.legend(loc="best", fontsize=8, markerscale=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out, stats
