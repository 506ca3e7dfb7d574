"""k-means for pseudo-labels: faiss (reid-ray's path) vs scikit-learn on the same features.

    python -m bench.bench_clustering                          # Market-sized: 12,936 x 2,048, k = 500
    python -m bench.bench_clustering --n 1500 --dim 256 --k 100   # the synthetic default's target set

Features: L2-normalised Gaussian blobs (k/0.7 identities, like person features).
Both run the same number of Lloyd iterations (--niter, forced: no early stop) from
one initialisation; prints wall time, iterations/s and the NMI of each labelling
against the blob identities.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from sklearn.cluster import KMeans

from reid_ray.clustering.kmeans import kmeans_labels
from reid_ray.clustering.metrics import cluster_quality


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
    t = time.perf_counter()
    res = kmeans_labels(x, args.k, niter=args.niter, early_stop=False, max_points_per_centroid=10**6)
    t_faiss = time.perf_counter() - t
    print(f"faiss-cpu kmeans   {t_faiss:7.2f} s  NMI {cluster_quality(res.labels, truth)['nmi']:.3f}")
    t = time.perf_counter()
    km = KMeans(args.k, n_init=1, max_iter=args.niter, tol=0, random_state=0).fit(x)
    t_sk = time.perf_counter() - t
    print(f"sklearn KMeans     {t_sk:7.2f} s  NMI {cluster_quality(km.labels_, truth)['nmi']:.3f}")
    print(f"speed-up           {t_sk / t_faiss:7.1f}x")


if __name__ == "__main__":
    main()
