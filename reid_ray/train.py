"""Train one method under Ray Train (DDP over N workers, checkpoints, resume) with MLflow tracking.

    python -m reid_ray.train                                   # BoT baseline, synth-a -> synth-b, 2 CPU workers
    python -m reid_ray.train --method baseline --source market1501 --target dukemtmc \\
        --data-root /datasets --workers 4 --set model.arch=resnet50 --set model.pretrained=/w/r50.pth
    reid-ray train ...                                         # the same

On the embedded default it writes the synthetic benchmark if missing, starts a
local Ray (or joins the cluster in RAY_ADDRESS), trains, and prints source
(supervised) and target (direct transfer) mAP/R1, the wall time, and where the
MLflow run and checkpoint are.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from reid_ray import ReidRayError
from reid_ray.config import (
    SYNTHETIC_DEFAULTS,
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
)
from reid_ray.data.readers import dataset_names, read_dataset
from reid_ray.data.synthetic import DOMAINS as SYNTH_DOMAINS
from reid_ray.data.synthetic import SynthConfig, generate_synthetic
from reid_ray.methods import METHODS, Domains
from reid_ray.worker import CHECKPOINT_FILE, cluster_spec, train_loop_per_worker

# --------------------------------------------------------------------------- driver side

def build_config(method: str = "baseline", source: str = "synth-a", target: str = "synth-b",
                 overrides: list[str] | dict | None = None, **fields) -> TrainConfig:
    """Defaults < synthetic-demo defaults (when both domains are synthetic) < the method's paper config and
    params < its synthetic overrides < fields < overrides."""
    if method not in METHODS:
        raise ReidRayError(f"unknown method {method!r}; valid: {', '.join(sorted(METHODS))}")
    for d in (source, target):
        if d.lower() not in dataset_names():
            raise ReidRayError(f"unknown dataset {d!r}; valid names: {', '.join(dataset_names())}")
    cfg = TrainConfig(method=method, source=source.lower(), target=target.lower())
    m = METHODS[method]
    cfg.params = dict(m.default_params)
    if cfg.source in SYNTH_DOMAINS and cfg.target in SYNTH_DOMAINS:
        apply_overrides(cfg, {**SYNTHETIC_DEFAULTS, **m.config_defaults, **m.synthetic_overrides})
    else:
        apply_overrides(cfg, m.config_defaults)
    apply_overrides(cfg, {k: v for k, v in fields.items() if v is not None})
    apply_overrides(cfg, overrides or [])
    return cfg


def load_config_file(path: str) -> tuple[str | None, str | None, str | None, dict]:
    """A config YAML (a sweep's best_config.yaml, a run's config.yaml, or a hand-written subset):
    (method, source, target, dotted overrides)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ReidRayError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReidRayError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ReidRayError(f"--config {path}: expected a mapping of config keys (e.g. method: mmt, optim: {{lr: 3.5e-4}})")

    def dotted(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flat = dotted(data)
    method, source, target = (flat.pop(k, None) for k in ("method", "source", "target"))
    for k in ("name", "resume"):
        flat.pop(k, None)
    return method, source, target, flat


def ensure_data(cfg: TrainConfig) -> Domains:
    """Generate the synthetic domains if asked for and missing; read both domains (fails early, clearly)."""
    root = Path(cfg.data_root).expanduser().resolve()
    wanted = tuple(d for d in SYNTH_DOMAINS if d in (cfg.source, cfg.target))
    missing = tuple(d for d in wanted if not (root / d).exists())
    if missing:
        print(f"writing the synthetic benchmark ({', '.join(missing)}) to {root} ...", flush=True)
        generate_synthetic(root, SynthConfig(domains=missing), progress=True)
    cfg.data_root = str(root)
    return Domains(read_dataset(cfg.source, root), read_dataset(cfg.target, root))


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # a job or a running cluster: resources belong to the cluster (PLATFORM_NOTES.md)
    else:
        # OpenMP threads that spin while they wait make every parallel region crawl as soon as another
        # process wants the core (Ray's daemons, the actor, a second worker): 5× slower epochs on 2 cores
        # (bench/RESULTS.md). Passive waiting costs nothing when the core is free.
        # Ray Train's placement-group cleaner (which frees the workers of a trial that Tune stops) finds
        # the cluster through the state API: with a second local Ray on the machine, "auto" is ambiguous
        # and the cleaner fails, so the next trial waits forever. Name this instance's API server for it.
        port = _free_port()
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        ray.init(log_to_driver=True, dashboard_port=port, runtime_env={"env_vars": env})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpus_per_gpu(nodes: list[dict]) -> float:
    """The fewest CPUs per GPU on any live GPU node: a GPU worker asking for more fits on no node."""
    ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in nodes
              if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) > 0]
    return min(ratios) if ratios else math.inf


def wait_for_gpus(needed: float, timeout_s: float) -> dict:
    """Ask Ray's autoscaler for `needed` GPUs (a cluster may start with none) and wait for them."""
    import ray
    from ray.autoscaler.sdk import request_resources

    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) >= needed or timeout_s <= 0:
        return cluster
    print(f"waiting up to {timeout_s:.0f} s for the autoscaler to add {needed:g} GPUs "
          f"(the cluster has {cluster.get('GPU', 0):g}) ...", flush=True)
    request_resources(bundles=[{"GPU": 1}] * math.ceil(needed))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and ray.cluster_resources().get("GPU", 0) < needed:
        time.sleep(10)
    return ray.cluster_resources()


def worker_resources(cfg: TrainConfig, cluster: dict, nodes: list[dict] | None = None) -> tuple[bool, dict, int]:
    """(use_gpu, resources per worker, torch threads per worker), derived from the cluster."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    use_gpu = gpus >= 1 if cfg.use_gpu == "auto" else cfg.use_gpu.lower() in ("true", "1", "yes")
    if use_gpu:
        if cfg.workers > gpus:
            raise ReidRayError(f"{cfg.workers} GPU workers requested but the cluster has {gpus:g} GPUs; "
                               f"pass --workers {int(gpus)} or add GPU nodes")
        # one CPU per GPU node stays free for the pseudo-label actor and Ray's own actors
        per_cpu = max(1.0, min((cpus - 1) // cfg.workers, cpus_per_gpu(nodes or []) - 1))
        return True, {"CPU": per_cpu, "GPU": 1}, int(per_cpu)
    if cfg.workers < 1 or cfg.workers > cpus:
        raise ReidRayError(f"{cfg.workers} CPU workers requested but the cluster has {cpus:g} CPUs; "
                           f"pass --workers between 1 and {int(cpus)}")
    # leave ~10% for Ray's controller and the driver (PLATFORM_NOTES.md)
    per_cpu = round(0.9 * cpus / cfg.workers, 2)
    return False, {"CPU": per_cpu}, max(1, round(per_cpu))


def run_training(cfg: TrainConfig, *, callbacks: list | None = None, plan: dict | None = None,
                 tags: dict | None = None) -> dict:
    """Train under Ray Train; returns the final metrics plus run/checkpoint locations.

    `plan` (from `tune.plan_resources`) fixes the worker and actor resources of one Tune
    trial; without it they are derived from the whole cluster. `tags` go on the MLflow run
    (a trial's parent run and trial id)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from reid_ray import tracking

    domains = ensure_data(cfg)
    init_ray()
    if plan is not None:
        use_gpu, resources, threads = plan["use_gpu"], plan["worker"], plan["threads"]
    else:
        cluster = ray.cluster_resources()
        if cfg.use_gpu.lower() in ("true", "1", "yes"):
            cluster = wait_for_gpus(cfg.workers, cfg.gpu_wait_s)
        use_gpu, resources, threads = worker_resources(cfg, cluster, ray.nodes())
    name = cfg.name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    output = Path(cfg.output).expanduser().resolve()
    method_cls = METHODS[cfg.method]
    init = source_inits(cfg)
    labeler = None
    if method_cls.uses_clustering and cfg.clustering == "actor":
        from reid_ray.clustering.actor import create_pseudo_labeler
        t = domains.target.train  # ground truth for quality metrics only (logged, never trained on)
        labeler = create_pseudo_labeler(cluster_spec(cfg), t["pid"].to_numpy(), t["camid"].to_numpy(),
                                        options=(plan["actor"], plan["actor_threads"]) if plan else None)
    uri = tracking.resolve_uri(cfg.mlflow_uri)
    run_id = tracking.start_run(
        uri, cfg.experiment or f"{cfg.source}->{cfg.target}", name, flatten(cfg),
        {"method": cfg.method, "source": cfg.source, "target": cfg.target,
         "source_to_target": f"{cfg.source}->{cfg.target}", **(tags or {})}, to_dict(cfg))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "threads": threads, "mlflow_uri": uri, "mlflow_run_id": run_id,
                           "run_dir": str(output / name), "init": init, "pseudo_labeler": labeler},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(output), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines on the console (its per-report dump is silenced in worker.py)
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    finally:
        tracking.end_run(uri, run_id, status)
        if labeler is not None:
            ray.kill(labeler)  # the actor dies with its run
    return {"metrics": dict(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "run_dir": str(output / name), "mlflow_uri": uri, "mlflow_run_id": run_id,
            "wall_time": time.perf_counter() - t0, "domains": domains}


PRETRAIN_IGNORED = ("method", "name", "experiment", "output", "resume", "mlflow_uri", "workers", "init",
                    "clustering", "params", "max_failures", "eval_every", "eval_source", "gpu_wait_s")


def source_inits(cfg: TrainConfig) -> list[str]:
    """The source-trained checkpoints the method starts from: `--init` (and MMT's `params.init2`), else
    baselines pretrained (and cached) with the run's seed, seed + 1, ... Empty for methods that need none."""
    import dataclasses

    method_cls = METHODS[cfg.method]
    if not method_cls.needs_source_init:
        return []
    n = method_cls.source_models(cfg.params)
    given = [cfg.init, *([cfg.params.get("init2", "")] if n > 1 else [])]
    if n > 1 and given[0] and not given[1]:
        print(f"{cfg.method}: --init gives net 1's source model; net 2's is pretrained with seed {cfg.seed + 1} "
              "(pass --init A B for both, or --set two_sources=false to start both from A)", flush=True)
    inits = [path or source_pretraining(dataclasses.replace(cfg, seed=cfg.seed + i)) for i, path in enumerate(given)]
    for flag, path in zip(("--init", "params.init2"), inits):
        if not Path(path).is_file():
            raise ReidRayError(f"{flag} {path}: no such checkpoint file (a checkpoint.pt written by reid-ray train)")
    # absolute: Ray Train workers do not run in the driver's working directory
    return [str(Path(path).expanduser().resolve()) for path in inits]


def source_pretraining(cfg: TrainConfig) -> str:
    """The baseline checkpoint a method starts from: trained once per config, then cached.

    The cache key is everything that shapes the source model (data, model, transforms,
    loader, the baseline's optimiser, pretraining epochs, seed), so a sweep over the method's own
    parameters (lr included) pays it once.
    """
    import hashlib
    import json
    import shutil

    base = build_config("baseline", cfg.source, cfg.target)
    # the source model shares the method's data, model, transforms and loader, but trains with the
    # baseline's own schedule (BoT: warmup, step decay), never the method's fine-tuning lr
    d = {**to_dict(cfg), "optim": to_dict(base)["optim"], "epochs": cfg.pretrain_epochs or base.epochs}
    for k in PRETRAIN_IGNORED:
        d.pop(k, None)
    key = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cached = Path(cfg.output).expanduser().resolve() / "pretrain" / f"baseline-{key}.pt"
    if cached.is_file():
        print(f"source model: cached {cached}", flush=True)
        return str(cached)
    print(f"source model: training the baseline on {cfg.source} first (cached as {cached})", flush=True)
    base = from_dict({**to_dict(cfg), "method": "baseline", "params": base.params, "name": f"pretrain-{key}",
                      "optim": to_dict(base)["optim"], "epochs": d["epochs"], "eval_every": d["epochs"],
                      "resume": "", "init": ""})
    out = run_training(base)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    shutil.copyfile(Path(out["checkpoint"]) / CHECKPOINT_FILE, tmp)
    metrics = {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))}
    cached.with_suffix(".json.tmp").write_text(json.dumps(metrics, indent=1))
    os.replace(cached.with_suffix(".json.tmp"), cached.with_suffix(".json"))
    os.replace(tmp, cached)
    return str(cached)


def pretraining_metrics(init: str) -> dict:
    """The last-epoch metrics of a cached source pretraining (source mAP, direct-transfer target mAP)."""
    import json

    sidecar = Path(init).with_suffix(".json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}


def print_summary(cfg: TrainConfig, out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = out["metrics"]
    table = Table(title=f"{cfg.method}: {cfg.source} -> {cfg.target}")
    table.add_column("")
    table.add_column("mAP (%)", justify="right")
    table.add_column("R1 (%)", justify="right")
    adapted = "adapted" if METHODS[cfg.method].adapts else "direct transfer"
    for name, label in (("source", f"source {cfg.source} (supervised)"), ("target", f"target {cfg.target} ({adapted})")):
        table.add_row(label, f"{m.get(f'{name}_mAP', float('nan')):.1f}", f"{m.get(f'{name}_R1', float('nan')):.1f}")
    console = Console()
    console.print(table)
    console.print(f"wall time {out['wall_time']:.0f} s\nMLflow run {out['mlflow_run_id']} in {out['mlflow_uri']}  "
                  f"(mlflow ui --backend-store-uri {out['mlflow_uri']})\ncheckpoint {out['checkpoint']}\n"
                  f"best checkpoint and CMC plot in {out['run_dir']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray train", description=__doc__.split("\n")[0])
    p.add_argument("--method", default=None, help=f"one of: {', '.join(sorted(METHODS))} (default baseline)")
    p.add_argument("--source", default=None, help="labelled source dataset (default synth-a)")
    p.add_argument("--target", default=None, help="unlabelled target dataset (default synth-b)")
    p.add_argument("--config", default=None, help="a config YAML, e.g. a sweep's best_config.yaml (flags override it)")
    p.add_argument("--preset", default=None, help="a real-benchmark preset, e.g. duke2market (reid_ray/presets.py)")
    p.add_argument("--data-root", default=None, help="folder holding the datasets' own top folders (default: data)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: <source>-><target>)")
    p.add_argument("--name", default=None, help="run name (default: <method>-<time>)")
    p.add_argument("--output", default=None, help="checkpoints and run files (default: outputs)")
    p.add_argument("--resume", default=None, help="a checkpoint directory or checkpoint.pt to continue from")
    p.add_argument("--init", nargs="+", default=None, metavar="CHECKPOINT",
                   help="UDA methods: baseline checkpoint.pt to start from (default: train one on the source first, "
                        "cached); MMT takes a second for its second net (default: pretrained with seed + 1)")
    p.add_argument("--clustering", choices=("actor", "local"), default=None,
                   help="pseudo-labels from the PseudoLabeler Ray actor (default) or in-process on rank 0")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set model.arch=resnet18 --set lr=1e-4")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)

    def _run(a):
        method, source, target, base = (None, None, None, {})
        if a.config:
            method, source, target, base = load_config_file(a.config)
        method = a.method or method or "baseline"
        if a.preset:
            from reid_ray.presets import apply_preset
            source, target, preset = apply_preset(a.preset, method)
            base = {**base, **preset}
        # precedence: defaults < --config file < --preset < flags < --set
        cfg = build_config(method, a.source or source or "synth-a", a.target or target or "synth-b", base)
        flags = dict(data_root=a.data_root, workers=a.workers, epochs=a.epochs, eval_every=a.eval_every, seed=a.seed,
                     mlflow_uri=a.mlflow_uri, experiment=a.experiment, name=a.name, output=a.output,
                     resume=a.resume, init=a.init[0] if a.init else None, clustering=a.clustering)
        apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
        if a.init and len(a.init) > 1:
            most = 2 if METHODS[method].source_models({**cfg.params, "two_sources": True}) > 1 else 1
            if len(a.init) > most:
                raise ReidRayError(f"--init: {method} starts from {'one source model' if most == 1 else 'two source models'}"
                                   f", got {len(a.init)} checkpoints; pass {most} (MMT takes two: one per net)")
            cfg.params["init2"] = a.init[1]
        apply_overrides(cfg, a.overrides)
        if cfg.resume and not Path(cfg.resume).exists():
            raise ReidRayError(f"--resume {cfg.resume}: no such checkpoint directory or file")
        out = run_training(cfg)
        print_summary(cfg, out)
        return 0

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
