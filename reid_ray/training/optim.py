"""The optimiser and its schedule, built the same way for every method (`Method.build_optimizer`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reid_ray import ReidRayError


def warmup_step_scheduler(optimizer, warmup_epochs: int, warmup_factor: float, milestones, gamma: float):
    """BoT's lr schedule, stepped once per epoch: linear warmup, then ×gamma at each milestone."""
    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs
        return gamma ** int(np.searchsorted(sorted(milestones), epoch, side="right"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(modules, optim_cfg) -> list[dict]:
    """Parameter groups by role: backbone (`*backbone.*`, lr × base_lr_mult) or new layers, and BatchNorm
    (no weight decay when `bn_weight_decay` is off) or the rest; highest lr first (`param_groups[0]`'s lr is
    the one logged)."""
    o = optim_cfg
    groups: dict[tuple[float, float], list] = {}  # (lr, weight decay) -> parameters, in module order
    for module in modules:
        norms = {id(p) for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                 for p in m.parameters(recurse=False)}
        for name, p in module.named_parameters():
            if p.requires_grad:
                base = name.startswith("backbone.") or ".backbone." in name
                key = (o.lr * (o.base_lr_mult if base else 1.0),
                       0.0 if id(p) in norms and not o.bn_weight_decay else o.weight_decay)
                groups.setdefault(key, []).append(p)
    # one group when all agree (the default): the same optimiser state layout as a plain parameter list
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items(), reverse=True)]


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    """Adam or SGD (momentum 0.9) over `params`, with the fused kernel where `optim.fused` asks for it (`auto`:
    when the parameters are on a GPU, where it replaces ~10 launches a parameter group by one; on a CPU torch's
    default path, which every CPU figure in bench/RESULTS.md was measured with)."""
    o = optim_cfg
    if o.optimizer not in ("adam", "sgd"):
        raise ReidRayError(f"unknown optimizer {o.optimizer!r}; valid: adam, sgd")
    params = list(params)
    first = next((p for g in params for p in (g["params"] if isinstance(g, dict) else [g])), None)
    on_gpu = first is not None and first.device.type == "cuda"
    fused = on_gpu if str(o.fused) == "auto" else str(o.fused).lower() in ("true", "1", "yes")
    kind = {"fused": True} if fused else {}  # torch's default otherwise: foreach on a GPU, the per-tensor loop on a CPU
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **kind)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=0.9, **kind)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's optimiser state as a fresh optimiser's: Adam's moments and step count zeroed, SGD's
    momentum buffer zeroed (a zero buffer takes the next gradient whole, as a fresh one does without dampening).
    In place, so the tensors keep their addresses (a captured step, `model.cuda_graph`, reads them there); the
    steps that follow equal those after `optimizer.state.clear()`."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
