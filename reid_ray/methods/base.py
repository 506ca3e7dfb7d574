"""The small interface every method implements (see ../shared/DESIGN.md).

A method receives its config, the two domains and a device; builds its models;
does what it does when an epoch starts; and turns a batch into named losses:

    method = METHODS["baseline"](cfg, domains, device)
    method.setup(wrap=prepare_model)          # DDP-wrap under Ray Train; identity elsewhere
    for epoch in range(cfg.epochs):
        method.on_epoch_start(ctx)
        for batch in method.train_loader:
            losses = method.train_step(batch, ctx)   # {"loss": total, "ce": ..., "triplet": ...}
            ...backward, optimizer step (done by the driver loop)...
    model = method.eval_model()               # the network to evaluate, unwrapped
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reid_ray.config import TrainConfig
from reid_ray.data.readers import ReIDDataset


@dataclass
class Domains:
    source: ReIDDataset
    target: ReIDDataset


@dataclass
class EpochContext:
    epoch: int
    rank: int = 0
    world_size: int = 1
    iteration: int = 0               # global step counter, updated by the loop


class Method:
    name: ClassVar[str]
    needs_source_init: ClassVar[bool] = False   # starts from a source-trained baseline (--init)
    uses_clustering: ClassVar[bool] = False     # asks `self.clusterer` for pseudo-labels
    adapts: ClassVar[bool] = True               # trains on the target; False: source only (target = direct transfer)
    # the method's own hyperparameters, with the papers' names; documented in the subclass
    default_params: ClassVar[dict[str, Any]] = {}
    # config fields the method's paper trains with on every dataset (e.g. MMT's constant lr), before the presets
    config_defaults: ClassVar[dict[str, Any]] = {}
    # what changes on the embedded synthetic benchmark (small, CPU-sized), on top of config.SYNTHETIC_DEFAULTS
    synthetic_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: TrainConfig, domains: Domains, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.cfg, self.domains, self.device = cfg, domains, device
        self.rank, self.world_size = rank, world_size
        self.p = {**self.default_params, **cfg.params}
        self.models: dict[str, nn.Module] = {}
        self.train_loader = None
        self.clusterer = None        # set by the driver loop for methods that use clustering
        self.init_states: list = []  # source-trained weights, for methods that start from them (MMT: one per net)

    @property
    def init_state(self) -> dict | None:
        """The (first) source-trained state dict, or None."""
        return self.init_states[0] if self.init_states else None

    @classmethod
    def source_models(cls, params: dict) -> int:
        """How many source-trained models the method starts from (`needs_source_init` methods)."""
        return 1

    def setup(self, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        """Build models (then wrapped for DDP), the optimizer, scheduler and train loader."""
        raise NotImplementedError

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.train_loader is not None:
            self.train_loader.sampler.set_epoch(ctx.epoch)

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        raise NotImplementedError

    def eval_models(self) -> dict[str, nn.Module]:
        """Every network worth evaluating; the run reports the best (MMT: both mean nets)."""
        return {"net": self.eval_model()}

    def iterations(self) -> int | None:
        """Iterations per epoch (None: one pass of the train loader)."""
        return None

    def epoch_metrics(self) -> dict[str, float]:
        """Extra per-epoch metrics (e.g. clustering timings and quality)."""
        return {}

    # -- checkpoint state: models (unwrapped), optimizer, scheduler, anything else the method keeps
    def state_dict(self) -> dict:
        return {"models": {k: unwrap(m).state_dict() for k, m in self.models.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.models.items():
            unwrap(m).load_state_dict(state["models"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def warmup_step_scheduler(optimizer, warmup_epochs: int, warmup_factor: float, milestones, gamma: float):
    """BoT's lr schedule, stepped once per epoch: linear warmup, then ×gamma at each milestone."""
    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs
        return gamma ** int(np.searchsorted(sorted(milestones), epoch, side="right"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    if optim_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, momentum=0.9)
    from reid_ray import ReidRayError
    raise ReidRayError(f"unknown optimizer {optim_cfg.optimizer!r}; valid: adam, sgd")


def gather_batch(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's features (with gradients) and labels, across DDP ranks.

    Mining triplets over the global batch makes the loss independent of how many
    workers share it; `torch.distributed.nn.all_gather` sums the gradients of
    every rank's copy back to the owner, and DDP's averaging then yields exactly
    the single-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return feats, labels
    from torch.distributed.nn.functional import all_gather
    all_feats = torch.cat(all_gather(feats))
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    return all_feats, torch.cat(all_labels)
