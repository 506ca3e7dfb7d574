"""Sweep a method's hyperparameters with Ray Tune + Optuna (TPE) and ASHA, tracked in MLflow.

    python -m reid_ray.tune --method mmt                     # small sweep on the embedded synthetic benchmark
    python -m reid_ray.tune --method mmt --source market1501 --target dukemtmc --data-root /datasets \\
        --num-samples 32 --workers-per-trial 2 --gpus-per-worker 1
    ray job submit --working-dir . -- python -m reid_ray.tune --method mmt     # on a running cluster
    python -m reid_ray.tune --method mmt --name my-sweep --resume             # continue an interrupted sweep

The CLI resolves the sweep's base config (config.resolve_config: the search space's `fixed:` is
its config-file layer) and hands it to the Ray layer (distributed/sweep.py): each Tune trial
adds its sample, creates its PseudoLabeler actor and fits a TorchTrainer. The source model is
trained once before the sweep (cached) and shared by every trial. One MLflow parent run per
sweep, one nested run per trial; the best config is written as YAML for `reid_ray.train --config`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reid_ray import ReidRayError, storage
from reid_ray.config import TrainConfig, is_synthetic, resolve_config
from reid_ray.config.schema import METRICS
from reid_ray.config.search_space import default_path, load_search_space
from reid_ray.config.sweep import SWEEP_FILE, Sweep, latest_sweep, sweep_dir
from reid_ray.methods import METHODS, method_class


def prepare_sweep(args: argparse.Namespace) -> Sweep:
    """The sweep's settings: new from the flags, or read back from an interrupted sweep's folder."""
    output = args.output or "outputs"
    output = str(storage.absolute(output))  # trials run in Tune's own working folders: a relative one would land there
    if isinstance(args.resume, str):  # --resume NAME or --resume outputs/tune/NAME: the sweep to continue
        resumed = args.resume if storage.is_uri(args.resume) else Path(args.resume).expanduser()  # or s3://.../tune/NAME
        if storage.is_file(storage.join(resumed, SWEEP_FILE)):
            parent, args.name = storage.split(resumed)
            output = str(storage.split(parent)[0])
        elif "/" in args.resume:
            raise ReidRayError(f"--resume {args.resume}: no sweep in that folder (no {SWEEP_FILE}); pass a sweep's "
                               f"name or its folder under {sweep_dir(output, '')}")
        elif args.name and args.name != args.resume:
            raise ReidRayError(f"--resume {args.resume} and --name {args.name} name two sweeps; pass one of them")
        else:
            args.name = args.resume
    name = args.name or (latest_sweep(output, args.method) if args.resume else None)
    if name and storage.is_file(sweep_dir(output, name) / SWEEP_FILE):
        sweep = Sweep.load(sweep_dir(output, name))
        print(f"resuming sweep {name} ({sweep.method}: {sweep.base.source} -> {sweep.base.target})")
        sweep.resumed = True
        return sweep
    if args.resume:
        raise ReidRayError(f"--resume: no sweep named {name!r} under {sweep_dir(output, '')}")
    cls = method_class(args.method)
    real = bool(args.preset) or not is_synthetic(args.source or "synth-a", args.target or "synth-b")
    space_path = args.search_space or default_path(args.method, real, args.preset)
    space = load_search_space(space_path, TrainConfig(method=cls.name, params=cls.Params()))
    # trials are ranked on the target: the source test set only at a trial's last epoch
    flags = dict(data_root=args.data_root, mlflow_uri=args.mlflow_uri, output=output, experiment=args.experiment,
                 workers=args.workers_per_trial, seed=args.seed, eval_source=False, epochs=args.epochs,
                 metric=args.metric)
    cfg = resolve_config(args.method, args.source, args.target, preset=args.preset, file=space.fixed, flags=flags,
                         sets=args.overrides, sweep=True)
    if args.gpus_per_worker is None and (cfg.use_gpu.lower() in ("true", "1", "yes") or cfg.model.cuda_graph):
        args.gpus_per_worker = 1.0  # --set use_gpu=true (or a captured step): one GPU per worker, as train asks for
    if args.gpus_per_worker is not None:
        cfg.use_gpu = "true" if args.gpus_per_worker > 0 else "false"
    num_samples = args.num_samples if args.num_samples is not None else (3 if is_synthetic(cfg.source, cfg.target) else 16)
    check_sweep_flags(args, num_samples)
    return Sweep(name=name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}", method=args.method, base=cfg,
                 space_path=str(space_path), space_text=space.text, num_samples=num_samples, seed=args.seed,
                 scheduler=args.scheduler, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                 gpus_per_worker=args.gpus_per_worker, max_concurrent=args.max_concurrent,
                 optuna_storage=optuna_storage(args.optuna_storage), metric=f"{cfg.selection_metric}_last",
                 default_first=args.default_first)


def check_sweep_flags(args: argparse.Namespace, num_samples: int) -> None:
    """The sweep's own counts and limits: each at its smallest meaningful value or above, 0 included; "no
    limit" is the flag left out, never 0."""
    if num_samples < 1:
        raise ReidRayError(f"--num-samples {num_samples}: a sweep needs at least one trial")
    for flag, value, meaning in (("--workers-per-trial", args.workers_per_trial, "Ray Train workers per trial"),
                                 ("--epochs", args.epochs, "epochs per trial")):
        if value is not None and value < 1:
            raise ReidRayError(f"{flag} {value}: {meaning} must be at least 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ReidRayError(f"--max-concurrent {args.max_concurrent}: at least 1 trial at a time (leave the flag out "
                           "for as many as the cluster fits)")
    if args.grace_period is not None and args.grace_period < 1:
        raise ReidRayError(f"--grace-period {args.grace_period}: ASHA needs at least 1 epoch before it stops a trial "
                           "(leave it out: eval_every)")
    if not args.reduction_factor > 1:
        raise ReidRayError(f"--reduction-factor {args.reduction_factor}: ASHA keeps 1/factor of the trials at each "
                           "rung, so it must be above 1 (e.g. 2); --scheduler none stops no trial")
    if args.gpus_per_worker is not None and not args.gpus_per_worker >= 0:
        raise ReidRayError(f"--gpus-per-worker {args.gpus_per_worker}: must be 0 (CPU) or more")
    if args.gpus_per_worker:
        from reid_ray.distributed.driver import check_gpus_reachable

        check_gpus_reachable(True, "pass --gpus-per-worker 0")


def optuna_storage(url: str | None) -> str | None:
    """An Optuna RDB storage URL, checked (and a relative sqlite path pinned) before Ray starts."""
    if not url:
        return None
    if "://" not in url:
        raise ReidRayError(f"--optuna-storage {url}: not a storage URL; pass e.g. sqlite:///optuna.db")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).parent.is_dir():
        raise ReidRayError(f"--optuna-storage {url}: folder {Path(url[len('sqlite:///'):]).parent} does not exist")
    return url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray tune", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mmt", help=f"one of: {', '.join(sorted(METHODS))}")
    p.add_argument("--search-space", default=None, help="YAML search space (default: search_spaces/<method>.yaml; "
                   "search_spaces/real/<method>.yaml with --preset or a real dataset)")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: 3 on the synthetic default, else 16)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    p.add_argument("--no-default-trial", dest="default_first", action="store_false",
                   help="sample every trial; by default the first trial is the method's default config (where the "
                        "search space's ranges hold it), the others sampled")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can stop "
                                                                  "(default: eval_every)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA's reduction factor")
    p.add_argument("--workers-per-trial", type=int, default=None,
                   help="Ray Train workers per trial (default 2; 1 on the synthetic default)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--source", default=None, help="labelled source dataset (default synth-a), or none: the fully "
                   "unsupervised setting (the target alone; spcl, cluster_contrast)")
    p.add_argument("--target", default=None, help="unlabelled target dataset (default synth-b), or folder:PATH: your "
                                                  "own unlabelled images")
    p.add_argument("--metric", default=None, choices=("auto", *METRICS),
                   help="what ASHA, Optuna and the final pick rank trials on: target_mAP (needs target labels; the "
                        "default where the target has them), target_sharpness (how peaked the target images' "
                        "neighbourhoods are; the default for a target with no labels), target_probe (a target-only "
                        "mixup probe) or source_val_mAP (mAP on the source's held-out identities)")
    p.add_argument("--preset", default=None, help="a real-benchmark preset, e.g. duke2market (reid_ray/config/presets.py)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial")
    p.add_argument("--seed", type=int, default=0, help="seeds the TPE sampler and every trial's training")
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <source>-><target>)")
    p.add_argument("--name", default=None, help="sweep name; rerunning with an existing name resumes it")
    p.add_argument("--output", default=None, help="checkpoints, Tune state and reports (default: outputs)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="SWEEP",
                   help="continue an interrupted sweep: its name or folder (outputs/tune/NAME); alone: the sweep "
                        "--name, else the latest one of --method")
    p.add_argument("--verbose", action="store_true", help="also print Ray's and Tune's own console output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config field shared by every trial, e.g. --set model.arch=resnet50")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="keep the Optuna study in this storage (e.g. sqlite:///optuna.db), under the sweep's name, "
                        "for optuna-dashboard URL")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)
    from reid_ray.tracking import console

    console.set_verbose(args.verbose)

    def _run(a):
        sweep = prepare_sweep(a)
        from reid_ray.distributed.sweep import run_sweep
        from reid_ray.tracking.report import print_results

        try:
            out = run_sweep(sweep)
        except KeyboardInterrupt as e:
            from reid_ray import stopped_by

            why = stopped_by(e).name
            output = "" if sweep.base.output == str(storage.absolute("outputs")) else f" --output {sweep.base.output}"
            if storage.is_file(storage.join(sweep_dir(sweep.base.output, sweep.name), SWEEP_FILE)):
                line = (f"finished trials are kept, the others continue from their last checkpoint with: "
                        f"python -m reid_ray.tune --resume {sweep.name}{output}")
            else:
                line = "before the sweep's first trial; rerun the same command"
            print(f"reid-ray: stopped ({why}); {line}", file=sys.stderr, flush=True)
            e.reported = True
            raise
        print_results(out)
        return 0 if out.errors < out.trials else 1

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
