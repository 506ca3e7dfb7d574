"""Temporal mean networks (mean teachers): the EMA of a network's parameters, as MMT uses them."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, alpha: float, step: int | torch.Tensor,
               ok: torch.Tensor | None = None) -> None:
    """Mean-teacher update of the parameters (MMT Eq. 5, with its warm start): e ← a·e + (1 - a)·p,
    a = min(1 - 1/(step + 1), alpha).

    `ok` (a 0-dim device tensor, 1.0 or 0.0: `EpochContext.step_ok`) scales the update's weight on the device,
    so a skipped step leaves the mean net as it was without the host reading the flag: then
    e ← e + ok·(1 - a)·(p - e), three multi-tensor kernels taking the weight as a tensor (`_foreach_lerp_` would
    read a tensor weight back to the host). `step` may be a 0-dim device tensor (a captured step,
    `model.cuda_graph`, `EpochContext.iteration_t`): the weight is then computed there, in float64 as Python
    computes it, so the update is the same to the bit; `ok` then defaults to 1."""
    if isinstance(step, torch.Tensor):
        a = torch.clamp(1 - 1 / (step.double() + 1), max=alpha)
        ok = torch.ones((), device=step.device) if ok is None else ok
        weight = ok * (1 - a).float()
    else:
        a = min(1 - 1 / (step + 1), alpha)
        weight = None if ok is None else ok * (1 - a)
    params, src = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if weight is None:
        # a·e + (1 - a)·p as one multi-tensor kernel per dtype and device (torch.optim.swa_utils' EMA does the
        # same), not two kernels per parameter: ~640 launches a step for MMT's two ResNet-50s otherwise
        torch._foreach_lerp_(params, src, 1 - a)
        return
    delta = torch._foreach_sub(src, params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(params, delta)


@torch.no_grad()
def sync_buffers(model: torch.nn.Module) -> None:
    """Average BN running statistics over ranks (mean nets update them locally)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= dist.get_world_size()
