"""What a run's config and data show before Ray starts: each user mistake one `ReidRayError` line.

    check_config(cfg)           # the CLI, then the driver: ranges, paths, source models (no data read yet)
    check_run(cfg, domains)     # train and tune drivers, after the datasets are read, before ray.init

The parts: the ranges of the shared config fields (below), the paths a run reads and writes, the source
models, then the method's own `Method.check` (P×K against the source identities, k against the target images,
...: each method's file). A mistake that can only show inside a Ray worker reaches the user the same way
(distributed/verdict.py).

Each check runs once per process for a given config: the CLI checks before it prints or resolves anything,
the driver (which bench scripts and tests call directly) asks again, and a config that passed is not checked
twice. A sweep checks its base config and every swept parameter's range ends; its trials receive that
validated plan and check nothing (distributed/sweep.py). `RUNS` counts what ran, for the test that keeps it so.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import Counter

from reid_ray import ReidRayError
from reid_ray.config import TrainConfig, apply_overrides, flatten, is_synthetic, to_dict
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

RUNS: Counter = Counter()  # (check, config digest) -> times it ran in this process
_passed: set[tuple[str, str]] = set()


def once_per_config(check):
    """Run `check(cfg, ...)` once per process for a config with this content (and these datasets): a config
    that passed is not checked again; one that failed is checked again (the user may have fixed the file)."""
    @functools.wraps(check)
    def run(cfg: TrainConfig, *args) -> None:
        key = (check.__name__, json.dumps(to_dict(cfg), sort_keys=True, default=str) + "".join(
            f"|{id(a)}" for a in args))  # a check of the data: these datasets as read
        if key in _passed:
            return
        RUNS[key] += 1
        check(cfg, *args)
        _passed.add(key)
    return run


def check_config(cfg: TrainConfig) -> None:
    """Everything that needs no dataset read: the shared ranges, the paths, the source models, a captured step."""
    check_ranges(cfg)
    check_paths(cfg)
    check_source_models(cfg)
    check_cuda_graph(cfg)


@once_per_config
def check_cuda_graph(cfg: TrainConfig) -> None:
    """`model.cuda_graph=true` (training/graphs.py) where the config shows it cannot capture: a method whose step
    is not capturable, more than one worker, torch.compile beside it, the unfused optimiser, or no GPU. A GPU
    without bf16 shows only on the worker (training.loop.step_graph)."""
    if not cfg.model.cuda_graph:
        return
    from reid_ray.methods import METHODS, method_class

    method = method_class(cfg.method)
    able = sorted(name for name, m in METHODS.items() if m.graphable)
    if not method.graphable:
        raise ReidRayError(f"model.cuda_graph=true: {cfg.method}'s step cannot be captured in a CUDA graph (it "
                           f"changes state outside its optimiser); it can for {', '.join(able)}. Drop the flag")
    if cfg.workers != 1:
        raise ReidRayError(f"model.cuda_graph=true captures the step of one worker; got --workers {cfg.workers} "
                           "(DDP's all-reduce inside a graph is not supported here yet): pass --workers 1")
    if cfg.model.compile:
        raise ReidRayError("model.cuda_graph=true and model.compile=true: pick one (--set model.compile=false)")
    if str(cfg.optim.fused).lower() == "false":
        raise ReidRayError("model.cuda_graph=true needs the fused optimiser kernel; drop --set optim.fused=false")
    if str(cfg.use_gpu).lower() in ("false", "0", "no"):
        raise ReidRayError("model.cuda_graph=true captures the step on a CUDA GPU, and use_gpu=false: drop one")


@once_per_config
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
    check_ranges(cfg)
    check_source_models(cfg)
    check_cuda_graph(cfg)
    check_method(cfg, domains)


@once_per_config
def check_method(cfg: TrainConfig, domains) -> None:
    """The method's own checks against the datasets (`Method.check`: its file)."""
    from reid_ray.methods import method_class

    method_class(cfg.method).check(cfg, domains)


@once_per_config
def check_source_models(cfg: TrainConfig) -> None:
    """More `init` checkpoints than the method starts from is a user error; each given one must exist."""
    from reid_ray import storage
    from reid_ray.methods import method_class

    n = method_class(cfg.method).source_models(cfg.params)
    if n and not cfg.has_source:
        raise ReidRayError(f"{cfg.method} would start from {n} source model(s), and --source none has no source to "
                           "train one on: drop params.source_init=true, or name a source dataset")
    if len(cfg.init) > n:
        count = {0: "no source model", 1: "one source model", 2: "two source models"}.get(n, f"{n} source models")
        raise ReidRayError(f"--init: {cfg.method} starts from {count}, got {len(cfg.init)} checkpoints; "
                           f"pass {n or 'none'}")
    for path in cfg.init:
        if path and not storage.is_file(path):  # a local file or a URI (s3://...)
            raise ReidRayError(f"--init {path}: no such checkpoint file (a checkpoint.pt written by reid-ray train)")


@once_per_config
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


def check_sweep(base: TrainConfig, space, domains) -> None:
    """The base config, and each swept parameter at both ends of its range (every value of a choice), as
    a trial would run them: a sample no trial could train with is the user's to fix before Ray starts."""
    check_run(base, domains)
    for name, p in (space.params if space else {}).items():
        for value in (p.values if p.distribution == "choice" else (p.low, p.high)):
            try:
                check_run(apply_overrides(copy.deepcopy(base), {name: value}), domains)
            except ReidRayError as e:
                raise ReidRayError(f"search space {space.path}: {name} = {value} would fail a trial: {e}") from None
