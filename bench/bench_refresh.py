"""Pseudo-label refresh cost: the PseudoLabeler actor vs `--clustering local`, as a share of an epoch.

    python -m bench.bench_refresh [--init outputs/<baseline run>/checkpoint_<time>/checkpoint.pt] \\
        [--epochs 3] [--data-root data] [--paths actor,local] [--set params.num_clusters=200] [--json]

Without --init the source model is pretrained once (and cached under bench/out/refresh/pretrain).
--json adds one JSON line per path (the target set's size, the means, the source model used), for make bench.

Runs MMT on the synthetic default for a few epochs with each clustering path and
prints, per path, the mean refresh time (extract + gather + cluster + return, from
the second epoch on), its parts, and its share of the epoch (refresh + iterations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from reid_ray.config import resolve_config
from reid_ray.distributed.driver import run_training, source_inits

PARTS = ("refresh_time", "pseudo_gather_time", "pseudo_cluster_time", "pseudo_return_time", "epoch_time")


def main(argv=None) -> None:
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


if __name__ == "__main__":
    main()
