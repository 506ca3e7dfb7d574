"""`make bench`: every CPU benchmark in one go, side by side with the tools users would use instead, at
several sizes; rewrites the generated section of bench/RESULTS.md and draws one PNG per benchmark.

    python -m bench.run                       # everything (about 15 minutes on 2 cores)
    python -m bench.run --only eval,rerank    # some sections
    python -m bench.run --quick               # the smallest size of each: checks the script, not the machine

Sections (each figure is the median of --repeats runs, spread = min-max, when one run takes under a minute,
else one run):
  eval     `evaluate_rank` vs the Cython evaluator of torchreid / fast-reid (`rank_cy`), same inputs, up to
           MSMT17's 11,659 x 82,161; the numbers must agree (mAP and CMC to 1e-6) (bench/bench_evaluation.py);
  rerank   `re_ranking` vs the authors' dense formulation (`reference_re_ranking`) on two feature structures
           (clustered, unstructured), ours up to Market's 3,368 x 15,913, with the peak memory above the inputs
           (bench/bench_rerank.py);
  kmeans   faiss (the refresh's k-means) vs scikit-learn's KMeans, 20 forced Lloyd iterations, 3 sizes
           (bench/bench_clustering.py);
  dbscan   our Jaccard-distance DBSCAN (k-reciprocal Jaccard on faiss kNN + scikit-learn's DBSCAN), 3 sizes
           (bench/bench_clustering.py);
  ray      the fixed cost of a Ray Train run by phase (bench/bench_ray_fixed_cost.py);
  pipeline the BoT train loader alone against the training step alone, on the embedded benchmark and on
           256x128 JPEGs with ResNet-50 (bench/bench_pipeline.py): which of the two bounds an epoch;
  mmt      one MMT epoch under Ray Train (2 workers, the PseudoLabeler actor) at 2 target-set sizes: the
           refresh, its parts and its share of the epoch, measured at the embedded 40 iterations and
           projected to the paper's 400 (bench/bench_refresh.py);
  overhead Ray Train's per-epoch overhead against a bare torch loop, with the default passive OpenMP waits,
           with GOMP_SPINCOUNT=10000, and with one torch thread (a core left to Ray's own processes), side by
           side (bench/bench_ray_overhead.py).

This file is the driver: the section table (SECTIONS: each section's code lives with its benchmark file,
`section_NAME(repeats, out, quick)` there), each section run in turn, then its part of RESULTS.md written.
The timer, the process runner and its load accounting (a figure marked LOADED), the tables' figures and plots
and the RESULTS.md writer are bench/harness.py's, shared by every benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

from bench import harness

# section -> the benchmark file that holds its `section_<name>(repeats, out, quick)`, in RESULTS.md's order
SECTIONS = {"eval": "bench_evaluation", "rerank": "bench_rerank", "kmeans": "bench_clustering",
            "dbscan": "bench_clustering", "ray": "bench_ray_fixed_cost", "pipeline": "bench_pipeline",
            "mmt": "bench_refresh", "overhead": "bench_ray_overhead"}


def run_section(name: str, repeats: int, out: Path, quick: bool) -> list[str]:
    # imported when run: a section's file may import what the others do not need (Ray, MLflow, faiss)
    module = importlib.import_module(f"bench.{SECTIONS[name]}")
    return getattr(module, f"section_{name}")(repeats, out, quick)


def header() -> list[str]:
    """The generated part's heading: this machine and the versions that gave the figures."""
    import numpy
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    return ["## `make bench`", "",
            f"`python -m bench.run` on {os.cpu_count()} cores ({cpu}), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}. Figures: median "
            f"(min-max, runs); LOADED = other processes used ≥ {harness.OTHERS_LOADED} cores on average while it ran "
            "(the machine's CPU time less the figure's own). Each section names the "
            "date, command and starting load of its last run.", ""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the smallest size of each section, 1 run each")
    ap.add_argument("--no-write", action="store_true", help="print the tables; leave bench/RESULTS.md alone")
    ap.add_argument("--results", default=str(harness.RESULTS),
                    help="the Markdown file whose generated section is rewritten")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"bench.run: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        raise SystemExit(2)
    repeats = 1 if args.quick else args.repeats
    results = Path(args.results)
    out = results.parent
    t0, load0 = time.time(), harness.load()
    head = header()
    sections = {}
    for s in only:
        t1, load1 = time.time(), harness.load()
        lines = run_section(s, repeats, out, args.quick)
        stamp = (f"*{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, `python -m bench.run --only {s}"
                 f"{' --quick' if args.quick else ''}`, load average {load1:.2f} at its start, "
                 f"{(time.time() - t1) / 60:.1f} min.*")
        sections[s] = [*lines[:1], "", stamp, *lines[1:]]
    print(f"bench.run: {len(only)} section(s) in {(time.time() - t0) / 60:.1f} min (load average {load0:.2f} "
          "at the start)")
    if not args.no_write:
        harness.write_results(head, sections, tuple(SECTIONS), results)


if __name__ == "__main__":
    main()
