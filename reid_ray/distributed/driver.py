"""The Ray Train driver: one run of one method under `TorchTrainer` (DDP over N workers, checkpoints,
resume), with its pseudo-label actor and its source models.

    out = run_training(resolve_config(method))     # what `python -m reid_ray.train --method <method>` does
    out["metrics"]["target_mAP"], out["checkpoint"], out["mlflow_run_id"]

Rank 0 of the worker group writes the run's MLflow run (distributed/worker.py); this side reads it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from reid_ray import ReidRayError, stopped_by, storage, tracking, write_text_atomic
from reid_ray.config import TrainConfig, from_dict, resolve_config, to_dict
from reid_ray.config.checks import check_config, check_run
from reid_ray.data.domains import ensure_data
from reid_ray.distributed.progress import RunProgress
from reid_ray.distributed.resources import ResourcePlan, cpus_per_gpu, gpus_needed, plan_resources
from reid_ray.distributed.runtime import init_ray, train_env_defaults, wait_for_gpus
from reid_ray.distributed.verdict import create_verdict, raise_recorded
from reid_ray.distributed.worker import train_loop_per_worker
from reid_ray.methods import method_class
from reid_ray.tracking import status as run_status
from reid_ray.training.checkpoint import CHECKPOINT_FILE, load_checkpoint


def run_training(cfg: TrainConfig, *, callbacks: list | None = None, plan: ResourcePlan | None = None,
                 tags: dict | None = None, run_key: str | None = None, show_progress: bool = True) -> dict:
    """Train under Ray Train; returns the final metrics plus run/checkpoint locations.

    `plan` (a Tune trial's share, distributed/sweep.py) fixes the worker and actor resources; without
    it they are planned from the whole cluster. `tags` go on the MLflow run; `run_key` names it for
    rank 0 to find again (a trial's stable key; by default a new one per call). `show_progress`: the live
    epoch display on this process's console (off in a Tune trial, whose sweep has its own)."""
    if plan is None:  # a trial receives its sweep's validated plan (config.checks.check_sweep): nothing to check again
        check_config(cfg)  # once per process: the CLI's own call already passed it
        check_gpus_reachable(cfg.use_gpu.lower() in ("true", "1", "yes"))
        if cfg.model.cuda_graph:
            check_gpus_reachable(True, "drop --set model.cuda_graph=true", what="model.cuda_graph=true")
    domains = ensure_data(cfg)
    if plan is None:
        check_run(cfg, domains)
        tracking.check_uri(tracking.resolve_uri(cfg.mlflow_uri))
        warn_lost_parts(cfg, domains)
    resumed = resumed_state(cfg)
    if resumed:
        warn_changed_data(resumed, domains, cfg.resume)
        run_key = run_key or resumed.get("run_key")
    init_ray()
    if plan is not None:
        return _fit(cfg, domains, plan, callbacks, tags, run_key, show_progress)
    method_cls = method_class(cfg.method)
    uses_actor = method_cls.uses_clustering and cfg.clustering.where == "actor"
    forced = cfg.use_gpu.lower() in ("true", "1", "yes") or cfg.model.cuda_graph  # a captured step needs one
    want_gpu = forced or (cfg.use_gpu.lower() == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    cluster = wait_for_gpus(gpus_needed(1, cfg.workers, 1.0 if forced else 0.0, uses_actor), cfg.gpu_wait_s)
    plan = plan_resources(cluster, cfg.workers, 1.0 if want_gpu else 0.0, uses_actor, max_concurrent=1,
                          cpu_per_gpu=cpus_per_gpu(ray.nodes()), workers_flag="--workers",
                          cpu_flag="--set use_gpu=false")
    return _fit(cfg, domains, plan, callbacks, tags, run_key, show_progress)


def warn_lost_parts(cfg: TrainConfig, domains) -> None:
    """One warning where the target has a single camera and the method uses parts that need several (an image
    folder with no camera sub-folders or `c<N>` names, data/folder.py): what each part loses; and one for each
    part the target's files cannot feed (`Method.missing_parts`: a method's CamStyle images, say)."""
    target, method = domains.target, method_class(cfg.method)
    lost = method.camera_parts(cfg)
    if lost and target.stats()["train"]["cameras"] == 1:
        where = (" (no camera sub-folders, no c<N> in the file names)" if not target.labelled else "")
        print(f"reid-ray: warning: {cfg.target_label} has one camera{where}: {'; '.join(lost)}", flush=True)
    for part in method.missing_parts(cfg, domains):
        print(f"reid-ray: warning: {cfg.target_label} {part}", flush=True)


def _fit(cfg: TrainConfig, domains, plan: ResourcePlan, callbacks, tags, run_key, show_progress: bool = True) -> dict:
    method_cls = method_class(cfg.method)
    if method_cls.__module__ == "__main__":
        raise ReidRayError(f"method {cfg.method!r} is defined in the script being run, which Ray workers cannot "
                           "import; put it in a module and name it in REID_RAY_METHODS=package.module")
    name = cfg.name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, name=name, init=source_inits(cfg))
    output = storage.absolute(cfg.output)  # a local folder (made absolute) or a URI Ray Train's storage_path takes
    uri = tracking.resolve_uri(cfg.mlflow_uri)
    tracking.quick_http_failures()
    experiment = cfg.experiment_name
    run_key = run_key or uuid.uuid4().hex
    labeler, stop = None, create_verdict()
    if method_cls.uses_clustering and cfg.clustering.where == "actor":
        from reid_ray.clustering.client import run_spec
        from reid_ray.distributed.actor import create_pseudo_labeler
        t = domains.target.train  # ground truth for quality metrics only (logged, never trained on)
        truth = t["pid"].to_numpy() if domains.target.labelled else None  # an image folder has none
        labeler = create_pseudo_labeler(run_spec(method_cls, cfg), truth, t["camid"].to_numpy(),
                                        plan.actor, plan.actor_threads)
    progress = RunProgress(name, cfg.epochs) if show_progress else contextlib.nullcontext()
    train_env_defaults()
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the config becomes a dict here, once, and a TrainConfig again in each worker
        train_loop_config={"cfg": to_dict(cfg), "method_module": method_cls.__module__, "threads": plan.threads,
                           "run_dir": str(output / name), "pseudo_labeler": labeler, "verdict": stop,
                           "mlflow": {"uri": uri, "experiment": experiment, "run_key": run_key,
                                      # MLflow's system tags as this process sees them; a sweep passes its driver's
                                      "tags": {**tracking.system_tags(), "method": cfg.method, "source": cfg.source,
                                               "target": cfg.target, "source_to_target": cfg.source_to_target,
                                               # what best.pt ranks on (the `metric` param may say "auto")
                                               "selection_metric": cfg.selection_metric, **(tags or {})}}},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(output),
            callbacks=[*(callbacks or []), *([progress.callback] if show_progress else [])],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines off the console (its per-report dump is silenced in worker.py)
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    t0 = time.perf_counter()
    try:
        try:
            with progress:
                result = fit_interruptibly(trainer)
        except KeyboardInterrupt as e:
            stop_interrupted_runs(e, uri, experiment, tracking.RUN_KEY, run_key)
            raise
        except Exception:
            raise_recorded(stop)  # a user error or divergence a worker recorded, as itself (max_failures 0)
            # a rank 0 that was killed (not one that raised: it ends its own run) left its run RUNNING
            run_status.closed_after_failure(uri, experiment, tracking.RUN_KEY, run_key)
            raise
        raise_recorded(stop)  # ... or after the retried group returned at once
    finally:
        for actor in (labeler, stop):
            if actor is not None and ray.is_initialized():
                ray.kill(actor)  # the actors die with their run
    fallback = output / name / "mlflow-fallback.db"  # rank 0's, where the tracking server stayed away (RunWriter)
    if storage.is_uri(fallback):  # uploaded there by rank 0: a store to download, then open as sqlite:///<copy>
        fallback_store = str(fallback) if storage.is_file(fallback) else None
    else:
        fallback_store = f"sqlite:///{fallback}" if fallback.is_file() else None
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint is not None and storage.is_uri(output):  # Ray's path has lost the URI's scheme
        checkpoint = str(output / name / PurePosixPath(checkpoint).name)
    try:
        runs = tracking.find_runs(uri, experiment, tracking.RUN_KEY, run_key)
    except Exception:  # the server is still down: the run's metrics wait in rank 0's buffer or fallback store
        runs = []
    return {"metrics": dict(result.metrics or {}), "checkpoint": checkpoint,
            "run_dir": str(output / name), "mlflow_uri": uri, "mlflow_run_id": runs[0].info.run_id if runs else None,
            "mlflow_fallback": fallback_store,
            "wall_time": time.perf_counter() - t0, "domains": domains, "config": cfg}


def fit_interruptibly(trainer: TorchTrainer):
    """`trainer.fit()`, run from a helper thread when called from the main thread: Ray Train then leaves
    SIGINT alone (its own handler, main thread only, aborts the run and exits 0 or 1 without a word), and
    Ctrl-C or SIGTERM reaches this thread as `Interrupted` (reid_ray.catch_stop_signals)."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # a Tune trial: Tune stops it
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="reid-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a signal's handler runs between two waits
    if "error" in box:
        raise box["error"]
    return box["result"]


def stop_interrupted_runs(e: KeyboardInterrupt, uri: str, experiment: str, tag: str, value: str) -> None:
    """After Ctrl-C or SIGTERM: stop this driver's Ray work (the run's controller, workers and actors are this
    driver's, and die with its connection; the last committed checkpoint stays where Ray Train put it), and
    mark the MLflow runs it left RUNNING as KILLED, with the reason. On a local Ray, workers first: a rank 0
    still running could otherwise end its run FINISHED after the mark. On a cluster (RAY_ADDRESS) the mark
    first: `ray job stop` sends SIGKILL 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), and leaving the
    cluster is only a disconnect."""
    reason, began_ms = stopped_by(e).name, int(time.time() * 1000) - 1000  # a second's slack for clock granularity
    print(f"reid-ray: {reason}: stopping the run's Ray work (a second Ctrl-C stops at once) ...", file=sys.stderr,
          flush=True)
    local = not os.environ.get("RAY_ADDRESS")
    if local and ray.is_initialized():
        ray.shutdown()
    try:
        run_status.closed_after_interrupt(uri, experiment, tag, value, reason, began_ms)
    except Exception as err:  # the tracking server is away: the run shows RUNNING until it is resumed
        print(f"reid-ray: could not mark the MLflow run KILLED ({type(err).__name__}); --resume reopens it",
              file=sys.stderr, flush=True)
    if ray.is_initialized():
        ray.shutdown()


def check_gpus_reachable(forced: bool, fix: str = "pass --set use_gpu=false", what: str = "use_gpu=true") -> None:
    """A GPU request that no machine can ever meet: a local Ray (no RAY_ADDRESS, so no autoscaler) on a
    machine whose torch sees no GPU. A cluster keeps its wait for the autoscaler (gpu_wait_s)."""
    if not forced or os.environ.get("RAY_ADDRESS") or (ray.is_initialized() and ray.cluster_resources().get("GPU")):
        return
    import torch

    if not torch.cuda.is_available():
        raise ReidRayError(f"{what}, but this machine has no GPU torch can use and no Ray cluster to add one "
                           f"(RAY_ADDRESS is unset); {fix}, or set RAY_ADDRESS to a cluster with GPUs or an "
                           "autoscaler")


def resumed_state(cfg: TrainConfig) -> dict | None:
    """What a `--resume` checkpoint says of the run it continues (its MLflow run key, its datasets' digests),
    when this run continues it under the same name; None otherwise."""
    if not cfg.resume:
        return None
    path = storage.join(cfg.resume, CHECKPOINT_FILE) if storage.is_dir(cfg.resume) else cfg.resume
    state = load_checkpoint(storage.fetch(path) if storage.is_uri(path) else path, mmap=True)
    same_run = state.get("config", {}).get("name") == cfg.name
    return {"run_key": state.get("run_key") if same_run else None, "data": state.get("data", {})}


def warn_changed_data(resumed: dict, domains, resume: str) -> None:
    """One warning per dataset whose manifest digest differs from the one the checkpoint was trained on."""
    for role, ds in domains.named():
        then, now = resumed["data"].get(role), ds.digest()
        if then and then != now:
            print(f"reid-ray: warning: the {role} dataset {ds.name} changed since {resume} was written "
                  f"(manifest digest {then} -> {now}); resuming on the data as it is now", file=sys.stderr,
                  flush=True)


# --------------------------------------------------------------------------- source models

PRETRAIN_IGNORED = ("method", "name", "experiment", "output", "resume", "mlflow_uri", "workers", "init",
                    "clustering", "params", "max_failures", "eval_every", "eval_source", "gpu_wait_s", "log_model")


def source_inits(cfg: TrainConfig) -> list[str]:
    """The source-trained checkpoints the method starts from, one per `Method.source_models`: the given
    `init` paths, the missing ones pretrained (and cached) as baselines with seeds seed + i. Absolute
    paths (Ray Train workers do not run in the driver's directory); empty for methods that need none."""
    method_cls = method_class(cfg.method)
    n = method_cls.source_models(cfg.params)
    if not n:
        return []
    given = list(cfg.init) + [""] * (n - len(cfg.init))
    if cfg.init and len(cfg.init) < n:
        print(f"{cfg.method}: --init gives {len(cfg.init)} of its {n} source models; the others are pretrained with seeds "
              f"{', '.join(str(cfg.seed + i) for i in range(len(cfg.init), n))} (pass --init with {n} checkpoints)",
              flush=True)
    inits = [path or source_pretraining(dataclasses.replace(cfg, seed=cfg.seed + i)) for i, path in enumerate(given)]
    for path in inits:
        if not storage.is_file(path):
            raise ReidRayError(f"--init {path}: no such checkpoint file (a checkpoint.pt written by reid-ray train)")
    return [str(storage.absolute(path)) for path in inits]  # URIs as they are: each worker fetches its copy


def pretraining_plan(cfg: TrainConfig) -> tuple[Any, TrainConfig]:
    """(where the source model of `cfg` is cached, the baseline config that trains it).

    The cache key is everything that shapes the source model (data, model, transforms,
    loader, the baseline's optimiser, pretraining epochs, seed, and the baseline params the method asks for:
    `Method.pretrain_params`), so a sweep over the method's own parameters (lr included) pays it once.
    """
    base = resolve_config("baseline", cfg.source, cfg.target)
    asked = method_class(cfg.method).pretrain_params(cfg.params)
    # the source model shares the method's data, model, transforms and loader, but trains with the
    # baseline's own schedule (BoT: warmup, step decay), never the method's fine-tuning lr
    d = {**to_dict(cfg), "optim": to_dict(base)["optim"], "epochs": cfg.pretrain_epochs or base.epochs}
    for k in PRETRAIN_IGNORED:
        d.pop(k, None)
    if asked:  # only then: the keys (and caches) of the baseline's own recipe stay as they were
        d["pretrain_params"] = asked
    key = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cached = storage.absolute(cfg.output) / "pretrain" / f"baseline-{key}.pt"  # a URI under a URI --output
    params = {**to_dict(base)["params"], **asked}
    pre = from_dict({**to_dict(cfg), "method": "baseline", "params": params, "name": f"pretrain-{key}",
                     "optim": to_dict(base)["optim"], "epochs": d["epochs"], "eval_every": d["epochs"],
                     "resume": "", "init": []})
    return cached, pre


def source_pretraining(cfg: TrainConfig) -> str:
    """The baseline checkpoint a method starts from: trained once per config (`pretraining_plan`), then cached."""
    cached, pre = pretraining_plan(cfg)
    if storage.is_file(cached):
        print(f"source model: cached {cached}", flush=True)
        return str(cached)
    print(f"source model: training the baseline on {cfg.source} first (cached as {cached})", flush=True)
    out = run_training(pre)
    metrics = {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))}
    if storage.is_uri(cached):  # each object appears whole; the .pt last, as below
        storage.write_text(storage.with_suffix(cached, ".json"), json.dumps(metrics, indent=1))
        storage.copy(storage.join(out["checkpoint"], CHECKPOINT_FILE), cached)
        return str(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached.with_suffix(".json"), json.dumps(metrics, indent=1))
    tmp = cached.with_suffix(".tmp")
    shutil.copyfile(Path(out["checkpoint"]) / CHECKPOINT_FILE, tmp)
    os.replace(tmp, cached)  # last: a cached .pt always has its metrics beside it
    return str(cached)


def pretraining_metrics(init: str) -> dict:
    """The last-epoch metrics of a cached source pretraining (source mAP, direct-transfer target mAP)."""
    sidecar = storage.with_suffix(init, ".json")
    return json.loads(storage.read_text(sidecar)) if storage.is_file(sidecar) else {}


def adabn_metrics(init: str, cfg: TrainConfig) -> dict:
    """The source model `init` after AdaBN (Li et al., 2017: its BatchNorm statistics re-estimated on the target's
    training images, no weight changed): `target_mAP`/`target_R1` where the target has labels, and the label-free
    scores, on the driver's device. The baseline every UDA method must beat; cached in the source model's sidecar
    (`adabn`, by target: one source model adapted to two targets has two figures) when it is a local file."""
    import torch

    from reid_ray.data.domains import ensure_data
    from reid_ray.data.loader import build_test_loader
    from reid_ray.models.adabn import adapt_bn
    from reid_ray.models.reid_net import build_reid_net
    from reid_ray.training.label_free import label_free_scores
    from reid_ray.training.loop import evaluate_model

    sidecar = storage.with_suffix(init, ".json")
    cached = pretraining_metrics(init)
    domains = ensure_data(cfg)
    target = f"{domains.target.name} in {Path(domains.target.root).resolve()}"
    # by target; an older sidecar's single figure, of a target it did not name, or one that lacks the label-free
    # score shown beside it (computed before that score existed), is not reused
    by_target = {k: v for k, v in (cached.get("adabn") or {}).items() if isinstance(v, dict)}
    shown = cfg.label_free_metric
    if target in by_target and (shown is None or shown in by_target[target]):
        return by_target[target]
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.use_gpu.lower() != "false" else "cpu")
    state = method_class("baseline").source_weights(storage.fetch(init))
    net = build_reid_net(cfg.model, state["classifier.weight"].shape[0], device)
    net.load_state_dict(state)
    adapt_bn(net, build_test_loader(domains.target.train, cfg.transform, cfg.loader))
    out = {}
    if domains.target.labelled:
        res = evaluate_model(net, domains.target, cfg, device)
        out = {"target_mAP": res["mAP"], "target_R1": res["R1"]}
    if cfg.label_free.enabled:
        out.update(label_free_scores(net, domains.source, domains.target, cfg, device))
    if cached and not storage.is_uri(sidecar):
        write_text_atomic(Path(sidecar), json.dumps({**cached, "adabn": {**by_target, target: out}}, indent=1))
    return out
