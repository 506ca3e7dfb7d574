"""SAN ablation: does texture regeneration make a better source model, for itself and as MMT's start?

    python -m bench.bench_san --seeds 0 1 2 [--data-root data] [--workers 2] [--no-mmt]

For each seed, three source models trained on synth-a (the synthetic benchmark's per-identity textures
are SAN's target): the BoT baseline (shared with bench_uda: bench/out/uda/baseline-s<seed>.json),
SAN without the decoder's triplet constraints (tr_weight 0) and SAN. Reported: source mAP
(supervised) and target mAP (direct transfer), then target mAP of MMT started from each (`--init`).
Every run is recorded in bench/out/san/<name>.json and reused by later invocations; a run of the same
name that already FINISHED in the bench's MLflow experiment (e.g. `python -m reid_ray.train --method san
--seed 0 --name san-s0 --output bench/out/san --mlflow-uri sqlite:///bench/out/mlflow.db --experiment
bench-san`) is adopted, not retrained. MMT from the baseline is bench_uda's run (`mmt-adabn-s<seed>`, same
settings: both nets from the one source model, `params.two_sources=false`) when it exists. Last epoch,
no model selection on target labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.bench_uda import baseline
from reid_ray import write_text_atomic
from reid_ray.config import resolve_config
from reid_ray.distributed.driver import run_training
from reid_ray.training.checkpoint import CHECKPOINT_FILE

OUT = Path("bench/out/san")
VARIANTS = {"baseline": None, "san-notr": ["tr_weight=0"], "san": []}


def finished_run(name: str, common: dict) -> dict | None:
    """The last metrics and latest checkpoint of a FINISHED MLflow run called `name`, or None."""
    import mlflow

    client = mlflow.MlflowClient(common["mlflow_uri"])
    exp = client.get_experiment_by_name(common["experiment"])
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    ckpts = sorted((Path(common["output"]) / name).glob("checkpoint_*/" + CHECKPOINT_FILE))
    if not runs or not ckpts:
        return None
    print(f"{name}: adopting finished MLflow run {runs[0].info.run_id} ({common['experiment']})", flush=True)
    return {"metrics": dict(runs[0].data.metrics), "init": str(ckpts[-1].resolve()), "adopted": runs[0].info.run_id}


def recorded(name: str, method: str, overrides: list[str], seed: int, common: dict, **kw) -> dict:
    """Train once (`name` is the record and the Ray run name), then read the record."""
    record = Path(common["output"]) / f"{name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    res = finished_run(name, common)
    if res is None:
        out = run_training(resolve_config(method, sets=overrides, flags=dict(seed=seed, name=name, **common, **kw)))
        res = {"metrics": {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))},
               "init": str(Path(out["checkpoint"]) / CHECKPOINT_FILE)}
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--no-mmt", action="store_true", help="source models only")
    ap.add_argument("--mmt-set", action="append", default=[], help="overrides of the MMT runs")
    ap.add_argument("--baseline-mmt", default="mmt-adabn", help="bench_uda's MMT run names (<this>-s<seed>) to reuse "
                                                               "for the baseline row ('' to train it here)")
    args = ap.parse_args()
    common = dict(data_root=args.data_root, workers=args.workers, output=str(OUT),
                  mlflow_uri="sqlite:///bench/out/mlflow.db", experiment="bench-san")
    rows: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        for variant, overrides in VARIANTS.items():
            if overrides is None:
                src = baseline(seed, {**common, "output": "bench/out/uda", "experiment": "bench-uda"})
            else:
                src = recorded(f"{variant}-s{seed}", "san", overrides, seed, common)
            m = src["metrics"]
            mmt = float("nan")
            uda = {**common, "output": "bench/out/uda", "experiment": "bench-uda"}
            reuse = finished_run(f"{args.baseline_mmt}-s{seed}", uda) if overrides is None and args.baseline_mmt \
                and not args.mmt_set else None
            if reuse is not None:
                mmt = reuse["metrics"]["target_mAP"]
            elif not args.no_mmt:
                # both MMT nets from this one source model: the comparison isolates the source model
                mmt = recorded(f"mmt-from-{variant}-s{seed}", "mmt", ["two_sources=false", *args.mmt_set], seed, common,
                               init=[src["init"]])["metrics"]["target_mAP"]
            rows[variant].append((m["source_mAP"], m["target_mAP"], mmt))
            print(f"seed {seed} {variant:<9} source mAP {m['source_mAP']:5.1f} | direct transfer mAP "
                  f"{m['target_mAP']:5.1f} | MMT from it: target mAP {mmt:5.1f}", flush=True)
    print(f"\nmean ± sd over seeds {args.seeds}:")
    for variant, r in rows.items():
        cols = [(statistics.mean(c), statistics.stdev(c) if len(c) > 1 else 0.0) for c in zip(*r)]
        print(f"  {variant:<9} source mAP {cols[0][0]:5.1f}±{cols[0][1]:.1f} | direct transfer "
              f"{cols[1][0]:5.1f}±{cols[1][1]:.1f} | MMT {cols[2][0]:5.1f}±{cols[2][1]:.1f}")


if __name__ == "__main__":
    main()
