"""Temporal mean networks (mean teachers): the EMA of a network's parameters, as MMT uses them."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, alpha: float, step: int) -> None:
    """Mean-teacher update of the parameters (MMT Eq. 5, with its warm start)."""
    a = min(1 - 1 / (step + 1), alpha)
    # a·e + (1 - a)·p as one multi-tensor kernel per dtype and device (torch.optim.swa_utils' EMA does the
    # same), not two kernels per parameter: ~640 launches a step for MMT's two ResNet-50s otherwise
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - a)


@torch.no_grad()
def sync_buffers(model: torch.nn.Module) -> None:
    """Average BN running statistics over ranks (mean nets update them locally)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= dist.get_world_size()
