"""Evaluation speed: reid-ray's evaluate_rank vs the Cython evaluator of torchreid/fast-reid.

    python -m bench.bench_evaluation                 # Market-sized 3,368 x 15,913
    python -m bench.bench_evaluation --queries 500 --gallery 2000

Identical random inputs (Market-like pid/camera structure) for both; prints the
wall time of each (best of --repeats), the ratio and the largest difference in
mAP and CMC (they must agree: no ties in continuous random distances).
Also `make bench`'s eval section (`section_eval`: `python -m bench.run --only eval`), the same comparison at
EVAL_SIZES, up to MSMT17's 11,659 x 82,161, each side in its own process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench import harness
from bench.harness import timed
from reid_ray.evaluation import evaluate_rank

EVAL_SIZES = [(500, 2000), (1500, 6000), (3368, 15913), (11659, 82161)]


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
    t = timed(fn, repeats, warmup=False)
    return min(t.times), t.out


def measure_eval(p: dict) -> dict:
    """One side of a make bench row, in its own process (`harness.child`)."""
    data = market_like(p["q"], p["g"], outlier=p.get("outlier", False))
    if p["impl"] == "ours":
        t = timed(lambda: evaluate_rank(*data), p.get("repeats", 3), warmup=False, enough_s=harness.ENOUGH_S)
        cmc, mAP = t.out
    else:
        from bench.cython_reference import load_rank_cy
        rank_cy = load_rank_cy()
        t = timed(lambda: rank_cy.evaluate_cy(*data, 50, False), p.get("repeats", 3), warmup=False,
                  enough_s=harness.ENOUGH_S)
        cmc, ap, _ = t.out
        mAP = float(np.mean(ap))
    return {"times": t.times, "mAP": float(mAP), "cmc": [float(c) for c in cmc[:50]]}


def section_eval(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### Evaluation: `evaluate_rank` vs the Cython evaluator (`rank_cy`)", "",
             "Market-like random distances (750 ids + distractors, 6 cameras), the same array for both. Goal: "
             "≥ 2× at identical numbers. The last row pushes one match of every query to distance 1e3, so that "
             "most entries share a cell with a match and evaluate_rank falls back to a binary search.", "",
             "| queries × gallery | reid-ray | Cython rank_cy | ratio | max diff mAP / CMC |", "|---|---|---|---|---|"]
    sizes = EVAL_SIZES[:1] if quick else EVAL_SIZES
    pts: dict = {}
    # the last row: Market size with one match of every query at distance 1e3, the input that sends
    # evaluate_rank's rows to its binary-search path (not plotted: it is not a size)
    market = [(3368, 15913)] if (3368, 15913) in sizes else []
    for (q, g), outlier in [*((s, False) for s in sizes), *((s, True) for s in market)]:
        ours = harness.child(measure_eval, {"q": q, "g": g, "impl": "ours", "repeats": repeats, "outlier": outlier})
        cy = harness.child(measure_eval, {"q": q, "g": g, "impl": "cython", "repeats": repeats, "outlier": outlier})
        diff = "-"
        if "mAP" in ours and "mAP" in cy:
            diff = (f"{abs(ours['mAP'] - cy['mAP']):.1e} / "
                    f"{max(abs(a - b) for a, b in zip(ours['cmc'], cy['cmc'])):.1e}")
        label = f"{q:,} × {g:,}" + (", one match a query at 1e3" if outlier else "")
        harness.row(lines, {} if outlier else pts, q * g, {"reid-ray": ours, "Cython rank_cy": cy},
                    f"| {label} | {harness.fig(ours)} | {harness.fig(cy)} | {harness.ratio(cy, ours)} | {diff} |")
    return harness.finish(lines, out, "eval", "evaluation", "queries × gallery", pts)


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
