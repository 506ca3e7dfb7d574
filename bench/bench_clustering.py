"""k-means for pseudo-labels: faiss (reid-ray's path) vs scikit-learn on the same features.

    python -m bench.bench_clustering                          # Market-sized: 12,936 x 2,048, k = 500
    python -m bench.bench_clustering --n 1500 --dim 256 --k 100   # the synthetic default's target set

Features: L2-normalised Gaussian blobs (k/0.7 identities, like person features).
Both run the same number of Lloyd iterations (--niter, forced: no early stop) from
one initialisation; prints wall time, iterations/s and the NMI of each labelling
against the blob identities.
Also `make bench`'s kmeans and dbscan sections (`python -m bench.run --only kmeans,dbscan`): faiss (the
refresh's k-means) vs scikit-learn's KMeans at KMEANS_SIZES, and our Jaccard-distance DBSCAN (k-reciprocal
Jaccard on faiss kNN + scikit-learn's DBSCAN) at DBSCAN_SIZES, each figure in its own process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from bench import harness
from bench.harness import timed
from reid_ray.clustering.kmeans import kmeans_labels
from reid_ray.clustering.metrics import cluster_quality

KMEANS_SIZES = [(1500, 256, 100), (5000, 1024, 250), (12936, 2048, 500)]
DBSCAN_SIZES = [1500, 5000, 12936]


def person_like(n: int, dim: int, ids: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim)).astype(np.float32)
    truth = rng.integers(0, ids, n)
    x = centres[truth] + 1.2 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12936)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--niter", type=int, default=20)
    args = ap.parse_args()
    x, truth = person_like(args.n, args.dim, int(args.k / 0.7))
    print(f"{args.n} x {args.dim}, k={args.k}, {args.niter} iterations, {os.cpu_count()} CPU threads")
    fa = timed(lambda: kmeans_labels(x, args.k, niter=args.niter, early_stop=False, max_points_per_centroid=10**6), 1,
               warmup=False)
    t_faiss = fa.median
    print(f"faiss-cpu kmeans   {t_faiss:7.2f} s  NMI {cluster_quality(fa.out.labels, truth)['nmi']:.3f}")
    sk = timed(lambda: KMeans(args.k, n_init=1, max_iter=args.niter, tol=0, random_state=0).fit(x), 1, warmup=False)
    t_sk = sk.median
    print(f"sklearn KMeans     {t_sk:7.2f} s  NMI {cluster_quality(sk.out.labels_, truth)['nmi']:.3f}")
    print(f"speed-up           {t_sk / t_faiss:7.1f}x")


def measure_kmeans(p: dict) -> dict:
    """One side of a make bench k-means row (20 forced Lloyd iterations), in its own process (`harness.child`)."""
    x, _ = person_like(p["n"], p["dim"], int(p["k"] / 0.7))
    if p["impl"] == "faiss":
        from reid_ray.clustering.kmeans import require_faiss
        faiss = require_faiss()

        def run():
            km = faiss.Kmeans(x.shape[1], p["k"], niter=20, seed=0, min_points_per_centroid=1,
                              max_points_per_centroid=10**7)
            km.train(x)
    else:
        def run():
            KMeans(p["k"], n_init=1, max_iter=20, tol=0, random_state=0, algorithm="lloyd").fit(x)
    return {"times": timed(run, p.get("repeats", 3), warmup=False, enough_s=harness.ENOUGH_S).times}


def measure_dbscan(p: dict) -> dict:
    """One make bench DBSCAN row's figure, in its own process (`harness.child`)."""
    from reid_ray.clustering.dbscan import dbscan_labels

    x, _ = person_like(p["n"], 256, max(10, p["n"] // 20))
    dbscan_labels(x[:200])  # scikit-learn's import out of the figure
    t = timed(lambda: dbscan_labels(x), p.get("repeats", 3), warmup=False, enough_s=harness.ENOUGH_S)
    return {"times": t.times, "clusters": int(t.out.stats["num_clusters"])}


def section_kmeans(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### k-means: faiss (the refresh's) vs scikit-learn", "",
             "L2-normalised person-like blobs (k / 0.7 identities), 20 forced Lloyd iterations, one "
             "initialisation.", "", "| n × dim, k | faiss-cpu | scikit-learn KMeans | ratio |", "|---|---|---|---|"]
    pts: dict = {}
    for n, dim, k in KMEANS_SIZES[:1] if quick else KMEANS_SIZES:
        fa = harness.child(measure_kmeans, {"n": n, "dim": dim, "k": k, "impl": "faiss", "repeats": repeats})
        sk = harness.child(measure_kmeans, {"n": n, "dim": dim, "k": k, "impl": "sklearn", "repeats": repeats})
        harness.row(lines, pts, n * dim * k, {"faiss": fa, "scikit-learn": sk},
                    f"| {n:,} × {dim:,}, k = {k} | {harness.fig(fa)} | {harness.fig(sk)} | {harness.ratio(sk, fa)} |")
    return harness.finish(lines, out, "kmeans", "k-means", "n × dim × k", pts)


def section_dbscan(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### Jaccard-distance DBSCAN (MMT's and SpCL's DBSCAN pseudo-labels)", "",
             "256-d person-like blobs (n / 20 identities); k1 = 30, k2 = 6, eps 0.6 (the defaults). No peer is run: "
             "the authors' version (OpenUnReID's `compute_jaccard_distance`) is GPU-first.", "",
             "| n | reid-ray | clusters |", "|---|---|---|"]
    pts: dict = {}
    for n in DBSCAN_SIZES[:1] if quick else DBSCAN_SIZES:
        r = harness.child(measure_dbscan, {"n": n, "repeats": repeats})
        harness.row(lines, pts, n, {"reid-ray": r}, f"| {n:,} | {harness.fig(r)} | {r.get('clusters', '-')} |")
    return harness.finish(lines, out, "dbscan", "Jaccard-DBSCAN", "images", pts)


if __name__ == "__main__":
    main()
