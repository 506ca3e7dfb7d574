"""Ray Train overhead: the same epochs in a bare torch loop and under Ray Train (1 worker).

    python -m bench.bench_ray_overhead [--epochs 3] [--data-root data] [--checkpoint-every 1] [--threads N] [--json]

Both run the baseline on the synthetic default (synth-a), same config and seed.
The bare loop runs with the OpenMP wait settings the workers get (reid_ray.distributed.runtime.omp_env).
Prints per-epoch time of each (first epoch excluded: warm-up), the overhead ratio
of epoch time, and the fixed cost of a Ray Train run (wall time minus epochs); and who used the cores
during epochs 2.. of each loop (bench/proc_cpu.py: the benchmark's own process, Ray's train worker, its
other actors, its daemons, anything else), to tell Ray's per-epoch work from contention for the cores.
`make bench`'s overhead section (`section_overhead`: `python -m bench.run --only overhead`) runs it with the
default passive OpenMP waits, with GOMP_SPINCOUNT=10000 and with one torch thread, side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from bench import harness


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="the run's checkpoint_every (the last epoch always)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in both loops (default: the worker's planned share of the cores)")
    ap.add_argument("--json", action="store_true", help="also one JSON line with the figures (for make bench)")
    args = ap.parse_args(argv)
    from reid_ray.distributed.runtime import omp_env

    # the bare loop waits in OpenMP as the Ray workers will (set before torch starts OpenMP): comparing a spinning
    # bare loop with passive workers measured the wait policy (+35-54 %), not Ray (bench/RESULTS.md). Here, not at
    # the top: make bench's driver imports this file for section_overhead, and its other figures keep its settings.
    for k, v in omp_env().items():
        os.environ.setdefault(k, v)
    import torch

    from bench.proc_cpu import ProcessCPU
    from reid_ray.config import resolve_config
    from reid_ray.data.domains import ensure_data
    from reid_ray.distributed.driver import run_training
    from reid_ray.distributed.resources import plan_resources
    from reid_ray.methods import METHODS, EpochContext
    from reid_ray.training.loop import train_epoch

    os.makedirs("bench/out", exist_ok=True)  # the MLflow database's folder (a fresh checkout has none)
    cfg = resolve_config("baseline", sets=[f"checkpoint_every={args.checkpoint_every}"],
                         flags=dict(data_root=args.data_root, epochs=args.epochs, eval_every=10**6, workers=1,
                                    output="bench/out/ray_overhead", mlflow_uri="sqlite:///bench/out/mlflow.db"))
    domains = ensure_data(cfg)
    plan = plan_resources({"CPU": os.cpu_count()}, 1, 0, False, max_concurrent=1)
    plan = dataclasses.replace(plan, threads=args.threads or plan.threads)
    torch.set_num_threads(plan.threads)  # the same thread count the Ray worker gets

    method = METHODS["baseline"](cfg, domains, torch.device("cpu"))
    method.setup()
    ctx = EpochContext(0)
    bare, ends = [], []
    with ProcessCPU() as bare_cpu:
        for e in range(cfg.epochs):
            ctx.epoch = e
            bare.append(train_epoch(method, ctx)["epoch_time"])
            ends.append(time.time())
    t0 = time.perf_counter()
    with ProcessCPU() as ray_cpu:
        out = run_training(cfg, plan=plan)
    wall = time.perf_counter() - t0
    import mlflow.tracking
    hist = sorted(mlflow.tracking.MlflowClient(out["mlflow_uri"]).get_metric_history(out["mlflow_run_id"],
                                                                                      "epoch_time"),
                  key=lambda h: h.step)
    ray_epochs = [h.value for h in hist]
    # epochs 2..: from the end of the first to the end of the last (each epoch's metric is logged as it ends)
    cores = {"bare": bare_cpu.cores(ends[0], ends[-1]),
             "ray": ray_cpu.cores(hist[0].timestamp / 1000, hist[-1].timestamp / 1000)}
    b, r = sum(bare[1:]) / len(bare[1:]), sum(ray_epochs[1:]) / len(ray_epochs[1:])
    print(f"bare torch epoch      {b:7.2f} s  (epochs: {', '.join(f'{x:.2f}' for x in bare)})")
    print(f"Ray Train epoch       {r:7.2f} s  (epochs: {', '.join(f'{x:.2f}' for x in ray_epochs)})")
    print(f"epoch-time overhead   {100 * (r / b - 1):+7.1f} %")
    print(f"Ray Train run wall    {wall:7.1f} s, of which fixed cost ~{wall - sum(ray_epochs):.1f} s")
    for loop, c in cores.items():
        print(f"cores used, {loop:4s} epochs 2..: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items() if v >= 0.005))
    if args.json:
        print(json.dumps({"bare_epochs": bare, "ray_epochs": ray_epochs, "bare_s": b, "ray_s": r, "overhead": r / b - 1,
                          "wall_s": wall, "fixed_s": wall - sum(ray_epochs), "omp": omp_env(),
                          "threads": plan.threads, "cores": cores}), flush=True)


def _cores(r: dict) -> str:
    """'bare b; worker w, Ray's others o' from the record's per-class cores in epochs 2.."""
    bare, ray = r.get("cores", {}).get("bare", {}), r.get("cores", {}).get("ray", {})
    if not bare or not ray:
        return "-"
    others = sum(v for k, v in ray.items() if k in ("driver", "ray actors", "ray daemons"))
    return f"{bare.get('driver', 0.0):.2f}; {ray.get('train worker', 0.0):.2f} + {others:.2f}"


def _loaded(r: dict) -> str:
    """LOADED from processes outside the benchmark and Ray (Ray's own daemons are what this section measures)."""
    if "cores" not in r:
        return harness.loaded(r)
    return harness.loaded({"others": max(r["cores"]["bare"].get("other", 0.0), r["cores"]["ray"].get("other", 0.0))})


def section_overhead(repeats: int, out: Path, quick: bool = False) -> list[str]:
    lines = ["### Ray Train's per-epoch overhead against a bare torch loop", "",
             "`python -m bench.bench_ray_overhead --epochs 4 --checkpoint-every 4 [--threads 1]` (the baseline on "
             "synth-a, 1 worker, the same thread count (the worker's planned share: 2 here, unless 1 is named) and "
             "OpenMP wait settings in both loops; epochs 2-4). Goal: ≤ 5 %. *Cores*: average cores used in epochs "
             "2-4, sampled from /proc (bench/proc_cpu.py): the bare loop's process; under Ray, its train worker + "
             "Ray's other processes (driver, controller and other actors, raylet, GCS, dashboard, agents). LOADED "
             "here counts only processes outside the benchmark and Ray.", "",
             "| OpenMP wait | bare epoch | Ray Train epoch | overhead | cores: bare; Ray worker + Ray's others "
             "| run wall (fixed cost) |", "|---|---|---|---|---|---|"]
    span = harness.span
    for name, env, threads in (("passive (default)", {}, []), ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}, []),
                               ("passive, 1 torch thread (a core left to Ray's processes)", {}, ["--threads", "1"])):
        harness.script_row(lines, "bench.bench_ray_overhead",
                           ["--epochs", "4", "--checkpoint-every", "4", "--json", *threads], name, 6,
                           lambda r, name=name: (f"| {name} | {r['bare_s']:.2f} s ({span(r['bare_epochs'][1:])}) | "
                                                 f"{r['ray_s']:.2f} s ({span(r['ray_epochs'][1:])}) | "
                                                 f"**{100 * r['overhead']:+.1f} %**{_loaded(r)} | "
                                                 f"{_cores(r)} | {r['wall_s']:.1f} s ({r['fixed_s']:.1f} s) |"), env)
    return [*lines, ""]


if __name__ == "__main__":
    main()
