"""GlobalBatchNorm on two gloo processes equals BatchNorm on the whole batch in one."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reid_ray.models.sync_bn import GlobalBatchNorm, convert_sync_bn


def _worker(rank, world, port, x, w, c, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_sync_bn(nn.BatchNorm2d(3), torch.device("cpu"))
    bn.weight.data.copy_(w)
    xs = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(xs)
    (y * c.chunk(world)[rank]).sum().backward()  # this rank's terms of the one-process loss
    out[rank] = (y.detach(), xs.grad, bn.weight.grad / 1.0, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_two_ranks_match_one_process():
    torch.manual_seed(0)
    x, w, c = torch.randn(8, 3, 4, 2), torch.rand(3) + 0.5, torch.randn(8, 3, 4, 2)
    ref_bn = nn.BatchNorm2d(3)
    ref_bn.weight.data.copy_(w)
    xr = x.clone().requires_grad_(True)
    y = ref_bn(xr)
    (y * c).sum().backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, 29511, x, w, c, out), nprocs=2, join=True)
    y2 = torch.cat([out[0][0], out[1][0]])
    g2 = torch.cat([out[0][1], out[1][1]])
    torch.testing.assert_close(y2, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, xr.grad, atol=1e-5, rtol=1e-5)  # gradients flow through the global stats
    torch.testing.assert_close(out[0][2] + out[1][2], ref_bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0][3], ref_bn.running_mean)
    torch.testing.assert_close(out[0][4], ref_bn.running_var, atol=1e-5, rtol=1e-5)


def test_conversion_keeps_parameters_and_frozen_bias():
    bn = nn.BatchNorm1d(4)
    bn.bias.requires_grad_(False)
    conv = convert_sync_bn(nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(conv, GlobalBatchNorm) and not conv.bias.requires_grad and conv.weight is bn.weight
    x = torch.randn(6, 4)
    conv.train()
    torch.testing.assert_close(conv(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))


if __name__ == "__main__":
    pytest.main([__file__])
