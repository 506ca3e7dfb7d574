"""AdaBN: running statistics become the target data's, weights stay."""

import copy

import torch
from torch import nn

from reid_ray.models.adabn import adapt_bn


def test_running_stats_become_the_data_mean_and_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=0.1))
    weight = net[0].weight.clone()
    images = [torch.randn(8, 3, 2, 2) * 3 + 5 for _ in range(3)]
    loader = [{"img": x} for x in images]
    assert adapt_bn(net, loader) == 3
    feats = torch.cat([net[0](x) for x in images]).detach()  # (24, 4, 2, 2)
    per_batch = [net[0](x).detach() for x in images]
    mean = torch.stack([f.mean((0, 2, 3)) for f in per_batch]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in per_batch]).mean(0)
    bn = net[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-4)
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)  # equal batches: the data mean
    assert bn.momentum == 0.1 and torch.equal(net[0].weight, weight) and net.training


def test_two_networks_adapted_in_one_pass_equal_two_passes():
    """MMT's two mean nets share one pass of the target (each batch loaded once): the statistics of two
    separate passes, exactly."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
            for _ in range(2)]
    alone = [copy.deepcopy(n) for n in nets]
    loaded = []

    class Loader(list):
        def __iter__(self):
            loaded.append(1)
            return super().__iter__()

    loader = Loader({"img": torch.randn(6, 3, 2, 2) * 2 + 1} for _ in range(4))
    assert adapt_bn(nets, loader) == 4 and len(loaded) == 1
    for net in alone:
        adapt_bn(net, loader)
    for a, b in zip(nets, alone):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), k
