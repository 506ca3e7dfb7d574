"""Re-ranking speed and agreement: reid-ray's re_ranking vs the reference formulation.

    python -m bench.bench_rerank                       # 500 queries x 2,500 gallery
    python -m bench.bench_rerank --queries 3368 --gallery 15913 --skip-reference   # Market-sized, ours only

The reference (`reid_ray.evaluation.reference.reference_re_ranking`) follows the
authors' numpy code: dense N x N matrices and per-image Python loops.
Also `make bench`'s rerank section (`section_rerank`: `python -m bench.run --only rerank`): both on two feature
structures at RERANK_SIZES, ours up to Market's 3,368 x 15,913, with the peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np

from bench import harness
from bench.harness import timed
from reid_ray.evaluation import re_ranking
from reid_ray.evaluation.reference import reference_re_ranking

RERANK_SIZES = [(500, 2500), (1000, 5000), (2000, 9000), (3368, 15913)]
RERANK_REFERENCE_MAX = 6000  # Q + G beyond which the dense reference is not run (minutes, N x N float64)


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
    t = timed(lambda: re_ranking(qg, qq, gg), 1, warmup=False)
    ours, t_ours = t.out, t.median
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"reid-ray re_ranking   {t_ours:8.3f} s   (peak RSS of this process so far {rss:.2f} GiB)")
    if args.skip_reference:
        return
    t = timed(lambda: reference_re_ranking(qg, qq, gg), 1, warmup=False)
    ref, t_ref = t.out, t.median
    print(f"reference             {t_ref:8.3f} s")
    print(f"speed-up              {t_ref / t_ours:8.1f}x   max |diff| {np.abs(ours - ref).max():.2e}")


def rerank_inputs(q: int, g: int, structure: str, seed: int = 0):
    """make bench's distance matrices (qg, qq, gg): person-like ("clustered") or with no identity structure."""
    rng = np.random.default_rng(seed)
    n = q + g
    if structure == "clustered":  # person-like: 300 identities in 256-d, each image near its identity
        centres = rng.normal(size=(300, 256)).astype(np.float32)
        f = centres[rng.integers(0, 300, n)] + 1.5 * rng.normal(size=(n, 256)).astype(np.float32)
    else:  # no identity structure at all: the k-reciprocal sets are the least alike
        f = rng.normal(size=(n, 64)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    qf, gf = f[:q], f[q:]

    def sq(a, b):  # squared euclidean, written into one array
        out = a @ b.T
        out *= -2
        out += (a * a).sum(1)[:, None]
        out += (b * b).sum(1)[None]
        return np.maximum(out, 0, out=out)

    return sq(qf, gf), sq(qf, qf), sq(gf, gf)


def measure_rerank(p: dict) -> dict:
    """One side of a make bench row, in its own process (`harness.child`)."""
    qg, qq, gg = rerank_inputs(p["q"], p["g"], p["structure"])
    inputs = (qg.nbytes + qq.nbytes + gg.nbytes) / 2**30
    fn = re_ranking if p["impl"] == "ours" else reference_re_ranking
    fn(qg[:50, :300], qq[:50, :50], gg[:300, :300])  # imports and first-call costs out of the figure
    base = harness.peak_rss_gib()
    harness.reset_peak_rss()
    base = min(base, harness.peak_rss_gib())
    t = timed(lambda: fn(qg, qq, gg), p.get("repeats", 3), warmup=False, enough_s=harness.ENOUGH_S)
    res = {"times": t.times, "inputs_gib": inputs, "peak_above_gib": max(0.0, harness.peak_rss_gib() - base)}
    if p.get("save"):
        np.save(p["save"], t.out[: min(len(t.out), 300)])  # a slice to compare with the other side's
    return res


def section_rerank(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### k-reciprocal re-ranking: `re_ranking` vs the authors' dense formulation", "",
             "k1 = 20, k2 = 6, λ = 0.3. *clustered*: 300 identities in 256-d; *unstructured*: 64-d Gaussian "
             "features, no identities. Peak = the call's resident memory above what the process held before "
             "it (inputs included there). Goals: ≥ 10× the reference, Market size < 10 s and ≤ 2 GiB above "
             "the inputs. The reference is run up to Q + G = "
             f"{RERANK_REFERENCE_MAX:,} (dense N × N float64 matrices beyond).", "",
             "| structure | queries × gallery | reid-ray | peak above inputs | reference | ratio | max diff |",
             "|---|---|---|---|---|---|---|"]
    pts: dict[str, list] = {}
    for structure in ("clustered", "unstructured"):
        for q, g in RERANK_SIZES[:1] if quick else RERANK_SIZES:
            mine, theirs = out / f"rerank-ours-{structure}-{q}.npy", out / f"rerank-ref-{structure}-{q}.npy"
            ours = harness.child(measure_rerank, {"q": q, "g": g, "structure": structure, "impl": "ours",
                                                  "repeats": repeats, "save": str(mine)})
            ref, diff = {}, "-"
            if q + g <= RERANK_REFERENCE_MAX:
                ref = harness.child(measure_rerank, {"q": q, "g": g, "structure": structure, "impl": "reference",
                                                     "repeats": 1, "save": str(theirs)})
                if mine.is_file() and theirs.is_file():
                    diff = f"{np.abs(np.load(mine) - np.load(theirs)).max():.1e}"
            peak = f"{ours['peak_above_gib']:.2f} GiB (inputs {ours['inputs_gib']:.2f})" if "times" in ours else "-"
            harness.row(lines, pts, q + g, {f"reid-ray {structure}": ours, f"reference {structure}": ref},
                        f"| {structure} | {q:,} × {g:,} | {harness.fig(ours)} | {peak} | "
                        f"{harness.fig(ref) if ref else 'not run'} | {harness.ratio(ref, ours) if ref else '-'} | "
                        f"{diff} |")
            for f in (mine, theirs):
                f.unlink(missing_ok=True)
    return harness.finish(lines, out, "rerank", "re-ranking", "queries + gallery", pts)


if __name__ == "__main__":
    main()
