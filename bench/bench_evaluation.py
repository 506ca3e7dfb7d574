"""Evaluation speed: reid-ray's evaluate_rank vs the Cython evaluator of torchreid/fast-reid.

    python bench/bench_evaluation.py                 # Market-sized 3,368 x 15,913
    python bench/bench_evaluation.py --queries 500 --gallery 2000

Identical random inputs (Market-like pid/camera structure) for both; prints the
wall time of each (best of --repeats), the ratio and the largest difference in
mAP and CMC (they must agree: no ties in continuous random distances).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reid_ray.evaluation import evaluate_rank


def market_like(q: int, g: int, seed: int = 0, outlier: bool = False):
    rng = np.random.default_rng(seed)
    num_ids = 750
    g_pids = rng.integers(0, num_ids + 1, g)  # pid 0 = distractors
    g_cams = rng.integers(0, 6, g)
    q_pids = rng.integers(1, num_ids + 1, q)
    q_cams = rng.integers(0, 6, q)
    # distances that carry some identity signal, so the ranks are not uniform; float32, as features give
    # (built in place: at MSMT17's size one such matrix is 3.8 GB)
    dist = rng.random((q, g), dtype=np.float32)
    for lo in range(0, q, 1024):
        dist[lo:lo + 1024] += np.float32(0.15) * (g_pids[None, :] != q_pids[lo:lo + 1024, None])
    if outlier:  # one match of every query far out (a junk image): its range is mostly empty
        for i in range(q):
            m = np.flatnonzero((g_pids == q_pids[i]) & (g_cams != q_cams[i]))
            if len(m):
                dist[i, m[0]] = np.float32(1e3)
    return dist, q_pids, g_pids, q_cams, g_cams


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = market_like(args.queries, args.gallery)
    t_ours, (cmc, mAP) = best_of(lambda: evaluate_rank(*data), args.repeats)
    print(f"reid-ray evaluate_rank   {t_ours:7.3f} s   mAP {mAP:.6f}  R1 {cmc[0]:.6f}")
    try:
        rank_cy = __import__("bench.cython_reference", fromlist=["load_rank_cy"]).load_rank_cy()
    except Exception as e:  # no compiler / no network to PyPI: say so, keep our figure
        print(f"Cython reference unavailable: {e}")
        return
    # fast-reid's copy returns (cmc, per-query AP, per-query INP)
    t_cy, (cmc_cy, all_ap, _) = best_of(lambda: rank_cy.evaluate_cy(*data, 50, False), args.repeats)
    mAP_cy = float(np.mean(all_ap))
    print(f"Cython rank_cy           {t_cy:7.3f} s   mAP {mAP_cy:.6f}  R1 {cmc_cy[0]:.6f}")
    print(f"ratio (Cython / ours)    {t_cy / t_ours:7.2f}x")
    print(f"max |diff|: mAP {abs(mAP - mAP_cy):.2e}  CMC {np.abs(cmc - cmc_cy).max():.2e}")


if __name__ == "__main__":
    main()
