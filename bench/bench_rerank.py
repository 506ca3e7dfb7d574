"""Re-ranking speed and agreement: reid-ray's re_ranking vs the reference formulation.

    python bench/bench_rerank.py                       # 500 queries x 2,500 gallery
    python bench/bench_rerank.py --queries 3368 --gallery 15913 --skip-reference   # Market-sized, ours only

The reference (`reid_ray.evaluation.reference.reference_re_ranking`) follows the
authors' numpy code: dense N x N matrices and per-image Python loops.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from reid_ray.evaluation import re_ranking
from reid_ray.evaluation.reference import reference_re_ranking


def features(n: int, dim: int = 256, ids: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    f = centres[rng.integers(0, ids, n)] + 1.5 * rng.normal(size=(n, dim))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--gallery", type=int, default=2500)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    q = args.queries
    f = features(q + args.gallery)
    qf, gf = f[:q], f[q:]
    sq = lambda a, b: np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0)  # noqa: E731
    qg, qq, gg = sq(qf, gf), sq(qf, qf), sq(gf, gf)
    t = time.perf_counter()
    ours = re_ranking(qg, qq, gg)
    t_ours = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"reid-ray re_ranking   {t_ours:8.3f} s   (peak RSS of this process so far {rss:.2f} GiB)")
    if args.skip_reference:
        return
    t = time.perf_counter()
    ref = reference_re_ranking(qg, qq, gg)
    t_ref = time.perf_counter() - t
    print(f"reference             {t_ref:8.3f} s")
    print(f"speed-up              {t_ref / t_ours:8.1f}x   max |diff| {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
