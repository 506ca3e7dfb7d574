"""Choosing without target labels: how well each label-free score picks a method's trials, against target mAP.

    python -m bench.bench_selection --method mmt --trials 16                        # the default benchmark (data/)
    python -m bench.bench_selection --method spcl --trials 16
    python -m bench.bench_selection --method mmt --trials 16 --data-root data-g1    # reid-ray synth data-g1 --seed 1 --train-ids 120
    python -m bench.bench_selection --table                                         # the tables, from the records

Trial 0 is the method's embedded default; trials 1.. are drawn from its search space (search_spaces/<method>.yaml)
by Optuna's RandomSampler (seeded). Each trains at the embedded schedule under Ray Train (2 workers + the actor) from
the benchmark's seed-0 source models, evaluated every 2 epochs: target mAP, the label-free scores, and the probe
pool's features (the ensemble agreement is computed here, across the trials). One record per finished trial
(bench/records/selection/<benchmark>/<method>-t<i>.json, with its last evaluation's probe features beside it as
<method>-t<i>.npy): an interrupted measurement continues where it stopped.

The scores: the run's own label-free scores (`target_sharpness`, `source_val_mAP`, `target_probe`), the diagnostics
(`target_snd`, `target_effective_rank`, the negated mean cosine) and the sweep-level `ensemble_agreement`. Records
written before `target_sharpness` was logged get it from their SND and probe-pool size (the same formula).
For each score: Kendall τ and Spearman ρ with target mAP across the trials at their last epoch, and its regret
(the oracle's target mAP − that of the trial it picks), beside three baselines: a random pick (its expected regret),
the default config (trial 0), and the epoch number as a score (over every evaluated (trial, epoch): the last epoch,
the trials tied, so the mean of their last epochs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from reid_ray import write_text_atomic

RECORDS = Path("bench/records/selection")
OUT = Path("bench/out/selection")
SCORES = ("target_sharpness", "source_val_mAP", "target_probe", "ensemble_agreement", "target_snd",
          "target_effective_rank", "neg_mean_cosine")
SECOND = {"data-g1": dict(seed=1, train_ids=120)}  # the second benchmark's generator settings


def sample_configs(method: str, trials: int, seed: int) -> list[dict]:
    """Trial 0: {} (the default); the others drawn from the method's search space by Optuna's RandomSampler."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from reid_ray.config import resolve_config
    from reid_ray.config.search_space import default_path, load_search_space

    space = load_search_space(default_path(method), resolve_config(method))
    make = {"uniform": lambda p: FloatDistribution(p.low, p.high), "loguniform": lambda p: FloatDistribution(
        p.low, p.high, log=True), "int": lambda p: IntDistribution(p.low, p.high),
        "choice": lambda p: CategoricalDistribution(p.values)}
    dists = {name: make[p.distribution](p) for name, p in space.params.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [dict(space.fixed)] + [{**space.fixed, **study.ask(dists).params} for _ in range(trials - 1)]


def run_trial(method: str, data_root: str, bench: str, i: int, sample: dict) -> dict:
    from mlflow.tracking import MlflowClient

    from bench.bench_uda import baseline
    from reid_ray.config import resolve_config
    from reid_ray.distributed.driver import run_training
    from reid_ray.methods import METHODS

    OUT.mkdir(parents=True, exist_ok=True)
    common = dict(data_root=data_root, workers=2, mlflow_uri=f"sqlite:///{OUT / 'mlflow.db'}",
                  experiment=f"selection-{bench}")
    sources = {**common, "output": str(OUT / bench / "sources")}
    cfg = resolve_config(method, sets=dict(sample), flags=dict(seed=0, name=f"{method}-t{i}", eval_every=2,
                                                               output=str(OUT / bench / "runs"), **common))
    cfg.log_model = False
    cfg.init = [baseline(s, sources)["init"] for s in range(METHODS[method].source_models(cfg.params))]
    out = run_training(cfg)
    client = MlflowClient(out["mlflow_uri"])
    keys = ("target_mAP", "target_R1", "source_val_mAP", "target_probe", "target_sharpness", "target_snd",
            "target_mean_cosine", "target_effective_rank")
    epochs: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(out["mlflow_run_id"], key):
            epochs.setdefault(m.step, {})[key] = m.value
    run_dir = Path(out["run_dir"])
    return {"trial": i, "sample": sample, "wall_time": out["wall_time"], "date": time.strftime("%Y-%m-%d %H:%M"),
            "epochs": {str(e): v for e, v in sorted(epochs.items())},
            "features": {str(e): str(run_dir / f"epoch{e}" / "probe_features.npy") for e in sorted(epochs)}}


def measure(args) -> None:
    bench = Path(args.data_root).name
    if bench in SECOND and not (Path(args.data_root) / "synth-b").exists():
        from reid_ray.data.synthetic import SynthConfig, generate_synthetic
        generate_synthetic(args.data_root, SynthConfig(**SECOND[bench]), progress=True)
    for i, sample in enumerate(sample_configs(args.method, args.trials, args.seed)):
        record = RECORDS / bench / f"{args.method}-t{i}.json"
        if record.is_file():
            continue
        rec = run_trial(args.method, args.data_root, bench, i, sample)
        record.parent.mkdir(parents=True, exist_ok=True)
        # the last evaluation's probe features (512 x 256 float16, 256 KiB) are kept beside the record, so the
        # sweep-level ensemble agreement survives a lost bench/out/ (a new checkout); written before the record
        last_epoch = max(rec["epochs"], key=int)
        kept = record.with_suffix(".npy")
        shutil.copyfile(rec["features"][last_epoch], kept)
        rec["kept_features"] = {"epoch": last_epoch, "path": str(kept)}
        write_text_atomic(record, json.dumps(rec, indent=1))
        last = rec["epochs"][last_epoch]
        print(f"{bench} {args.method} trial {i}: target mAP {last.get('target_mAP', math.nan):.1f}, source-val "
              f"{last.get('source_val_mAP', math.nan):.1f}, probe {last.get('target_probe', math.nan):.1f} "
              f"({rec['wall_time']:.0f} s)", flush=True)


def features_path(rec: dict, epoch: str) -> Path:
    """Where a record's probe features of `epoch` are: its run folder, else the copy kept beside the record."""
    path = Path(rec["features"][epoch])
    kept = rec.get("kept_features", {})
    return Path(kept["path"]) if not path.is_file() and kept.get("epoch") == epoch else path


def with_agreement(recs: list[dict]) -> None:
    """Each record's `ensemble_agreement` at each epoch every trial evaluated (the trials' probe features)."""
    import torch

    from reid_ray.config.schema import LabelFreeConfig
    from reid_ray.evaluation.label_free import ensemble_agreement, sharpness_from_snd

    common = set.intersection(*(set(r["epochs"]) for r in recs))
    for e in common:
        paths = [features_path(r, e) for r in recs]
        if not all(p.is_file() for p in paths):
            continue
        feats = [torch.from_numpy(np.load(p).astype(np.float32)) for p in paths]
        for r, s in zip(recs, ensemble_agreement(feats, k=20), strict=True):
            r["epochs"][e]["ensemble_agreement"] = s
    for r in recs:
        for e, v in r["epochs"].items():
            if "target_mean_cosine" in v:
                v["neg_mean_cosine"] = -v["target_mean_cosine"]
            if "target_snd" in v and "target_sharpness" not in v:  # records from before the score was logged:
                # neighbourhood_sharpness from their SND and the probe pool's size
                f = features_path(r, e)
                n = np.load(f, mmap_mode="r").shape[0] if f.is_file() else LabelFreeConfig().probe_images
                v["target_sharpness"] = sharpness_from_snd(v["target_snd"], n)


def analyse(recs: list[dict]) -> tuple[list[str], dict]:
    """Rows of the table (one per score and baseline) for one method on one benchmark."""
    from scipy.stats import kendalltau, spearmanr

    last = str(max(set.intersection(*(set(map(int, r["epochs"])) for r in recs))))
    mAP = np.array([r["epochs"][last]["target_mAP"] for r in recs])
    oracle = float(mAP.max())
    rows, regrets, taus = [], {}, {}
    for score in SCORES:
        s = np.array([r["epochs"][last].get(score, math.nan) for r in recs])
        if np.isnan(s).any():
            continue
        tau, rho = kendalltau(s, mAP).statistic, spearmanr(s, mAP).statistic
        regrets[score], taus[score] = oracle - float(mAP[int(np.argmax(s))]), float(tau)
        rows.append(f"| `{score}` | {tau:+.2f} | {rho:+.2f} | {regrets[score]:.1f} |")
    regrets["random pick (expected)"] = oracle - float(mAP.mean())
    regrets["default config (trial 0)"] = oracle - float(mAP[0])
    every = [(r["epochs"][e]["target_mAP"], int(e)) for r in recs for e in r["epochs"] if "target_mAP" in r["epochs"][e]]
    regrets["epoch number (last epoch, trials tied)"] = max(m for m, _ in every) - float(mAP.mean())
    for name in ("random pick (expected)", "default config (trial 0)", "epoch number (last epoch, trials tied)"):
        rows.append(f"| {name} | | | {regrets[name]:.1f} |")
    return rows, {"epoch": int(last), "oracle": oracle, "trials": len(recs), "mean": float(mAP.mean()),
                  "sd": statistics.stdev(mAP.tolist()) if len(mAP) > 1 else 0.0, "regret": regrets, "tau": taus}


# the default label-free metric's candidates (the scores a run can rank its epochs on) and the benchmark it is chosen
# on: the lowest mean regret over the methods measured there, ties to the higher mean τ (bench/RESULTS.md)
CANDIDATES = ("target_sharpness", "target_probe", "source_val_mAP")
DEFAULT_BENCHMARK = "data"


def rule(infos: dict[str, dict]) -> list[str]:
    """The rule's lines: each candidate's mean regret and τ over the methods of the default benchmark, best first."""
    found = [c for c in CANDIDATES if all(c in i["regret"] for i in infos.values())]
    mean = {c: (statistics.mean(i["regret"][c] for i in infos.values()), statistics.mean(i["tau"][c] for i in
                                                                                         infos.values())) for c in found}
    order = sorted(found, key=lambda c: (mean[c][0], -mean[c][1]))
    what = ", ".join(f"{m} ({i['trials']} trials)" for m, i in sorted(infos.items()))
    return [f"**The rule on {DEFAULT_BENCHMARK}** (over {what}): " + "; ".join(
        f"`{c}` mean regret {mean[c][0]:.1f}, mean τ {mean[c][1]:+.2f}" for c in order) + (
        f". Chosen: `{order[0]}`." if order else "."), ""]


def table() -> str:
    text, infos = [], {}
    for folder in sorted(p for p in RECORDS.iterdir() if p.is_dir()) if RECORDS.is_dir() else []:
        for method in sorted({p.name.rsplit("-t", 1)[0] for p in folder.glob("*-t*.json")}):
            recs = sorted((json.loads(p.read_text()) for p in folder.glob(f"{method}-t*.json")), key=lambda r: r["trial"])
            if len(recs) < 3:
                continue
            with_agreement(recs)
            rows, info = analyse(recs)
            if folder.name == DEFAULT_BENCHMARK:
                infos[method] = info
            text += [f"**{method} on {folder.name}**: {info['trials']} trials at epoch {info['epoch']}; target mAP "
                     f"{info['mean']:.1f} ± {info['sd']:.1f}, oracle {info['oracle']:.1f}.", "",
                     "| score | Kendall τ | Spearman ρ | regret (mAP) |", "|---|---|---|---|", *rows, ""]
    if infos:
        text += rule(infos)
    return "\n".join(text) or "no records yet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="mmt")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampler of the trials' configs")
    ap.add_argument("--table", action="store_true", help="no training: the tables from the records")
    args = ap.parse_args()
    if not args.table:
        measure(args)
    print(table())


if __name__ == "__main__":
    main()
