"""The Ray Train worker loop: one flat function per worker (Ray's torch examples' shape).

Builds the method, wraps its models with `prepare_model` (DDP), trains epochs, evaluates
on rank 0 every `eval_every` epochs, reports metrics and checkpoints with
`ray.train.report`, and resumes from `ray.train.get_checkpoint()` or `--resume`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch

from reid_ray.config import TrainConfig, from_dict
from reid_ray.data.readers import read_dataset
from reid_ray.engine import evaluate_method, train_epoch
from reid_ray.methods import METHODS, Domains, EpochContext

CHECKPOINT_FILE = "checkpoint.pt"


def _load_state(cfg: TrainConfig):
    import ray.train

    ckpt = ray.train.get_checkpoint()  # set when Ray restarts a failed worker group
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if cfg.resume:
        path = Path(cfg.resume)
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        return torch.load(path, map_location="cpu", weights_only=False)
    return None


def _clusterer(cfg: TrainConfig, config: dict, domains: Domains):
    from reid_ray.clustering.client import LocalClusterer

    if config.get("pseudo_labeler") is not None:
        from reid_ray.clustering.actor import ActorClusterer
        return ActorClusterer(config["pseudo_labeler"])
    t = domains.target.train
    return LocalClusterer(cluster_spec(cfg), t["pid"].to_numpy(), t["camid"].to_numpy())


def cluster_spec(cfg: TrainConfig):
    from reid_ray.clustering.client import ClusterSpec

    return ClusterSpec(num_clusters=int(cfg.params["num_clusters"]), seed=cfg.seed)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the method, train, evaluate and checkpoint on rank 0."""
    import ray.train
    import ray.train.torch

    from reid_ray import tracking

    # Ray Train logs every report and checkpoint at INFO; our per-epoch line says the same, shorter
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train v2 reports each rank's full metrics dict at INFO through a logger named by its file
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    cfg = from_dict(config["cfg"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    domains = Domains(read_dataset(cfg.source, cfg.data_root), read_dataset(cfg.target, cfg.data_root))
    method = METHODS[cfg.method](cfg, domains, device, rank, world)
    if config["init"]:  # source_inits(): a list of checkpoint paths
        from reid_ray.methods.mmt import source_init_state
        method.init_states = [source_init_state(torch.load(p, map_location="cpu", weights_only=False))
                              for p in config["init"]]
    if method.uses_clustering:
        method.clusterer = _clusterer(cfg, config, domains)
    method.setup(wrap=ray.train.torch.prepare_model)
    if device.type == "cuda":
        for m in method.models.values():
            m.to(memory_format=torch.channels_last)
    ectx = EpochContext(epoch=0, rank=rank, world_size=world)
    start, best = 0, {"target_mAP": -1.0}
    last_target = 0.0  # the latest target mAP, carried between evaluations (Tune's ASHA metric)
    state = _load_state(cfg)
    if state is not None:
        method.load_state_dict(state["method"])
        start, best, ectx.iteration = state["epoch"] + 1, state["best"], state["iteration"]
        last_target = state.get("last_target", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
    uri, run_id = config["mlflow_uri"], config["mlflow_run_id"]
    run_dir = Path(config["run_dir"])
    curves = {}
    for epoch in range(start, cfg.epochs):
        ectx.epoch = epoch
        metrics = {"epoch": epoch + 1, **train_epoch(method, ectx, cfg.amp)}
        last = epoch + 1 == cfg.epochs
        if rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or last):
            for name, ds in (("source", domains.source), ("target", domains.target)):
                if name == "source" and not (cfg.eval_source or last):
                    continue
                res, curves[name] = evaluate_method(method, ds, cfg, name)
                metrics.update(res)
            last_target = metrics["target_mAP"]
            if run_id and hasattr(method, "eval_artifacts"):  # e.g. SAN's texture reconstructions
                for path in method.eval_artifacts(run_dir / f"epoch{epoch + 1}"):
                    tracking.log_artifact(uri, run_id, path, f"epoch{epoch + 1}")
        if rank == 0:
            _say(f"[epoch {epoch + 1}/{cfg.epochs}] " + "  ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if run_id:
                tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = {"method": method.state_dict(), "epoch": epoch, "best": best, "iteration": ectx.iteration,
                         "last_target": last_target, "rng": {"torch": torch.get_rng_state()}, "config": config["cfg"]}
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                if metrics.get("target_mAP", -1) > best["target_mAP"]:
                    best = {k: v for k, v in metrics.items() if k.startswith(("source_", "target_", "epoch"))}
                    run_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(state, run_dir / "best.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "best_target_mAP": best["target_mAP"], "target_mAP_last": last_target,
                              "mlflow_run_id": run_id}, checkpoint=checkpoint)
    if rank == 0 and run_id:
        from reid_ray.tracking import cmc_plot
        if curves:
            cmc_plot(curves, run_dir / "cmc.png")
            tracking.log_artifact(uri, run_id, run_dir / "cmc.png")
        if (run_dir / "best.pt").exists():
            tracking.log_artifact(uri, run_id, run_dir / "best.pt", "checkpoints")


def _say(line: str) -> None:
    """One progress line on the worker's own stdout (streamed to the driver by Ray). Ray Train patches
    `print` in its workers to also log at INFO to the console, so a plain print shows up twice."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()
