"""Does UDA help? Direct transfer (BoT baseline) vs an adapted method, over seeds.

    python -m bench.bench_uda --method mmt --seeds 0 1 2 [--data-root data] [--workers 2]

For each seed: trains the baseline on synth-a (the embedded default; once per seed, recorded
in bench/out/uda/baseline-s<seed>.json and reused by later runs of any method), reports its
source mAP and target mAP (direct transfer), then trains the UDA method on synth-b
starting from that checkpoint and reports its target mAP (MMT's second net starts from the
baseline of seed + 1, as in the paper; `--set params.two_sources=false` starts both from one). Last
epoch, no model selection on target labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from reid_ray import write_text_atomic
from reid_ray.config import resolve_config
from reid_ray.distributed.driver import run_training
from reid_ray.methods import METHODS
from reid_ray.training.checkpoint import CHECKPOINT_FILE


def adabn_target_map(init: str, cfg) -> dict:
    """Target mAP/R1 of the source model after AdaBN (BN statistics re-estimated on the target train set)."""
    from reid_ray.distributed.driver import adabn_metrics

    m = adabn_metrics(init, cfg)
    return {"target_mAP": m["target_mAP"], "target_R1": m["target_R1"]}


def baseline(seed: int, common: dict) -> dict:
    """The seed's direct-transfer baseline (+ AdaBN), trained once and shared by every method's bench run."""
    record = Path(common["output"]) / f"baseline-s{seed}.json"
    cfg = resolve_config("baseline", flags=dict(seed=seed, name=f"baseline-s{seed}", **common))
    if record.is_file():
        base = json.loads(record.read_text())
        if "adabn" in base:
            return base
    else:
        out = run_training(cfg)
        base = {"metrics": out["metrics"], "init": str(Path(out["checkpoint"]) / CHECKPOINT_FILE)}
    base["adabn"] = adabn_target_map(base["init"], cfg)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(base, indent=1))
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="mmt")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--tag", default="", help="suffix of the run names (a rerun with new settings needs a new one: "
                                              "Ray Train resumes a run whose name and storage path exist)")
    args = ap.parse_args()
    common = dict(data_root=args.data_root, workers=args.workers, output="bench/out/uda",
                  mlflow_uri="sqlite:///bench/out/mlflow.db", experiment="bench-uda")
    rows = []
    for seed in args.seeds:
        base = baseline(seed, common)
        init = base["init"]
        cfg = resolve_config(args.method, sets=args.overrides,
                             flags=dict(seed=seed, name=f"{args.method}{args.tag}-s{seed}", **common))
        # one source model per net the method starts from: this seed's baseline, then the next seeds'
        cfg.init = [init] + [baseline(seed + i, common)["init"]
                             for i in range(1, METHODS[args.method].source_models(cfg.params))]
        uda = run_training(cfg)
        b, u = base["metrics"], uda["metrics"]
        a = base["adabn"]
        rows.append((b["source_mAP"], b["target_mAP"], b["target_R1"], u["target_mAP"], u["target_R1"],
                     a["target_mAP"]))
        print(f"seed {seed}: source mAP {b['source_mAP']:.1f} | direct transfer mAP {b['target_mAP']:.1f} "
              f"R1 {b['target_R1']:.1f} | AdaBN mAP {a['target_mAP']:.1f} R1 {a['target_R1']:.1f} | "
              f"{args.method} mAP {u['target_mAP']:.1f} R1 {u['target_R1']:.1f} "
              f"(pseudo-label NMI {uda['metrics'].get('pseudo_nmi', float('nan')):.3f} at the last refresh)",
              flush=True)
    mean = [statistics.mean(c) for c in zip(*rows)]
    sd = [statistics.stdev(c) if len(rows) > 1 else 0.0 for c in zip(*rows)]
    print(f"mean of {len(rows)} seeds: source mAP {mean[0]:.1f}±{sd[0]:.1f} | direct transfer mAP {mean[1]:.1f}±{sd[1]:.1f} "
          f"R1 {mean[2]:.1f} | AdaBN mAP {mean[5]:.1f}±{sd[5]:.1f} | "
          f"{args.method} mAP {mean[3]:.1f}±{sd[3]:.1f} R1 {mean[4]:.1f} | "
          f"gain {mean[3] - mean[1]:+.1f} mAP")


if __name__ == "__main__":
    main()
