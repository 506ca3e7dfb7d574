"""BatchNorm over the global batch of all DDP workers, on any device.

torch's `SyncBatchNorm` runs on GPUs only; on CPU workers (gloo) each rank would
normalise with the statistics of its own share of the batch, so 1 and N workers
train different models at the same global batch. `GlobalBatchNorm` all-reduces
the per-channel sum, sum of squares and count (with gradients, through
torch's differentiable functional `all_reduce`), so every rank normalises with the
global batch's statistics, as a single process would.

`samples_per_bn` (> 0) normalises each run of that many consecutive images of the global batch on its
own, as the authors' 4-GPU DataParallel did (16 images per GPU; OpenUnReID's `samples_per_bn: 16`):
groups inside a rank need no communication, a group larger than a rank's share is all-reduced over
that many consecutive ranks (a `torch.distributed` subgroup). The same global batch gives the same
groups on 1 or N workers, as long as the groups fit the shares (checked before Ray starts:
`check_samples_per_bn`). The running statistics follow the mean of the groups' statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_SUBGROUPS: dict[int, object] = {}


def _rank_subgroup(ranks_per_group: int):
    """This rank's subgroup of `ranks_per_group` consecutive ranks (created once, by every rank together:
    the first grouped BatchNorm forward is reached by all ranks in the same order)."""
    if ranks_per_group not in _SUBGROUPS:
        _SUBGROUPS[ranks_per_group], _ = dist.new_subgroups(group_size=ranks_per_group)
    return _SUBGROUPS[ranks_per_group]


def check_samples_per_bn(samples_per_bn: int, global_batch: int, workers: int) -> None:
    """Whether groups of `samples_per_bn` images fit a global batch of `global_batch` over `workers` ranks."""
    from reid_ray import ReidRayError

    n, share = samples_per_bn, global_batch // max(workers, 1)
    if n < 0:
        raise ReidRayError(f"model.samples_per_bn={n}: expected ≥ 0 (0: BatchNorm over the whole global batch)")
    if not n:
        return
    fits = (share % n == 0) if n <= share else (n % share == 0 and workers % (n // share) == 0)
    if global_batch % n or not fits:
        raise ReidRayError(f"model.samples_per_bn={n} does not split the global batch of {global_batch} "
                           f"({workers} workers × {share}) into whole groups; use a divisor of {share} or a "
                           f"multiple of it that divides {global_batch}")


class GlobalBatchNorm(_BatchNorm):
    def __init__(self, *args, samples_per_bn: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples_per_bn = samples_per_bn

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        n, b = self.samples_per_bn, x.shape[0]
        if not self.training or (world == 1 and (not n or n >= b)):
            return super().forward(x)
        if n and n <= b:  # groups inside this rank's share: no communication
            full = b // n * n
            y = self._grouped(x[:full], b // n)
            if full == b:
                return y
            # a batch that is not whole groups (the last of an AdaBN pass): the rest is a group of its own,
            # or normalised with the running statistics when it is a single image
            rest = x[full:]
            z = self._normalise(rest.unsqueeze(0), None).squeeze(0) if len(rest) > 1 else self._running(rest)
            return torch.cat([y, z])
        if n and n % b:
            from reid_ray import ReidRayError
            raise ReidRayError(f"model.samples_per_bn={n} is not a multiple of this worker's {b} images")
        group = _rank_subgroup(n // b) if n and n // b < world else None
        return self._normalise(x.unsqueeze(0), group if n else None, reduce=True).squeeze(0)

    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """BatchNorm of each run of len(x) / groups consecutive images on its own, in one native batch_norm
        call (cuDNN on a GPU): the groups are moved beside the channels, (G·n, C, ...) -> (n, G·C, ...), so
        each (group, channel) pair is one channel of a plain BatchNorm. Two copies of the activations instead
        of ~20 small kernels a layer in the forward and again in the backward: a step bound by kernel launches
        (MMT's BN over 16 images on a GPU) was the cost. The running statistics follow the mean of the
        groups' (the update is linear, so the mean of G updates from the same running value)."""
        if groups == 1:
            return super().forward(x)
        b, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        n = b // groups
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if cl:  # channels last in memory throughout: one copy each way, and cuDNN's NHWC kernels
            xg = x.movedim(1, -1).reshape(groups, n, *rest, c).movedim(0, -2).reshape(n, *rest, groups * c).movedim(-1, 1)
        else:
            xg = x.reshape(groups, n, c, *rest).transpose(0, 1).reshape(n, groups * c, *rest)
        track = self.track_running_stats
        m = 0.0
        if track:
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.num_batches_tracked.add_(1)
        rm = self.running_mean.repeat(groups) if track else None
        rv = self.running_var.repeat(groups) if track else None
        w = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        y = nn.functional.batch_norm(xg, rm, rv, w, bias, True, m, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(groups, c).mean(0))
                self.running_var.copy_(rv.view(groups, c).mean(0))
        if cl:
            return y.movedim(1, -1).reshape(n, *rest, groups, c).movedim(-2, 0).reshape(b, *rest, c).movedim(-1, 1)
        return y.reshape(n, groups, c, *rest).transpose(0, 1).reshape(x.shape)

    def _running(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                        self.eps)

    def _normalise(self, g: torch.Tensor, group, reduce: bool = False) -> torch.Tensor:
        """BatchNorm of every group g[i] (G, n, C, ...) on its own; `reduce`: each group's statistics summed
        over the ranks of `group` (None: all ranks), with gradients."""
        dims = [1, *range(3, g.dim())]
        c = g.shape[2]
        count = torch.full((g.shape[0], 1), g.numel() / (g.shape[0] * c), dtype=g.dtype, device=g.device)
        stats = torch.cat([g.sum(dims), (g * g).sum(dims), count], dim=1)  # (G, 2C + 1)
        if reduce:  # differentiable: the backward all-reduces the gradients of the sums
            from torch.distributed._functional_collectives import all_reduce
            stats = all_reduce(stats, "sum", group if group is not None else dist.group.WORLD)
        cnt = stats[:, -1:]
        mean = stats[:, :c] / cnt
        var = stats[:, c:2 * c] / cnt - mean * mean  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach().mean(0), alpha=m)
                self.running_var.mul_(1 - m).add_((var.detach() * cnt / (cnt - 1)).mean(0), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = (g.shape[0], 1, c) + (1,) * (g.dim() - 3)
        y = (g - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            w_shape = (1, 1, c) + (1,) * (g.dim() - 3)
            y = y * self.weight.view(w_shape) + self.bias.view(w_shape)
        return y


def convert_sync_bn(module: nn.Module, device: torch.device, samples_per_bn: int = 0) -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere (a plain
    BatchNorm on one worker); with `samples_per_bn`, GlobalBatchNorm's groups on every device."""
    if device.type == "cuda" and not samples_per_bn:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, samples_per_bn=samples_per_bn)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # keeps requires_grad (BNNeck's frozen bias)
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, device, samples_per_bn))
    return module
