"""What a run's config and data show before Ray starts: each user mistake one `ReidRayError` line.

    check_run(cfg, domains)     # train and tune drivers, after the datasets are read, before ray.init

Two parts: the ranges of the shared config fields (below), then the method's own `Method.check`
(P×K against the source identities, k against the target images, ...: each method's file). A mistake
that can only show inside a Ray worker reaches the user the same way (distributed/verdict.py).
"""

from __future__ import annotations

import math

from reid_ray import ReidRayError
from reid_ray.config import TrainConfig, flatten, is_synthetic
from reid_ray.storage import check_file, check_folder

# shared field -> (smallest valid value, the flag that sets it, what it means); --set key=N sets any of them
MINIMUM: dict[str, tuple[float, str, str]] = {
    "epochs": (1, "--epochs", "epochs to train"),
    "eval_every": (1, "--eval-every", "epochs between evaluations"),
    "checkpoint_every": (1, "--set checkpoint_every=N", "epochs between checkpoints"),
    "workers": (1, "--workers", "Ray Train workers"),
    "pretrain_epochs": (0, "--set pretrain_epochs=N", "source pretraining epochs (0: the baseline's)"),
    "max_failures": (-1, "--set max_failures=N", "worker failures tolerated (-1: no limit)"),
    "max_nonfinite_steps": (1, "--set max_nonfinite_steps=N", "non-finite losses in a row before a run is diverged"),
    "gpu_wait_s": (0, "--set gpu_wait_s=S", "seconds to wait for GPU nodes"),
    "loader.num_identities": (1, "--set loader.num_identities=P", "identities per batch (P)"),
    "loader.num_instances": (1, "--set loader.num_instances=K", "images per identity (K)"),
    "loader.test_batch_size": (1, "--set loader.test_batch_size=N", "evaluation batch size"),
    "loader.num_workers": (-1, "--set loader.num_workers=N", "loader processes (-1: from the worker's CPUs)"),
    "loader.prefetch_factor": (1, "--set loader.prefetch_factor=N", "batches each loader process keeps ready"),
    "transform.height": (16, "--set transform.height=H", "input height in pixels"),
    "transform.width": (8, "--set transform.width=W", "input width in pixels"),
    "optim.warmup_epochs": (0, "--set optim.warmup_epochs=N", "warmup epochs"),
}
POSITIVE = {"optim.lr": "--set optim.lr=X", "optim.warmup_factor": "--set optim.warmup_factor=X",
            "optim.gamma": "--set optim.gamma=X"}
NON_NEGATIVE = {"optim.weight_decay": "--set optim.weight_decay=X", "seed": "--seed"}


def check_ranges(cfg: TrainConfig) -> None:
    """The shared fields' ranges (a method's own `params` are its `check`'s)."""
    flat = flatten(cfg)
    for key, (low, flag, meaning) in MINIMUM.items():
        if flat[key] < low:
            raise ReidRayError(f"{key}={flat[key]}: {meaning} must be at least {low:g} ({flag})")
    for key, flag in POSITIVE.items():
        if not (math.isfinite(flat[key]) and flat[key] > 0):
            raise ReidRayError(f"{key}={flat[key]}: must be a positive number ({flag})")
    for key, flag in NON_NEGATIVE.items():
        if not (math.isfinite(flat[key]) and flat[key] >= 0):
            raise ReidRayError(f"{key}={flat[key]}: must be zero or more ({flag})")
    milestones = list(cfg.optim.milestones)
    if milestones != sorted(milestones):
        raise ReidRayError(f"optim.milestones={tuple(milestones)}: must increase (--set optim.milestones=[40,70])")


def check_run(cfg: TrainConfig, domains) -> None:
    """Every check that the config and the read datasets allow, before Ray starts."""
    from reid_ray.methods import method_class
    from reid_ray.methods.base import check_source_models

    check_ranges(cfg)
    check_source_models(cfg)
    method_class(cfg.method).check(cfg, domains)


def check_paths(cfg: TrainConfig) -> None:
    """Every path a run reads or writes, for its kind (a folder, a file) and, where the run writes, for
    whether it can: one line each, before anything is written. URIs (s3://, gs://) are their store's."""
    from reid_ray import tracking

    check_folder(cfg.output, "--output", writes=True)
    # the embedded benchmark is written under --data-root when missing; a real dataset is only read
    check_folder(cfg.data_root, "--data-root", writes=is_synthetic(cfg.source, cfg.target))
    uri = tracking.resolve_uri(cfg.mlflow_uri)
    if uri.startswith("sqlite:///"):
        check_file(uri[len("sqlite:///"):], "--mlflow-uri", writes=True)
    for init in cfg.init:
        check_file(init, "--init")
