"""GlobalBatchNorm on two gloo processes equals BatchNorm on the whole batch in one; with
`samples_per_bn`, every group of consecutive images is normalised on its own, on 1 or 4 processes."""

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


def _grouped_reference(x, w, c, n):
    """Per-group BatchNorm by hand: each run of n images with its own biased statistics."""
    xr = x.clone().requires_grad_(True)
    groups = xr.view(len(x) // n, n, *x.shape[1:])
    mean = groups.mean((1, 3, 4), keepdim=True)
    var = groups.var((1, 3, 4), unbiased=False, keepdim=True)
    y = ((groups - mean) / torch.sqrt(var + 1e-5)).view_as(x) * w.view(1, -1, 1, 1)
    (y * c).sum().backward()
    m = n * x.shape[2] * x.shape[3]
    running_mean = 0.1 * mean.detach().flatten(1).mean(0)
    running_var = 0.9 + 0.1 * (var.detach().flatten(1) * m / (m - 1)).mean(0)
    return y.detach(), xr.grad, running_mean, running_var


@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_in_one_process(channels_last):
    """Groups inside one rank go through one native batch_norm call (groups moved beside the channels); a
    channels_last input stays channels_last."""
    torch.manual_seed(1)
    x, w, c = torch.randn(8, 3, 4, 2), torch.rand(3) + 0.5, torch.randn(8, 3, 4, 2)
    bn = convert_sync_bn(nn.BatchNorm2d(3), torch.device("cpu"), samples_per_bn=2)
    bn.weight.data.copy_(w)
    xr = (x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()).requires_grad_(True)
    y = bn(xr)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    (y * c).sum().backward()
    ref = _grouped_reference(x, w, c, 2)
    torch.testing.assert_close(y.detach(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xr.grad, ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, ref[3], atol=1e-5, rtol=1e-5)


def test_groups_cumulative_momentum_and_frozen_bias():
    """momentum=None (a cumulative mean) over two steps, and BNNeck's frozen bias: each group as a plain
    BatchNorm1d of its own, the running statistics the mean of the groups'."""
    torch.manual_seed(3)
    bn = convert_sync_bn(nn.BatchNorm1d(5, momentum=None), torch.device("cpu"), samples_per_bn=3)
    bn.bias.requires_grad_(False)
    refs = [nn.BatchNorm1d(5, momentum=None) for _ in range(4)]
    for step in range(2):
        x = torch.randn(12, 5) * 2 + 1
        y = bn(x)
        for g, ref in enumerate(refs):
            torch.testing.assert_close(y[3 * g:3 * g + 3], ref(x[3 * g:3 * g + 3]), atol=1e-5, rtol=1e-5)
        y.sum().backward()
        assert bn.bias.grad is None and bn.weight.grad is not None
        torch.testing.assert_close(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
        assert int(bn.num_batches_tracked) == step + 1


def test_partial_last_batch_is_its_own_group():
    bn = convert_sync_bn(nn.BatchNorm1d(4), torch.device("cpu"), samples_per_bn=4)
    x = torch.randn(10, 4)
    y = bn(x)  # groups of 4, 4, then the 2 left over
    torch.testing.assert_close(y[8:], nn.functional.batch_norm(x[8:], None, None, bn.weight, bn.bias, True))
    torch.testing.assert_close(y[:4], nn.functional.batch_norm(x[:4], None, None, bn.weight, bn.bias, True))
    assert torch.isfinite(bn(torch.randn(9, 4))).all()  # a single image left over: the running statistics


def _group_worker(rank, world, port, x, w, c, n, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_sync_bn(nn.BatchNorm2d(3), torch.device("cpu"), samples_per_bn=n)
    bn.weight.data.copy_(w)
    xs = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(xs)
    (y * c.chunk(world)[rank]).sum().backward()
    out[rank] = (y.detach(), xs.grad, bn.running_mean.clone())
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 4])  # each rank holds 2 images: 2, a group per rank; 4, a group over 2 ranks
def test_groups_over_four_ranks_match_one_process(n):
    torch.manual_seed(2)
    x, w, c = torch.randn(8, 3, 2, 2), torch.rand(3) + 0.5, torch.randn(8, 3, 2, 2)
    ref = _grouped_reference(x, w, c, n)
    out = mp.Manager().dict()
    mp.spawn(_group_worker, args=(4, 29521 + n, x, w, c, n, out), nprocs=4, join=True)
    torch.testing.assert_close(torch.cat([out[r][0] for r in range(4)]), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[r][1] for r in range(4)]), ref[1], atol=1e-4, rtol=1e-4)
    if n == 4:  # one rank's running statistics are its own group's (shared with its neighbour)
        torch.testing.assert_close(out[0][2], out[1][2])
        assert not torch.allclose(out[0][2], out[2][2])


def test_samples_per_bn_checked_before_ray():
    from reid_ray import ReidRayError
    from reid_ray.config import resolve_config
    from reid_ray.models.sync_bn import check_samples_per_bn

    check_samples_per_bn(16, 64, 1)
    check_samples_per_bn(16, 64, 4)
    check_samples_per_bn(32, 64, 4)   # two ranks per group
    for n, workers in ((24, 2), (12, 4), (-1, 1), (48, 4)):
        with pytest.raises(ReidRayError, match="samples_per_bn"):
            check_samples_per_bn(n, 64, workers)
    assert resolve_config("mmt", sets=["model.samples_per_bn=16"]).model.samples_per_bn == 16
    with pytest.raises(ReidRayError, match="samples_per_bn=24"):
        resolve_config("mmt", sets=["model.samples_per_bn=24"])


if __name__ == "__main__":
    pytest.main([__file__])


def _gather_worker(rank, world, port, x, c, out):
    from reid_ray.methods.base import gather_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xs = x.chunk(world)[rank].clone().requires_grad_(True)
    feats, labels = gather_batch(xs, torch.arange(len(xs)) + 10 * rank)
    (feats * c).sum().backward()  # the same global loss on every rank
    out[rank] = (feats.detach(), labels, xs.grad)
    dist.destroy_process_group()


def test_gather_batch_is_the_global_batch_with_gradients_summed_to_the_owner():
    x, c = torch.randn(6, 3), torch.randn(6, 3)
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, 29531, x, c, out), nprocs=2, join=True)
    torch.testing.assert_close(out[0][0], x)
    assert out[1][1].tolist() == [0, 1, 2, 10, 11, 12]
    # each rank's copy of the loss sends its gradient to the owner: 2 × the one-process gradient, which
    # DDP's averaging turns back into it
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), 2 * c)


def test_grouped_bn_bench_runs_and_the_native_path_has_fewer_ops():
    from bench import grouped_bn

    out = grouped_bn.main(["--batch", "8", "--group", "4", "--hw", "32", "16"])
    assert out["native"][0] > 0 and out["python"][0] > 0
    assert out["native"][2] < out["python"][2]
