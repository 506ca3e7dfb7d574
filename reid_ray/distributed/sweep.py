"""The Tune sweep: Optuna (TPE) proposes, ASHA stops, each trial fits its own TorchTrainer.

Each Tune trial is a function (`run_trial`) that applies its sample to the resolved base config (the
last layer of config.resolve_config), and runs `driver.run_training` with `TuneReportCallback`, so
rank 0's reports reach Tune (the Ray Train V2 pattern: `Tuner(TorchTrainer)` is refused). The run's actor lives in
the trial's placement group. The source models are trained once, before the trials. The sweep
driver writes the sweep's MLflow parent run; each trial's run is written by its rank 0 and found
here by its `trial_id` tag. A trial that ASHA stops is killed with its workers mid-epoch, before
its rank 0 can end its run: `CloseStoppedRuns` (a Tune callback) ends that run as KILLED, tag
`status=stopped by ASHA` (every status rule, with the other exceptions to "rank 0 writes its own", is
reid_ray/tracking/status.py's).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from reid_ray import Diverged, ReidRayError, storage, tracking
from reid_ray.config import TrainConfig, apply_overrides, flatten
from reid_ray.config.checks import check_config, check_sweep
from reid_ray.config.search_space import SearchSpace, load_search_space
from reid_ray.config.sweep import METRIC, Sweep, sweep_dir
from reid_ray.data.domains import ensure_data
from reid_ray.distributed.driver import (
    adabn_metrics,
    pretraining_metrics,
    run_training,
    source_inits,
    stop_interrupted_runs,
    warn_lost_parts,
)
from reid_ray.distributed.progress import SweepProgress
from reid_ray.distributed.resources import ResourcePlan, cpus_per_gpu, gpus_needed, plan_resources
from reid_ray.distributed.runtime import init_ray, wait_for_gpus
from reid_ray.methods import method_class
from reid_ray.tracking import console
from reid_ray.tracking import status as run_status
from reid_ray.tracking.report import SweepOutcome, TrialRow, finalize_sweep


def tune_domains(space: SearchSpace) -> dict:
    make = {"uniform": lambda p: tune.uniform(p.low, p.high), "loguniform": lambda p: tune.loguniform(p.low, p.high),
            "int": lambda p: tune.randint(p.low, p.high + 1), "choice": lambda p: tune.choice(p.values)}
    return {name: make[p.distribution](p) for name, p in space.params.items()}


class CloseStoppedRuns(tune.Callback):
    """Ends the MLflow run of a trial that Tune stopped or lost, which its killed rank 0 left RUNNING."""

    def __init__(self, uri: str, experiment: str, epochs: int):
        self.uri, self.experiment, self.epochs = uri, experiment, epochs

    def _close(self, trial, error: bool) -> None:
        run_status.closed_by_tune(self.uri, self.experiment, trial.trial_id, error=error,
                              epoch=int((trial.last_result or {}).get("epoch", 0)), epochs=self.epochs)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, error=True)


def run_trial(sample: dict, *, base: TrainConfig, plan: ResourcePlan, sweep_name: str, parent_run_id: str,
              system_tags: dict | None = None) -> None:
    """One Tune trial: the base config + this trial's sample (layer 8), trained under Ray Train."""
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_overrides(copy.deepcopy(base), dict(sample))
    # a deterministic name and run key: a trial restarted by `--resume` finds its checkpoints and MLflow run
    cfg.name = f"{sweep_name}-{trial_id}"
    try:
        run_training(cfg, callbacks=[TuneReportCallback()], plan=plan, run_key=cfg.name, show_progress=False,
                     tags={**(system_tags or {}), "mlflow.parentRunId": parent_run_id, "sweep": sweep_name,
                           "trial_id": trial_id})
    except ReidRayError as e:  # Diverged too: the trial ends with its reason (a target mAP of 0), the sweep goes on
        status = "diverged" if isinstance(e, Diverged) else f"error: {e}"
        tune.report({f"{m}_last": 0.0 for m in cfg.scores} | {"epoch": cfg.epochs, "trial_id": trial_id,
                                                                "trial_status": status})


def run_sweep(sweep: Sweep) -> SweepOutcome:
    """Pretrain once, run (or resume) the Tuner, summarise; returns the outcome."""
    base = sweep.base
    space = load_search_space(sweep.space_path, base) if Path(sweep.space_path).is_file() else None
    check_config(base)
    domains = ensure_data(base)
    check_sweep(base, space, domains)
    tracking.check_uri(tracking.resolve_uri(base.mlflow_uri))
    warn_lost_parts(base, domains)
    with sweep_lock(sweep_dir(base.output, sweep.name), sweep.name):
        return _locked_sweep(sweep, base, space, method_class(base.method))


def _locked_sweep(sweep: Sweep, base: TrainConfig, space: SearchSpace | None, method_cls) -> SweepOutcome:
    init_ray()
    if sweep.gpus_per_worker is None:  # pass it explicitly on a cluster that scales GPUs from zero
        sweep.gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    base.use_gpu = "true" if sweep.gpus_per_worker > 0 else "false"
    base.init = source_inits(base)  # pretrained (or checked) once here, not by every trial
    uses_actor = method_cls.uses_clustering and base.clustering.where == "actor"
    trials = min(sweep.num_samples, sweep.max_concurrent or sweep.num_samples)
    # an autoscaling cluster may start with no GPU node: ask for the GPUs the plan needs for these trials
    cluster = wait_for_gpus(gpus_needed(trials, base.workers, sweep.gpus_per_worker, uses_actor), base.gpu_wait_s)
    plan = plan_resources(cluster, base.workers, sweep.gpus_per_worker, uses_actor, sweep.max_concurrent,
                          cpus_per_gpu(ray.nodes()))
    return _tune(sweep, base, space, plan)


def _tune(sweep: Sweep, base: TrainConfig, space: SearchSpace | None, plan: ResourcePlan) -> SweepOutcome:
    uri = base.mlflow_uri = tracking.resolve_uri(base.mlflow_uri)
    experiment = base.experiment_name
    folder = sweep_dir(base.output, sweep.name)
    if not sweep.parent_run_id:
        params = {"sweep.num_samples": sweep.num_samples, "sweep.scheduler": sweep.scheduler,
                  "sweep.search_space": sweep.space_path, **flatten(base)}
        sweep.parent_run_id = tracking.start_run(
            uri, experiment, f"sweep-{sweep.name}", params,
            {**tracking.system_tags(), "method": base.method, "source_to_target": base.source_to_target,
             "sweep": sweep.name,
             "sweep_parent": "true"}, dataclasses.asdict(base))
        tracking.log_text(uri, sweep.parent_run_id, sweep.space_text, "search_space.yaml")
    sweep.direct_transfer = pretraining_metrics(base.init[0]) if base.init else {}
    if base.init and not sweep.adabn:  # the bar every trial should clear: the source model with target BN statistics
        sweep.adabn = adabn_metrics(base.init[0], base)
    sweep.save(folder)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, plan=plan, sweep_name=sweep.name, parent_run_id=sweep.parent_run_id,
                             system_tags=tracking.system_tags()),
        tune.PlacementGroupFactory(plan.trial))
    first = default_point(base, space) if sweep.default_first and space is not None else None
    print(f"sweep {sweep.name}: {sweep.num_samples} trials{' (the first: the default config)' if first else ''}, "
          f"{plan.concurrent} at a time, "
          f"{base.workers} workers each ({plan.worker}), actor {plan.actor or 'none'}", flush=True)
    if tune.Tuner.can_restore(str(folder)) and sweep.resumed:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=tune_domains(space), tune_config=_tune_config(sweep, base, plan, first),
                           # Tune's own tables only with --verbose: SweepProgress is the display
                           run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage.split(folder)[0]),
                                                     verbose=1 if console.verbose() else 0,
                                                     callbacks=[CloseStoppedRuns(uri, experiment, base.epochs),
                                                                SweepProgress(sweep.name, sweep.num_samples,
                                                                              base.epochs, sweep.metric)]))
    status = "FAILED"
    # Ctrl-C and SIGTERM are this driver's (reid_ray.catch_stop_signals): Tune's own SIGINT handler would end
    # the sweep as if it had finished, and print a resume command that is not reid-ray's
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:
        try:
            grid = tuner.fit()
        except KeyboardInterrupt as e:  # the trials' and the sweep's MLflow runs: KILLED, none left RUNNING
            status = "KILLED"
            stop_interrupted_runs(e, uri, experiment, "sweep", sweep.name)
            raise
        rows = [_row(res, base.epochs, uri, experiment, sweep.metric, base.label_free_metric) for res in grid]
        _agreement(rows, base, sweep, uri)
        out = finalize_sweep(SweepOutcome(sweep=sweep, rows=rows, folder=folder, uri=uri, errors=grid.num_errors,
                                          trials=len(grid), best_trial=_best_trial(grid, sweep.metric)), space)
        status = "FINISHED"
    finally:
        if status != "KILLED":
            run_status.end_sweep(uri, sweep.parent_run_id, status)
    return out


@contextlib.contextmanager
def sweep_lock(folder, name: str):
    """One driver per sweep folder: a second sweep started with the same name (it would resume the first's
    state under its feet) is refused with one line. An OS lock (flock) on `<folder>/.lock`: a driver that
    crashes or is killed releases it with its process, so a stale lock file never blocks a resume. A sweep
    folder under a URI has no lock."""
    if storage.is_uri(folder):
        yield
        return
    import fcntl
    import json
    import socket
    import time

    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            try:
                held = json.loads(f.read() or "{}")
            except ValueError:
                held = {}
            by = f" (pid {held.get('pid')} on {held.get('host')}, since {held.get('since')})" if held else ""
            raise ReidRayError(f"sweep {name} is running already{by}; wait for it to end, stop it, or start this "
                               "one with another --name") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _row(res, epochs: int, uri: str, experiment: str, metric: str = METRIC, label_free: str | None = None) -> TrialRow:
    m = dict(res.metrics or {})
    done = int(m.get("epoch", 0))
    trial_id = m.get("trial_id", "?")
    runs = tracking.find_runs(uri, experiment, "trial_id", trial_id) if trial_id != "?" else []
    return TrialRow(trial=trial_id, config=dict(res.config or {}),
                    status="error" if res.error else m.get("trial_status") or (
                        "completed" if done >= epochs else "stopped by ASHA"),
                    epoch=done, target_mAP=m.get(METRIC, math.nan), target_R1=m.get("target_R1", math.nan),
                    source_mAP=m.get("source_mAP", math.nan), run_id=runs[0].info.run_id if runs else None,
                    score=m.get(metric, math.nan), label_free=m.get(f"{label_free}_last", math.nan))


def _agreement(rows: list[TrialRow], base: TrainConfig, sweep: Sweep, uri: str) -> None:
    """The trials' ensemble agreement (training.label_free.sweep_agreement) at each evaluated epoch two or more
    reached: logged to each trial's MLflow run (`ensemble_agreement`, step = epoch), and its value at the trial's
    last epoch on its row. Label-free, reported beside the metric the sweep ranks on (no trial is picked by it).
    Read from the trials' run folders: a sweep whose --output is a URI has none here."""
    if not base.label_free.enabled or storage.is_uri(base.output):
        return
    from reid_ray.training.label_free import sweep_agreement

    out = storage.absolute(base.output)
    by_epoch = sweep_agreement({r.trial: out / f"{sweep.name}-{r.trial}" for r in rows})
    for r in rows:
        scores = {e: s[r.trial] for e, s in by_epoch.items() if r.trial in s}
        if scores:
            r.agreement = scores[max(scores)]
        if r.run_id:
            for epoch, score in sorted(scores.items()):
                tracking.log_metrics(uri, r.run_id, {"ensemble_agreement": score}, step=epoch)


def _best_trial(grid, metric: str) -> str | None:
    """The trial Tune ranks first on `metric` at its last report (a trial ASHA stopped included), or None where
    no trial reported a finite value."""
    try:
        return grid.get_best_result(metric=metric, mode="max", scope="last").metrics.get("trial_id")
    except RuntimeError:
        return None


def default_point(base: TrainConfig, space: SearchSpace) -> dict | None:
    """The base config's value of every searched parameter (the method's defaults, after the search space's
    `fixed:` and `--set`), or None where one falls outside its range: the sweep's first trial
    (Optuna's enqueued trial, Tune's `points_to_evaluate`), so that every sweep measures the config a user gets
    without one, and its pick is compared with it."""
    values = flatten(base)
    point = {}
    for name, p in space.params.items():
        v = values.get(name)
        inside = (v in p.values) if p.distribution == "choice" else (
            isinstance(v, int | float) and not isinstance(v, bool) and p.low <= v <= p.high)
        if not inside:
            return None
        point[name] = v
    return point


def _tune_config(sweep: Sweep, base: TrainConfig, plan: ResourcePlan, first: dict | None) -> tune.TuneConfig:
    storage = optuna.storages.RDBStorage(sweep.optuna_storage) if sweep.optuna_storage else None
    search = OptunaSearch(metric=sweep.metric, mode="max", sampler=optuna.samplers.TPESampler(seed=sweep.seed),
                          storage=storage, study_name=sweep.name if storage else None,
                          points_to_evaluate=[first] if first else None)
    if sweep.scheduler == "asha":
        # rungs must fall on evaluated epochs: the grace period is a multiple of eval_every. A trial Tune
        # stops is killed (at any rung, max_t's included), and its Ray Train worker group is freed only later
        # by Train's placement-group cleaner; CloseStoppedRuns ends its MLflow run
        grace = max(sweep.grace_period or base.eval_every, 1)
        grace = math.ceil(grace / base.eval_every) * base.eval_every
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=min(grace, base.epochs),
                                  reduction_factor=sweep.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=sweep.metric, mode="max", search_alg=search, scheduler=scheduler,
                           num_samples=sweep.num_samples, max_concurrent_trials=plan.concurrent)
