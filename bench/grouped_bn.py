"""Grouped BatchNorm (`model.samples_per_bn`): the native path (groups beside the channels, one batch_norm call)
against the per-op Python path it replaced, on one training step.

    python -m bench.grouped_bn [--arch small] [--batch 32] [--group 16] [--hw 64 32]

Times forward + backward + an Adam step of the re-ID network with BN over groups of `--group` images (median and
spread of 3 runs of 10 steps after a warm-up run, `bench.harness.timed`), once per path, in one process; prints
the two and the leaf aten ops (torch.profiler, views excluded: a proxy for a GPU's kernel launches) of one step.
The defaults are the embedded benchmark's rank share (32 images of the global 64 on 2 workers, groups of 16,
`small` at 64x32).
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import timed
from reid_ray.models.reid_net import ModelConfig, build_reid_net
from reid_ray.models.sync_bn import GlobalBatchNorm

VIEWS = {"aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::transpose", "aten::as_strided",
         "aten::slice", "aten::select", "aten::expand", "aten::permute", "aten::movedim", "aten::t", "aten::empty",
         "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::alias", "aten::_unsafe_view",
         "aten::_reshape_alias", "aten::detach_", "aten::expand_as", "aten::view_as", "aten::contiguous"}


def python_grouped(self: GlobalBatchNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The replaced path: each group's statistics from sums, ~25 small ops a layer."""
    return self._normalise(x.reshape(groups, x.shape[0] // groups, *x.shape[1:]), None).reshape(x.shape)


def time_step(arch: str, batch: int, group: int, hw: tuple[int, int]) -> tuple[float, float, int]:
    """(median, spread) seconds a step and leaf aten ops a step."""
    torch.manual_seed(0)
    net = build_reid_net(ModelConfig(arch=arch, sync_bn=False, samples_per_bn=group), 100, torch.device("cpu")).train()
    x, y = torch.randn(batch, 3, *hw), torch.randint(0, 100, (batch,))
    opt = torch.optim.Adam(net.parameters(), 1e-4)

    def step():
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out["logits"], y) + out["feat"].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = timed(lambda: [step() for _ in range(10)], repeats=3)  # on the CPU: nothing queued, no sync
    median, spread = run.median, run.spread
    with torch.profiler.profile() as prof:
        step()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children and e.name not in VIEWS)
    return median / 10, spread / 10, ops


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--hw", type=int, nargs=2, default=(64, 32))
    args = ap.parse_args(argv)
    out = {}
    native = GlobalBatchNorm._grouped
    for name, impl in (("native", native), ("python", python_grouped)):
        GlobalBatchNorm._grouped = impl
        try:
            out[name] = time_step(args.arch, args.batch, args.group, tuple(args.hw))
        finally:
            GlobalBatchNorm._grouped = native
        print(f"{name} grouped BN: {1000 * out[name][0]:.1f} ms a step (spread {1000 * out[name][1]:.1f}), "
              f"{out[name][2]} leaf aten ops a step "
              f"({args.arch}, {args.batch} images in groups of {args.group}, {args.hw[0]}x{args.hw[1]}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    return out


if __name__ == "__main__":
    main()
