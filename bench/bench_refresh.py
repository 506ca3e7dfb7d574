"""Pseudo-label refresh cost: the PseudoLabeler actor vs `--clustering local`, as a share of an epoch.

    python -m bench.bench_refresh [--init outputs/<baseline run>/checkpoint_<time>/checkpoint.pt] \\
        [--epochs 3] [--data-root data] [--paths actor,local] [--set params.num_clusters=200] [--json]

Without --init the source model is pretrained once (and cached under bench/out/refresh/pretrain).
--json adds one JSON line per path (the target set's size, the means, the source model used), for make bench.

Runs MMT on the synthetic default for a few epochs with each clustering path and
prints, per path, the mean refresh time (extract + gather + cluster + return, from
the second epoch on), its parts, and its share of the epoch (refresh + iterations).

`make bench`'s mmt section (`section_mmt`: `python -m bench.run --only mmt`) runs the actor path at the two
target-set sizes of MMT_SIZES and tabulates the --json records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import harness

PARTS = ("refresh_time", "pseudo_gather_time", "pseudo_cluster_time", "pseudo_return_time", "epoch_time")
# make bench's (benchmark, training ids, k): 1,500 and 3,000 target images
MMT_SIZES = [("data", 150, 100), ("bench/out/mmt-t300", 300, 200)]


def main(argv=None) -> None:
    # imported here, not at the top: make bench's driver imports this file for section_mmt alone
    from mlflow.tracking import MlflowClient

    from reid_ray.config import resolve_config
    from reid_ray.distributed.driver import run_training, source_inits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default=None)
    ap.add_argument("--paths", default="actor,local", help="clustering paths to run, in turn")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--set", action="append", default=[], help="a config override, as in reid-ray train")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    Path("bench/out").mkdir(parents=True, exist_ok=True)  # the MLflow database's folder (none in a fresh checkout)
    for path in args.paths.split(","):
        cfg = resolve_config("mmt", sets=["two_sources=false", *args.set], flags=dict(
            data_root=args.data_root, init=[args.init] if args.init else [], clustering=path, epochs=args.epochs,
            eval_every=10**6,
            output="bench/out/refresh", mlflow_uri="sqlite:///bench/out/mlflow.db", experiment="bench-refresh",
            name=f"mmt-{path}-{time.strftime('%Y%m%d-%H%M%S')}"))
        cfg.init = source_inits(cfg)  # pretrained here (or found in the cache), so the record can name it
        out = run_training(cfg)
        client = MlflowClient(out["mlflow_uri"])
        mean = {}
        for key in PARTS:
            hist = sorted(client.get_metric_history(out["mlflow_run_id"], key), key=lambda h: h.step)
            mean[key] = statistics.mean(h.value for h in hist[1:]) if len(hist) > 1 else float("nan")
        share = mean["refresh_time"] / (mean["refresh_time"] + mean["epoch_time"])
        iters = cfg.params.iters
        at_400 = mean["refresh_time"] / (mean["refresh_time"] + mean["epoch_time"] * 400 / iters) if iters else None
        print(f"{path:6s} refresh {mean['refresh_time']:6.2f} s (gather {mean['pseudo_gather_time']:.2f}, cluster "
              f"{mean['pseudo_cluster_time']:.2f}, return {mean['pseudo_return_time']:.2f}) | iterations "
              f"{mean['epoch_time']:6.2f} s ({iters} iterations) | refresh share {100 * share:5.1f} %"
              + (f" | projected at the paper's 400 iterations {100 * at_400:4.1f} %" if at_400 else ""), flush=True)
        if args.json:
            print(json.dumps({"path": path, "target_images": out["domains"].target.train.num_rows, "iters": iters,
                              "epochs": args.epochs, "share": share, "projected_at_400": at_400, "init": cfg.init[0],
                              **mean}), flush=True)


def section_mmt(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### One MMT epoch at two target-set sizes: the pseudo-label refresh and its share", "",
             "`python -m bench.bench_refresh --paths actor --epochs 2` (2 Ray Train workers, the PseudoLabeler actor, "
             "k-means, the embedded 40 iterations an epoch; epoch 2's figures; the second benchmark is "
             "`reid-ray synth DIR --train-ids 300` started from the first's source model). Refresh = both mean "
             "nets' features from one pass over the target set (sharded over the workers) + gather + k-means + "
             "return. Goal: ≤ 5 % of an epoch at the paper's 400 iterations (projected from the measured refresh "
             "and per-iteration time; 400 iterations take ~4.5 min an epoch here). Measured once at 400 iterations, "
             "outside `make bench` (2026-12-03, 1,517 target images, `--set params.iters=400`, 13 min): refresh "
             "2.60 s of a 270.9 s epoch, 1.0 %, the projection's figure.", "",
             "| target images | k | refresh | gather / cluster / return | 40 iterations | share at 40 | "
             "projected at 400 |", "|---|---|---|---|---|---|---|"]
    pts: dict = {}
    init = None
    for root, ids, k in MMT_SIZES[:1] if quick else MMT_SIZES:
        if not (harness.ROOT / root / "synth-b").is_dir():
            subprocess.run([sys.executable, "-m", "reid_ray", "synth", root, "--train-ids", str(ids), "--no-camstyle",
                            "--no-texture"], cwd=harness.ROOT, check=True, capture_output=True)
        args = ["--paths", "actor", "--epochs", "2", "--data-root", root, "--json", "--set", f"params.num_clusters={k}"]
        r = harness.script_row(
            lines, "bench.bench_refresh", args + (["--init", init] if init else []), root, 7,
            lambda r, k=k: (f"| {r['target_images']:,} | {k} | {r['refresh_time']:.2f} s{harness.loaded(r)} | "
                            f"{r['pseudo_gather_time']:.2f} / {r['pseudo_cluster_time']:.2f} / "
                            f"{r['pseudo_return_time']:.2f} s | {r['epoch_time']:.2f} s | "
                            f"{100 * r['share']:.1f} % | {100 * r['projected_at_400']:.1f} % |"))
        if "error" not in r:
            init = init or r["init"]
            pts.setdefault("refresh", []).append((r["target_images"], r["refresh_time"]))
            pts.setdefault("40 iterations", []).append((r["target_images"], r["epoch_time"]))
    return harness.finish(lines, out, "mmt", "MMT epoch", "target images", pts)


if __name__ == "__main__":
    main()
