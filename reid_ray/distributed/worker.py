"""The Ray Train worker loop: one flat function per worker (`_train`, the shape of Ray's torch examples).

A plain torch loop over `training.loop.train_epoch` and `training.loop.evaluate_method`; each Ray-specific
line is numbered:

    [1] ray.train.get_context()         rank and world size of this worker
    [2] ray.train.torch.prepare_model   DDP-wraps the method's networks (the method's own loaders
                                        shard by rank, so prepare_data_loader is not used)
    [3] ray.train.get_checkpoint()      the last reported checkpoint, when Ray restarts the group
    [4] ray.train.report(metrics, checkpoint)   every epoch; rank 0's metrics reach Tune

The helpers below it: where a run starts from (`_restored`), rank 0's MLflow run (`_open_run`), the best model
(`_Best`), the checkpoint of an epoch (`_epoch_checkpoint`), and a URI run's staged folder (`_publish`,
`_unstage`). What filters Ray Train's own log lines is distributed/ray_logs.py.

Rank 0 evaluates every `eval_every` epochs and writes the run's MLflow run, status included:
it opens the run (found again by its key after a restart: RUNNING again), logs every epoch, and
ends it FINISHED (tag `status=completed`) or FAILED. Two exceptions, where rank 0 is killed before it
can: a trial that Tune stops (ASHA; the sweep's callback closes its run, distributed/sweep.py), and a
run whose killed workers used up `max_failures` (the driver marks it FAILED, distributed/driver.py).
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from reid_ray import Diverged, ReidRayError, full_disk_is_the_users, storage, tracking
from reid_ray.config import TrainConfig, flatten, from_dict, to_dict
from reid_ray.data.domains import load_domains
from reid_ray.distributed import ray_logs, verdict
from reid_ray.methods import EpochContext, method_class
from reid_ray.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, newest_readable_checkpoint, save_checkpoint
from reid_ray.training.label_free import PROBE_FEATURES, label_free_scores
from reid_ray.training.loop import evaluate_method, finish_networks, gpu_layout, rng_state, set_rng_state, train_epoch
from reid_ray.training.pictures import ranked_list_picture


def _clusterer(method, cfg: TrainConfig, handle):
    if handle is not None:
        from reid_ray.distributed.actor import ActorClusterer
        return ActorClusterer(handle)
    from reid_ray.clustering.client import LocalClusterer, run_spec
    t = method.domains.target.train
    truth = t["pid"].to_numpy() if method.domains.target.labelled else None  # an image folder has none
    return LocalClusterer(run_spec(type(method), cfg), truth, t["camid"].to_numpy())


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the method, train, evaluate and checkpoint on rank 0.

    A `ReidRayError` (the user's to fix) or `Diverged` is recorded in the run's Verdict actor and
    raised; the worker group Ray Train restarts then returns at once (distributed/verdict.py)."""
    ray_logs.quiet_ray_train()
    handle = config.get("verdict")
    if handle is not None and verdict.recorded(handle) is not None:
        return  # an earlier attempt of this run stopped on a user error or divergence: nothing to retry
    try:
        _train(config)
    except BaseException as e:
        if handle is not None:
            if isinstance(e, ReidRayError):
                verdict.record(handle, e)
            if isinstance(e, ReidRayError) or verdict.recorded(handle) is not None:
                ray_logs.USER_ERROR.active = True  # this rank's mistake, or another rank's echo (a broken collective)
        raise


def _train(config: dict) -> None:
    importlib.import_module(config["method_module"])  # a method registered outside reid_ray.methods
    cfg = from_dict(config["cfg"])
    tctx = ray.train.get_context()  # [1]
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":  # the current device is where the loaders finish their batches (FinishingLoader)
        torch.cuda.set_device(device)
    domains = load_domains(cfg.source, cfg.target, cfg.data_root)
    method_cls = method_class(cfg.method)
    method = method_cls(cfg, domains, device, rank, world)
    method.init_states = [method_cls.source_weights(storage.fetch(p)) for p in cfg.init]  # a URI: fetched to this node
    if method.uses_clustering:
        method.clusterer = _clusterer(method, cfg, config["pseudo_labeler"])
    method.setup(wrap=gpu_layout(ray.train.torch.prepare_model, device))  # [2]
    finish_networks(method, device, cfg.model.compile)
    upload = cfg.checkpoint_upload if cfg.checkpoint_upload != "auto" else ("async" if device.type == "cuda" else "sync")
    mode = ray.train.CheckpointUploadMode.ASYNC if upload == "async" else ray.train.CheckpointUploadMode.SYNC
    ectx = EpochContext(epoch=0, rank=rank, world_size=world)
    state = _restored(ray.train.get_checkpoint(), cfg, config["run_dir"])  # [3] set when Ray restarts the group
    metric = cfg.selection_metric  # what best.pt (and a sweep) ranks on
    # the latest score of each rankable metric, carried between evaluations (reported every epoch as `<name>_last`)
    start, best, last = 0, _Best(metric=metric), dict.fromkeys(cfg.scores, 0.0)
    if state is not None:
        method.load_state_dict(state["method"])
        start, best, ectx.iteration = state["epoch"] + 1, _Best(state["best"], metric), state["iteration"]
        last.update({k: v for k, v in state.get("last_scores", {"target_mAP": state.get("last_target", 0.0)}).items()
                     if k in last})
        set_rng_state(state["rng"])
    # the run's own files (best.pt, cmc.png, eval artifacts, a fallback store): written in the run folder, or
    # under a URI --output in a local folder on rank 0 and uploaded from there (storage.stage)
    remote = config["run_dir"] if storage.is_uri(config["run_dir"]) else None
    run_dir = storage.stage(remote) if remote and rank == 0 else Path(config["run_dir"])
    run = _open_run(config["mlflow"], cfg, config["cfg"], domains, run_dir) if rank == 0 else None
    # what a resumed run checks against (distributed/driver.py): its MLflow run, its datasets
    identity = {"run_key": config["mlflow"]["run_key"],
                "data": {role: ds.digest() for role, ds in domains.named()}}
    curves: dict = {}
    try:
        if start >= cfg.epochs and state and state.get("report"):
            # restarted after its last checkpoint (a sweep resumed after its driver was killed): the run is
            # done, and Tune still needs its final result
            ray.train.report(state["report"])  # [4]
        for epoch in range(start, cfg.epochs):
            ectx.epoch = epoch
            metrics = {"epoch": epoch + 1, **train_epoch(method, ectx, cfg.amp)}
            if run:
                _log_refresh_picture(method, run, run_dir, remote, epoch + 1)
            final = epoch + 1 == cfg.epochs
            if rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or final):
                metrics.update(_evaluate(method, cfg, final, curves, run, run_dir, remote, epoch + 1))
                last.update({k: float(metrics[k]) for k in last if k in metrics})
            if rank == 0:
                _say(f"[epoch {epoch + 1}/{cfg.epochs}] " + "  ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if run:
                run.log_metrics(metrics, step=epoch + 1)
            report = {**metrics, f"best_{metric}": best.score, **{f"{k}_last": v for k, v in last.items()}}
            if run and run.pending:  # the driver's display warns once (this worker's console is Ray's log file)
                report["mlflow_buffered"] = len(run.pending)
            # async: Ray Train copies the folder to storage while the next epoch trains, then deletes it
            tmp = tempfile.mkdtemp(prefix="reid-ray-ckpt-")
            checkpoint = None
            try:
                if rank == 0:
                    improved = best.update(metrics)
                    keep = (epoch + 1) % cfg.checkpoint_every == 0 or final
                    if keep or improved:
                        state = {"method": method.state_dict(), "epoch": epoch, "best": best.metrics,
                                 "iteration": ectx.iteration, "last_target": last.get("target_mAP", 0.0),
                                 "last_scores": dict(last), "rng": rng_state(),
                                 "config": to_dict(cfg), "report": {k: float(v) for k, v in report.items()},
                                 **identity}
                    checkpoint = _epoch_checkpoint(state, Path(tmp), keep, improved, run_dir, remote)
                # the upload to the run's storage: on a full disk Ray Train keeps the previous checkpoint
                with full_disk_is_the_users(storage.join(remote or run_dir, CHECKPOINT_FILE)):
                    ray.train.report(report, checkpoint=checkpoint, checkpoint_upload_mode=mode,  # [4]
                                     delete_local_checkpoint_after_upload=True)
            finally:
                if upload == "sync" or checkpoint is None:
                    shutil.rmtree(tmp, ignore_errors=True)
        if run:
            _log_best(run, cfg, best, curves, run_dir, remote)
    except BaseException as e:
        if run:
            note = ("diverged" if isinstance(e, Diverged) else
                    f"error: {e}" if isinstance(e, ReidRayError) else "failed")
            run.set_status("FAILED", note)
            run.close()
            _unstage(run_dir, remote)
        raise
    if run:
        run.set_status("FINISHED", "completed")
        run.close()
        _unstage(run_dir, remote)


# --------------------------------------------------------------------------- helpers of the loop

def _restored(ckpt, cfg: TrainConfig, run_dir: str) -> dict | None:
    """Where this attempt starts: Ray Train's last reported checkpoint after a restart (the newest that loads,
    if that one was cut short), else the `--resume` checkpoint, else nothing (epoch 0)."""
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:
                return load_checkpoint(Path(d) / CHECKPOINT_FILE, "checkpoint")
            except ReidRayError as e:  # cut short (a crash mid-upload, a full disk): the newest that loads
                older, _ = newest_readable_checkpoint(run_dir, skip=(Path(ckpt.path).name,))
                if older is None:
                    raise
                _say(f"reid-ray: {e}; resuming from the newest checkpoint that loads, {older}")
                return load_checkpoint(storage.fetch(storage.join(older, CHECKPOINT_FILE))
                                       if storage.is_uri(older) else Path(older) / CHECKPOINT_FILE)
    if cfg.resume:  # checked by the driver before Ray started (config.checks)
        if storage.is_uri(cfg.resume):  # a copy on this node (the driver's node has it cached already)
            path = storage.join(cfg.resume, CHECKPOINT_FILE) if storage.is_dir(cfg.resume) else cfg.resume
            return load_checkpoint(storage.fetch(path))
        path = Path(cfg.resume)
        return load_checkpoint(path / CHECKPOINT_FILE if path.is_dir() else path)
    return None


def _open_run(ml: dict, cfg: TrainConfig, cfg_dict: dict, domains, run_dir: Path) -> tracking.RunWriter:
    """Rank 0's MLflow run, opened (or found again by its key after a restart) with its params, tags and datasets;
    its writes survive a tracking server that blinks (tracking.RunWriter)."""
    run_id = tracking.with_retries(tracking.open_run, ml["uri"], ml["experiment"], ml["run_key"], cfg.name,
                                   flatten(cfg), ml["tags"], cfg_dict)
    run = tracking.RunWriter(ml["uri"], run_id, ml["experiment"], cfg.name, ml["run_key"], run_dir)
    if not tracking.with_retries(tracking.has_datasets, ml["uri"], run_id):  # a restarted run logged them
        run.log_datasets(tracking.dataset_records(domains))
    return run


class _Best:
    """The best epoch so far by the run's selection metric (`TrainConfig.selection_metric`: target mAP, or a
    label-free score where the target has no labels): what best.pt holds, and the MLflow model's metrics."""

    def __init__(self, metrics: dict | None = None, metric: str = "target_mAP"):
        self.metric = metric
        self.metrics = metrics or {metric: -1.0}

    @property
    def score(self) -> float:
        return self.metrics.get(self.metric, -1.0)

    def update(self, metrics: dict) -> bool:
        if metrics.get(self.metric, -1) <= self.score:
            return False
        self.metrics = {k: float(v) for k, v in metrics.items() if k.startswith(("source_", "target_", "epoch"))}
        return True


def _evaluate(method, cfg: TrainConfig, last: bool, curves: dict, run, run_dir: Path, remote: str | None,
              epoch: int) -> dict:
    """Rank 0's evaluation of this epoch: the target (and the source where asked, and at the last epoch), the
    method's own artifacts logged under `epoch<N>/`."""
    metrics = {}
    for name, ds in method.domains.named():
        if name == "source" and not (cfg.eval_source or last):
            continue
        if not ds.labelled:  # a user's image folder: no identities, no mAP (the label-free scores below)
            continue
        res, curves[name] = evaluate_method(method, ds, cfg, name)
        metrics.update(res)
    if cfg.label_free.enabled:
        metrics.update(label_free_scores(method.eval_model(), method.domains.source, method.domains.target, cfg,
                                         method.device, source_mAP=metrics.get("source_mAP"),
                                         features_out=run_dir / f"epoch{epoch}" / PROBE_FEATURES if run else None))
    for path in method.eval_artifacts(run_dir / f"epoch{epoch}") if run else ():
        run.log_artifact(path, f"epoch{epoch}")
    if run and last:  # what the final network retrieves: the target's ranked lists (training/pictures.py)
        picture = ranked_list_picture(method.eval_model(), method.domains.target, cfg, method.device,
                                      run_dir / f"epoch{epoch}" / "ranked_lists.png")
        run.log_artifact(picture, f"epoch{epoch}")
    _publish(run_dir, remote, f"epoch{epoch}")
    return metrics


def _log_refresh_picture(method, run, run_dir: Path, remote: str | None, epoch: int) -> None:
    """Rank 0: the picture of the pseudo-label refresh this epoch began with, if it drew one (clustering.pictures),
    under `epoch<N>/clusters.png`."""
    res = getattr(method.clusterer, "last", None)
    if res is None or not res.picture:
        return
    method.clusterer.last = None  # logged once
    path = run_dir / f"epoch{epoch}" / "clusters.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(res.picture)
    run.log_artifact(path, f"epoch{epoch}")
    _publish(run_dir, remote, f"epoch{epoch}")


def _epoch_checkpoint(state: dict, tmp: Path, keep: bool, improved: bool, run_dir: Path, remote: str | None):
    """Rank 0's checkpoint of an epoch: the whole state in a Ray Train checkpoint every checkpoint_every epochs
    and at the last one (a restart resumes exactly from the latest), and as best.pt whenever the target mAP
    improves. Returns the Ray Train checkpoint to report, or None."""
    checkpoint = None
    if keep:
        save_checkpoint(state, tmp / CHECKPOINT_FILE)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
    if improved:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, run_dir / "best.pt")
        _publish(run_dir, remote, "best.pt")
    return checkpoint


def _log_best(run, cfg: TrainConfig, best: _Best, curves: dict, run_dir: Path, remote: str | None) -> None:
    """The end of rank 0's run: the CMC plot, best.pt as an artifact, and the best network as an MLflow model
    with its metrics linked to it."""
    if curves:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.log_figure(tracking.cmc_plot(curves, run_dir / "cmc.png"), "cmc.png")
        _publish(run_dir, remote, "cmc.png")
    if remote and not (run_dir / "best.pt").exists() and storage.is_file(storage.join(remote, "best.pt")):
        storage.download(storage.join(remote, "best.pt"), run_dir / "best.pt")  # staged by an earlier attempt
    if (run_dir / "best.pt").exists():
        run.log_artifact(run_dir / "best.pt", "checkpoints")
        if cfg.log_model:
            emb = _embedder(run_dir / "best.pt")
            if emb is not None:
                run.log_model(emb, best.metrics, int(best.metrics.get("epoch", cfg.epochs)))


def _publish(run_dir: Path, remote: str | None, name: str) -> None:
    """A file or folder of the staged run folder uploaded to the run's URI (nothing for a local run)."""
    if remote and (run_dir / name).exists():
        storage.upload(run_dir / name, storage.join(remote, name))


def _unstage(run_dir: Path, remote: str | None) -> None:
    """The end of a URI run's staged folder: its fallback store (if MLflow stayed away) uploaded, then removed."""
    if not remote:
        return
    try:
        _publish(run_dir, remote, "mlflow-fallback.db")
    except Exception as e:  # the run's outcome stands; its store stays here
        _say(f"reid-ray: could not upload {run_dir / 'mlflow-fallback.db'} to {remote} ({type(e).__name__}: {e})")
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _embedder(checkpoint: Path):
    """The retrieval embedder of the run's best.pt, or None (with a line in the log) where it cannot be rebuilt:
    the run and its other records stand."""
    from reid_ray.inference.embedder import load_embedder

    try:
        return load_embedder(checkpoint)
    except Exception as e:
        _say(f"reid-ray: the best network of {checkpoint} was not logged as an MLflow model "
             f"({' '.join(str(e).split())[:200]})")
        return None


def _say(line: str) -> None:
    """One progress line on the worker's own stdout (streamed to the driver by Ray). Ray Train patches
    `print` in its workers to also log at INFO to the console, so a plain print shows up twice."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()
