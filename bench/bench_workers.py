"""Worker-count invariance and the baseline's numbers on the synthetic default.

    python -m bench.bench_workers --workers 1 2 --seeds 0 [--data-root data]

Trains the BoT baseline (synth-a -> synth-b, the embedded default config) under
Ray Train for each (seed, worker count) at the same global batch, and prints
source (supervised) and target (direct transfer) mAP/R1 of the last epoch.
"""

from __future__ import annotations

import argparse
import statistics

from reid_ray.config import resolve_config
from reid_ray.distributed.driver import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--mlflow-uri", default="sqlite:///bench/out/mlflow-workers.db")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for w in args.workers:
            cfg = resolve_config("baseline", flags=dict(data_root=args.data_root, workers=w, seed=seed,
                                                        output="bench/out/workers", mlflow_uri=args.mlflow_uri,
                                                        experiment="bench-workers", name=f"baseline-w{w}-s{seed}"))
            m = run_training(cfg)["metrics"]
            rows.append((seed, w, m["source_mAP"], m["source_R1"], m["target_mAP"], m["target_R1"]))
            print(f"seed {seed} workers {w}: source mAP {m['source_mAP']:.1f} R1 {m['source_R1']:.1f} | "
                  f"target mAP {m['target_mAP']:.1f} R1 {m['target_R1']:.1f}", flush=True)
    for w in args.workers:
        sel = [r for r in rows if r[1] == w]
        print(f"workers {w}, mean of {len(sel)} seeds: source mAP {statistics.mean(r[2] for r in sel):.1f}, "
              f"target mAP {statistics.mean(r[4] for r in sel):.1f} (R1 {statistics.mean(r[5] for r in sel):.1f})")


if __name__ == "__main__":
    main()
