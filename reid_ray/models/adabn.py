"""AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016):
re-estimate every BatchNorm's running statistics on target images, weights untouched.

On the synthetic benchmark it alone lifts direct transfer from ~23 to ~59 target mAP
(bench/RESULTS.md), so it is reported as its own baseline, and MMT starts from it
(`params.adabn_init`): the first pseudo-labels come from target-normalised features.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def adapt_bn(model: nn.Module | list[nn.Module], loader, device: torch.device | str = "cpu") -> int:
    """Replace the running mean/var of every BatchNorm of `model` by their average over one pass of
    `loader` (train-mode forward, cumulative average); returns the number of batches used. A list of
    networks (MMT's two mean nets) is adapted in the same pass: each batch is loaded once and fed to each.

    Under DDP with global BatchNorm (GlobalBatchNorm / SyncBatchNorm) the statistics are the global
    batches'; every rank runs the same number of batches (the fewest any rank has), so the
    collectives inside the layers pair up.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    bns = [m for net in models for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    n = len(loader)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t)
    was_training = [net.training for net in models]
    for net in models:
        net.train()
    try:
        for i, batch in enumerate(loader):
            if i >= n:
                break
            img = batch["img"].to(device, non_blocking=True)
            for net in models:
                net(img)
    finally:  # the networks as they were, whatever stopped the pass (a momentum of None would read the host each step)
        for net, training in zip(models, was_training):
            net.train(training)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return n


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, frozen: bool = True):
    """BatchNorm normalises with the batch but does not update its running statistics (e.g. a source
    forward pass of a UDA method, so the evaluated network keeps target statistics)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)] if frozen else []
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
