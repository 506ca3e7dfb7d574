"""The small interface every method implements (see docs/architecture.md), and the registry.

A method receives its config, the two domains and a device; builds its models;
does what it does when an epoch starts; and turns a batch into named losses:

    method = METHODS["baseline"](cfg, domains, device)
    method.setup(wrap=prepare_model)          # DDP-wrap under Ray Train; identity elsewhere
    for epoch in range(cfg.epochs):
        method.on_epoch_start(ctx)
        for batch in method.train_loader:
            losses = method.train_step(batch, ctx)   # {"loss": total, "ce": ..., "triplet": ...}
            ...backward, optimizer step (training.loop.train_epoch)...
            method.after_step(ctx)
    model = method.eval_model()               # the network to evaluate, unwrapped

Everything that makes a method itself is declared in its own file: its typed `Params`, how many
source models it starts from, its clustering spec, its paper settings per real benchmark
(`presets`, `published`) and its overrides on the embedded benchmark. Shared code never names a
method. A new method is one file:

    @register_method
    class Mine(Method):
        name = "mine"
        Params = MineParams          # a @dataclass with the paper's names, one comment each
        def setup(self, wrap=...): ...
        def train_step(self, batch, ctx): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from reid_ray import ReidRayError
from reid_ray.data.domains import Domains
from reid_ray.training.checkpoint import load_checkpoint
from reid_ray.training.graphs import plain_lr
from reid_ray.training.optim import build_optimizer, param_groups, warmup_step_scheduler

if TYPE_CHECKING:
    from reid_ray.clustering.client import ClusterSpec
    from reid_ray.config import TrainConfig

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to `METHODS` under its `name` (timm's `@register_model`)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a `name`")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method called `name`, or a clear error listing the valid ones."""
    if name not in METHODS:
        raise ReidRayError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_pk(cfg: TrainConfig, labels, what: str) -> None:
    """The P×K sampler the workers would build over `labels`, built once on the driver: its errors there."""
    from reid_ray.data.sampler import PKSampler

    try:
        PKSampler(labels, cfg.loader.num_instances, cfg.loader.num_identities, cfg.workers)
    except ReidRayError as e:
        raise ReidRayError(f"{what}: {e}") from None


def check_batch(n: int, batch: int, workers: int, what: str, flag: str) -> None:
    """A global batch of `batch` images drawn from `n`, split over `workers` ranks."""
    if batch < 1 or batch % workers:
        raise ReidRayError(f"{what}: a batch of {batch} must be a positive multiple of the {workers} workers ({flag})")
    if n < batch:
        raise ReidRayError(f"{what} has {n} images, fewer than one batch of {batch}; lower it ({flag})")


@dataclass
class NoParams:
    """The `params` of a method that has none of its own."""


@dataclass
class EpochContext:
    epoch: int
    rank: int = 0
    world_size: int = 1
    iteration: int = 0               # global step counter, updated by the loop
    nonfinite_in_a_row: int = 0      # steps skipped in a row for a NaN/inf loss (training.loop.train_epoch)
    step_ok: Any = None              # during `after_step` of a device-side skip: 1.0 (finite step) or 0.0 (skipped),
    #                                  a device tensor that scales the method's own updates (mean nets)
    iteration_t: Any = None          # under model.cuda_graph: `iteration` as a device tensor (a captured step reads
    #                                  it there; the Python int is the capture's), else None


class Method:
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams           # the method's own hyperparameters (a dataclass, papers' names)
    needs_source_init: ClassVar[bool] = False   # starts from source-trained baselines (`init`)
    uses_clustering: ClassVar[bool] = False     # asks `self.clusterer` for pseudo-labels (see `cluster_spec`)
    adapts: ClassVar[bool] = True               # trains on the target; False: source only (target = direct transfer)
    # the fully unsupervised setting (`--source none`: the target alone, from ImageNet or random weights): what
    # it sets (e.g. no source model to start from), or None for a method that needs a labelled source
    unsupervised: ClassVar[dict[str, Any] | None] = None
    # ... and on the embedded benchmark with no source (its `small` network from random weights), on top of
    # `synthetic_overrides`: a network that starts from nothing needs more epochs than one fine-tuned from a source
    synthetic_unsupervised: ClassVar[dict[str, Any]] = {}
    # config fields the method's paper trains with on every dataset (e.g. a constant lr), before the presets
    config_defaults: ClassVar[dict[str, Any]] = {}
    # what changes on the embedded synthetic benchmark (small, CPU-sized), on top of config.SYNTHETIC_DEFAULTS
    synthetic_overrides: ClassVar[dict[str, Any]] = {}
    # ... and in a sweep on it (after config.SYNTHETIC_SWEEP), where minutes count most
    sweep_overrides: ClassVar[dict[str, Any]] = {}
    # per real-benchmark preset (presets.py names them): the paper's settings, and its published figures
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    published: ClassVar[dict[str, dict[str, Any]]] = {}
    # parameters that take one of a few words, checked when the config is resolved (before Ray starts)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    # True when a step's state changes only through the optimiser and `after_step` (which honours
    # `ctx.step_ok`): a NaN step can then be skipped on the device without a host sync (training.loop.train_epoch).
    # False for methods that write a memory in the backward (ECN, SpCL) or elsewhere during the step
    device_skip: ClassVar[bool] = False
    # True when the whole step can be captured in a CUDA graph (`model.cuda_graph`, training/graphs.py): a
    # `device_skip` method whose step has one shape and reads nothing from the host that changes between steps
    # but `ctx.iteration_t`; `graph_key()` names what would need a new capture when it changes
    graphable: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, domains: Domains, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.cfg, self.domains, self.device = cfg, domains, device
        self.rank, self.world_size = rank, world_size
        self.p = cfg.params
        self.models: dict[str, nn.Module] = {}
        self.train_loader = None
        self.clusterer = None        # set by the worker loop for methods that use clustering
        self.init_states: list = []  # source-trained weights, one per source model (`source_models`)

    @property
    def init_state(self) -> dict | None:
        """The (first) source-trained state dict, or None."""
        return self.init_states[0] if self.init_states else None

    @classmethod
    def source_models(cls, params) -> int:
        """How many source-trained models the method starts from: 0 unless `needs_source_init`, and 0 where its
        params say `source_init: false` (it then starts from `model.pretrained`)."""
        return 1 if cls.needs_source_init and getattr(params, "source_init", True) else 0

    @classmethod
    def pretrain_params(cls, params) -> dict[str, Any]:
        """The baseline's `params` the method's source models train with, over the baseline's defaults (the
        driver's `pretraining_plan`, whose cache key they enter): none by default (BoT's recipe)."""
        return {}

    @classmethod
    def check(cls, cfg: TrainConfig, domains: Domains) -> None:
        """User mistakes the data shows before Ray starts (checks.check_run calls it on the driver), each a
        `ReidRayError`: by default, the source P×K batch against the source identities. A method that
        trains on other batches overrides it (and calls `check_pk` or `check_batch` for each)."""
        if domains.source is None:
            raise ReidRayError(f"{cfg.method} needs a labelled source; name one with --source")
        check_pk(cfg, domains.source.train["pid"].to_numpy(), f"source {cfg.source}")

    @classmethod
    def missing_parts(cls, cfg: TrainConfig, domains) -> list[str]:
        """The parts of the method, as configured, that the target's files cannot feed (other than through its
        cameras: `camera_parts`), each said as what the run loses; the driver warns once with them. None by
        default."""
        return []

    @classmethod
    def camera_parts(cls, cfg: TrainConfig) -> list[str]:
        """The parts of the method, as configured, that need several target cameras, each said as what it
        loses on a target of one camera (the driver warns once with them; data/folder.py says where a folder's
        cameras come from). By default the cross-camera target sampler, where the method's params use it."""
        if getattr(cfg.params, "target_sampler", None) == "cross_camera":
            return ["the cross-camera sampler draws each cluster's K images from that one camera (a plain P×K "
                    "sampler)"]
        return []

    @classmethod
    def cluster_spec(cls, cfg: TrainConfig) -> ClusterSpec | None:
        """What the pseudo-label refresh computes (methods with `uses_clustering`)."""
        return None

    @staticmethod
    def source_weights(path: str | Path) -> dict[str, torch.Tensor]:
        """The network weights of a source-trained checkpoint (a baseline's or SAN's checkpoint.pt: the default
        layout, read as `retrieval_networks` reads it)."""
        state = load_checkpoint(path, "--init")
        try:
            return Method.retrieval_networks(state["method"])["net"]
        except ReidRayError:
            raise ReidRayError(f"--init {path}: not a source model checkpoint (a checkpoint.pt written by "
                               "reid-ray train --method baseline)") from None

    @classmethod
    def retrieval_networks(cls, method_state: dict) -> dict[str, dict[str, torch.Tensor]]:
        """{name: ReIDNet state dict} of the re-ID networks in a checkpoint's `method` state (what `state_dict`
        wrote), the one `eval_model` returns first, under the names `eval_models` gives them: what reid-ray
        export, embed and evaluate read a checkpoint through. By default `models["net"]`, as `state_dict` writes
        a one-network method; a method that keeps its networks otherwise (several, wrapped, beside the optimised
        ones) overrides this next to its `state_dict`. A state of another layout is a `ReidRayError`."""
        return {"net": state_entry(method_state, "models", "net")}

    def setup(self, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        """Build models (then wrapped for DDP), the optimizer, scheduler and train loader."""
        raise NotImplementedError

    def build_optimizer(self, *modules: nn.Module) -> None:
        """`self.optimizer` over the trainable parameters of `modules` and `self.scheduler`, from `cfg.optim`
        (BoT's warmup + steps; the backbone's lr × `base_lr_mult`; BatchNorm without weight decay unless
        `bn_weight_decay`)."""
        o = self.cfg.optim
        self.optimizer = build_optimizer(param_groups(modules, o), o)
        self.scheduler = warmup_step_scheduler(self.optimizer, o.warmup_epochs, o.warmup_factor, o.milestones, o.gamma)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.train_loader is not None:
            self.train_loader.sampler.set_epoch(ctx.epoch)

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, ctx: EpochContext) -> None:
        """After each optimizer step (e.g. mean-teacher updates)."""

    def eval_model(self) -> nn.Module:
        raise NotImplementedError

    def eval_models(self) -> dict[str, nn.Module]:
        """Every network worth evaluating; the run reports the best (e.g. both mean nets)."""
        return {"net": self.eval_model()}

    def eval_artifacts(self, out_dir: str | Path) -> list[Path]:
        """Files to log beside an evaluation (e.g. reconstructions); none by default."""
        return []

    def iterations(self) -> int | None:
        """Iterations per epoch (None: one pass of the train loader)."""
        return None

    def graph_key(self) -> Any:
        """What the captured step (`model.cuda_graph`) depends on besides the batch's shapes: a new capture when
        it changes (MMT with DBSCAN: the number of clusters its logits are cut to). None: nothing."""
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
        for group in self.optimizer.param_groups:  # the kernel is this run's choice, not the checkpoint's machine's
            for k in ("fused", "foreach"):
                group[k] = self.optimizer.defaults.get(k)
            if group.get("fused"):  # a checkpoint of the unfused kernel keeps its step counts on the host
                for p in group["params"]:
                    kept = self.optimizer.state.get(p, {})
                    if isinstance(kept.get("step"), torch.Tensor):
                        kept["step"] = kept["step"].to(device=p.device, dtype=torch.float32)
        plain_lr(self.optimizer)  # a model.cuda_graph run's device lr; its own run makes it one again
        self.scheduler.load_state_dict(state["scheduler"])


def state_entry(method_state: Any, *keys: str) -> Any:
    """`method_state[keys[0]][keys[1]]...` of a checkpoint; a `ReidRayError` naming the missing entry and what
    the state holds there instead (a checkpoint another method wrote, or a damaged one)."""
    entry = method_state
    for depth, key in enumerate(keys):
        if not isinstance(entry, dict) or key not in entry:
            where = ".".join(("method", *keys[:depth]))
            held = ", ".join(map(str, entry)) if isinstance(entry, dict) and entry else "nothing"
            raise ReidRayError(f"no {where}.{key} ({where} holds {held})")
        entry = entry[key]
    return entry


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def gather_batch(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's features (with gradients) and labels, across DDP ranks.

    Mining triplets over the global batch makes the loss independent of how many
    workers share it; the differentiable all-gather sums the gradients of
    every rank's copy back to the owner, and DDP's averaging then yields exactly
    the single-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return feats, labels
    from torch.distributed._functional_collectives import all_gather_single_autograd
    all_feats = all_gather_single_autograd(feats, 0, dist.group.WORLD)
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    return all_feats, torch.cat(all_labels)
