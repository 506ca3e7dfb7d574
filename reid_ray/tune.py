"""Sweep a method's hyperparameters with Ray Tune + Optuna (TPE) and ASHA, tracked in MLflow.

    python -m reid_ray.tune --method mmt                     # small sweep on the embedded synthetic benchmark
    python -m reid_ray.tune --method mmt --source market1501 --target dukemtmc --data-root /datasets \\
        --num-samples 32 --workers-per-trial 2 --gpus-per-worker 1
    ray job submit --working-dir . -- python -m reid_ray.tune --method mmt     # on a running cluster
    python -m reid_ray.tune --method mmt --name my-sweep --resume             # continue an interrupted sweep

Each Tune trial is a function that builds the trial's config (defaults < search_spaces/<method>.yaml
`fixed:` < CLI `--set` < the trial's sample), creates its PseudoLabeler actor and fits a TorchTrainer
whose rank-0 reports reach Tune through `TuneReportCallback` (the Ray Train V2 pattern). The source
model is trained once before the sweep (cached) and shared by every trial. One MLflow parent run per
sweep, one nested run per trial; the best config is written as YAML for `reid_ray.train --config`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

from reid_ray import ReidRayError, write_text_atomic
from reid_ray.config import TrainConfig, apply_overrides, flatten, from_dict, to_dict
from reid_ray.methods import METHODS
from reid_ray.search_space import SearchSpace, default_path, load_search_space

METRIC = "target_mAP_last"   # the latest target mAP, reported every epoch (see worker.py)
SWEEP_FILE = "reid_ray_sweep.json"
# the embedded default must sweep in minutes on 2 CPU cores: a shorter source pretraining, short trials
# evaluated every epoch (ASHA's rungs), one worker per trial (no DDP overhead on 2 cores)
SYNTHETIC_SWEEP = {"epochs": 3, "eval_every": 1, "pretrain_epochs": 8, "workers": 1}
# ... and, for the methods that have them, one source model for both MMT nets: a second costs another
# pretraining (~2.5 min on 2 cores) that the demo cannot afford (bench_uda measures MMT with two)
SYNTHETIC_SWEEP_PARAMS = {"two_sources": False}


def plan_resources(cluster: dict, workers: int, gpus_per_worker: float, uses_actor: bool,
                   max_concurrent: int | None = None, cpu_per_gpu: float = math.inf) -> dict:
    """How many trials run at once, and each trial's share: the trial function, its Ray Train
    workers and its pseudo-label actor. Derived from the cluster, so that concurrent trials never
    wait on each other's resources (PLATFORM_NOTES.md: on 2 CPUs, one trial at a time)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    trial_cpu = 0.1  # the trial function only builds its TorchTrainer and waits
    use_gpu = gpus_per_worker > 0 and gpus >= gpus_per_worker
    if gpus_per_worker > 0 and not use_gpu:
        raise ReidRayError(f"--gpus-per-worker {gpus_per_worker:g} but the cluster has {gpus:g} GPUs; "
                           "pass --gpus-per-worker 0 for CPU training or add GPU nodes")
    if use_gpu:
        actor_gpu = 0.25 if uses_actor else 0.0
        per_trial = workers * gpus_per_worker + actor_gpu
        fit = int(gpus / per_trial + 1e-9)
        if fit < 1:
            raise ReidRayError(f"one trial needs {per_trial:g} GPUs ({workers} workers × {gpus_per_worker:g} + "
                               f"the actor's {actor_gpu:g}); the cluster has {gpus:g}: lower --workers-per-trial")
    else:
        if workers > cpus:
            raise ReidRayError(f"{workers} CPU workers per trial but the cluster has {cpus:g} CPUs; "
                               f"pass --workers-per-trial between 1 and {int(cpus)}")
        fit = max(1, int(cpus // (workers + 0.2)))
    concurrent = min(fit, max_concurrent) if max_concurrent else fit
    budget = cpus / concurrent
    actor_cpu = (1.0 if use_gpu else round(0.05 * budget, 2)) if uses_actor else 0.0
    worker_cpu = math.floor((budget - trial_cpu - actor_cpu) / workers * 100) / 100
    if use_gpu:  # a GPU worker must fit on one GPU node, beside the actor's CPU
        if math.isfinite(cpu_per_gpu):
            worker_cpu = min(worker_cpu, max(1.0, math.floor(cpu_per_gpu * gpus_per_worker) - 1))
    if worker_cpu < (1 if use_gpu else 0.3):
        raise ReidRayError(f"{cpus:g} CPUs leave {worker_cpu:g} per worker for {concurrent} concurrent trials of "
                           f"{workers} workers; lower --max-concurrent or --workers-per-trial")
    worker = {"CPU": worker_cpu, **({"GPU": gpus_per_worker} if use_gpu else {})}
    actor = {"num_cpus": actor_cpu, **({"num_gpus": 0.25} if use_gpu and uses_actor else {})}
    # the actor is a child of the trial: it lives in the trial's placement group, in a bundle of its own
    bundles = [{"CPU": trial_cpu}] + ([{"CPU": actor_cpu, **({"GPU": 0.25} if use_gpu else {})}] if uses_actor else [])
    return {"concurrent": concurrent, "trial": bundles, "use_gpu": use_gpu, "worker": worker,
            "threads": max(1, round(worker_cpu)), "actor": actor, "actor_threads": max(1, int(budget))}


def tune_domains(space: SearchSpace) -> dict:
    from ray import tune

    make = {"uniform": lambda p: tune.uniform(p.low, p.high), "loguniform": lambda p: tune.loguniform(p.low, p.high),
            "int": lambda p: tune.randint(p.low, p.high + 1), "choice": lambda p: tune.choice(p.values)}
    return {name: make[p.distribution](p) for name, p in space.params.items()}


def run_trial(sample: dict, *, base: dict, plan: dict, sweep: dict) -> None:
    """One Tune trial: the base config + this trial's sample, trained under Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from reid_ray.train import run_training

    ctx = tune.get_context()
    cfg = apply_overrides(from_dict(copy.deepcopy(base)), dict(sample))
    # a deterministic name: a trial restarted by `--resume` finds its Train run's checkpoints
    cfg.name = f"{sweep['name']}-{ctx.get_trial_id()}"
    run_training(cfg, callbacks=[TuneReportCallback()], plan=plan,
                 tags={"mlflow.parentRunId": sweep["parent_run_id"], "sweep": sweep["name"],
                       "trial_id": ctx.get_trial_id(), "status": "running"})


def _sweep_dir(output: str, name: str) -> Path:
    return Path(output).expanduser().resolve() / "tune" / name


def _latest_sweep(output: str, method: str) -> str:
    root = Path(output).expanduser().resolve() / "tune"
    found = sorted((p for p in root.glob(f"{method}-*") if (p / SWEEP_FILE).is_file()), key=os.path.getmtime)
    if not found:
        raise ReidRayError(f"--resume: no earlier {method} sweep under {root}; pass --name of the sweep to resume")
    return found[-1].name


def prepare_sweep(args: argparse.Namespace) -> dict:
    """The sweep's settings: new from the flags, or read back from an interrupted sweep's folder."""
    from reid_ray.train import build_config

    output = args.output or "outputs"
    name = args.name or (_latest_sweep(output, args.method) if args.resume else None)
    if name and (_sweep_dir(output, name) / SWEEP_FILE).is_file():
        sweep = json.loads((_sweep_dir(output, name) / SWEEP_FILE).read_text())
        print(f"resuming sweep {name} ({sweep['method']}: {sweep['base']['source']} -> {sweep['base']['target']})")
        sweep["resumed"] = True
        return sweep
    if args.resume:
        raise ReidRayError(f"--resume: no sweep named {name!r} under {_sweep_dir(output, '')}")
    source, target, preset_overrides = args.source, args.target, {}
    if args.preset:
        from reid_ray.presets import apply_preset
        source, target, preset_overrides = apply_preset(args.preset, args.method)
        source, target = args.source_given or source, args.target_given or target
    cfg = build_config(args.method, source, target, preset_overrides)
    if cfg.source.startswith("synth") and cfg.target.startswith("synth"):
        apply_overrides(cfg, SYNTHETIC_SWEEP)
        cfg.params.update({k: v for k, v in SYNTHETIC_SWEEP_PARAMS.items() if k in cfg.params})
    # trials are ranked on the target: the source test set only at a trial's last epoch
    flags = dict(data_root=args.data_root, mlflow_uri=args.mlflow_uri, output=output, experiment=args.experiment,
                 workers=args.workers_per_trial, seed=args.seed, eval_source=False)
    apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    space_path = args.search_space or default_path(args.method)
    space = load_search_space(space_path, cfg)
    apply_overrides(cfg, space.fixed)
    apply_overrides(cfg, args.overrides)
    if args.epochs:
        cfg.epochs = args.epochs
    cfg.use_gpu = "true" if args.gpus_per_worker > 0 else "false"
    name = name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"name": name, "method": args.method, "base": to_dict(cfg), "space_path": str(space_path),
            "space_text": space.text, "num_samples": args.num_samples, "seed": args.seed,
            "scheduler": args.scheduler, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
            "gpus_per_worker": args.gpus_per_worker, "max_concurrent": args.max_concurrent, "resumed": False}


def run_sweep(sweep: dict) -> dict:
    """Pretrain once, run (or resume) the Tuner, tidy the MLflow runs; returns the results."""
    import ray
    from ray import tune

    from reid_ray import tracking
    from reid_ray.train import (
        cpus_per_gpu,
        ensure_data,
        init_ray,
        pretraining_metrics,
        source_inits,
        wait_for_gpus,
    )

    base = from_dict(copy.deepcopy(sweep["base"]))
    space = load_search_space(sweep["space_path"], base) if Path(sweep["space_path"]).is_file() else None
    ensure_data(base)
    sweep["base"]["data_root"] = base.data_root
    init_ray()
    method_cls = METHODS[base.method]
    if method_cls.needs_source_init:  # pretrained (or checked) once here, not by every trial
        inits = source_inits(base)
        base.init = sweep["base"]["init"] = inits[0]
        if len(inits) > 1:
            base.params["init2"] = sweep["base"]["params"]["init2"] = inits[1]
    uses_actor = method_cls.uses_clustering and base.clustering == "actor"
    cluster = ray.cluster_resources()
    if sweep["gpus_per_worker"] > 0:  # an autoscaling cluster may start with no GPU node
        trials = min(sweep["num_samples"], sweep["max_concurrent"] or sweep["num_samples"])
        cluster = wait_for_gpus(trials * (base.workers * sweep["gpus_per_worker"] + 0.25 * uses_actor), base.gpu_wait_s)
    plan = plan_resources(cluster, base.workers, sweep["gpus_per_worker"], uses_actor, sweep["max_concurrent"],
                          cpus_per_gpu(ray.nodes()))
    uri = tracking.resolve_uri(base.mlflow_uri)
    sweep["base"]["mlflow_uri"] = uri
    folder = _sweep_dir(base.output, sweep["name"])
    if not sweep.get("parent_run_id"):
        params = {"sweep.num_samples": sweep["num_samples"], "sweep.scheduler": sweep["scheduler"],
                  "sweep.search_space": sweep["space_path"], **flatten(base)}
        sweep["parent_run_id"] = tracking.start_run(
            uri, base.experiment or f"{base.source}->{base.target}", f"sweep-{sweep['name']}", params,
            {"method": base.method, "source_to_target": f"{base.source}->{base.target}", "sweep": sweep["name"],
             "sweep_parent": "true"}, sweep["base"])
        tracking.log_text(uri, sweep["parent_run_id"], sweep["space_text"], "search_space.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / SWEEP_FILE, json.dumps(sweep, indent=1, default=str))
    sweep["direct_transfer"] = pretraining_metrics(base.init) if base.init else {}

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=sweep["base"], plan=plan, sweep=sweep),
                                    tune.PlacementGroupFactory(plan["trial"]))
    print(f"sweep {sweep['name']}: {sweep['num_samples']} trials, {plan['concurrent']} at a time, "
          f"{base.workers} workers each ({plan['worker']}), actor {plan['actor']}", flush=True)
    if tune.Tuner.can_restore(str(folder)) and sweep.get("resumed"):
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=tune_domains(space), tune_config=_tune_config(sweep, base, plan),
                           run_config=tune.RunConfig(name=sweep["name"], storage_path=str(folder.parent),
                                                     verbose=1))
    from reid_ray.report import finalize_sweep

    status = "FAILED"
    try:
        out = finalize_sweep({"grid": tuner.fit(), "sweep": sweep, "base": base, "folder": folder, "uri": uri})
        status = "FINISHED"
    finally:
        tracking.end_run(uri, sweep["parent_run_id"], status)
    return out


def _tune_config(sweep: dict, base: TrainConfig, plan: dict):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=sweep["seed"]))
    if sweep["scheduler"] == "asha":
        # rungs must fall on evaluated epochs: the grace period is a multiple of eval_every. A trial that
        # reaches max_t ends by itself (stop_last_trials=False): a trial Tune stops is killed, and its
        # Ray Train worker group is freed only later by Train's placement-group cleaner
        grace = max(sweep["grace_period"] or base.eval_every, 1)
        grace = math.ceil(grace / base.eval_every) * base.eval_every
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=min(grace, base.epochs),
                                  reduction_factor=sweep["reduction_factor"], stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler,
                           num_samples=sweep["num_samples"], max_concurrent_trials=plan["concurrent"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray tune", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mmt", help=f"one of: {', '.join(sorted(METHODS))}")
    p.add_argument("--search-space", default=None, help="YAML search space (default: search_spaces/<method>.yaml)")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: 3 on the synthetic default, else 16)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can stop "
                                                                  "(default: eval_every)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA's reduction factor")
    p.add_argument("--workers-per-trial", type=int, default=None,
                   help="Ray Train workers per trial (default 2; 1 on the synthetic default)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--source", default=None, help="labelled source dataset (default synth-a)")
    p.add_argument("--target", default=None, help="unlabelled target dataset (default synth-b)")
    p.add_argument("--preset", default=None, help="a real-benchmark preset, e.g. duke2market (reid_ray/presets.py)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial")
    p.add_argument("--seed", type=int, default=0, help="seeds the TPE sampler and every trial's training")
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <source>-><target>)")
    p.add_argument("--name", default=None, help="sweep name; rerunning with an existing name resumes it")
    p.add_argument("--output", default=None, help="checkpoints, Tune state and reports (default: outputs)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name (default: the latest one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config field shared by every trial, e.g. --set model.arch=resnet50")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)

    def _run(a):
        import ray

        from reid_ray.report import print_results
        from reid_ray.train import init_ray

        if a.method not in METHODS:
            raise ReidRayError(f"unknown method {a.method!r}; valid: {', '.join(sorted(METHODS))}")
        a.source_given, a.target_given = a.source, a.target
        a.source, a.target = a.source or "synth-a", a.target or "synth-b"
        synthetic = a.source.startswith("synth") and a.target.startswith("synth") and not a.preset
        a.num_samples = a.num_samples or (3 if synthetic else 16)
        if a.gpus_per_worker is None:  # pass it explicitly on a cluster that scales GPUs from zero
            init_ray()
            a.gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        sweep = prepare_sweep(a)
        out = run_sweep(sweep)
        print_results(out)
        return 0 if out["grid"].num_errors < len(out["grid"]) else 1

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
