"""ResNet backbones with last stride 1 (BoT), and a small ResNet for CPU-sized demos.

`pretrained` is "none", a local path to a torchvision state dict, or "imagenet"
(torchvision's weights API, which downloads; offline, it fails with a message
pointing at the local-path option).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock

from reid_ray import ReidRayError

TORCHVISION = {"resnet18": (resnet.resnet18, resnet.ResNet18_Weights),
               "resnet34": (resnet.resnet34, resnet.ResNet34_Weights),
               "resnet50": (resnet.resnet50, resnet.ResNet50_Weights)}
ARCHS = (*TORCHVISION, "small")


class SmallResNet(nn.Module):
    """4 stages of one BasicBlock each with 32/64/128/256 channels (1.2 M parameters): ~2x the
    throughput of ResNet-18 at 64x32 on CPU."""

    def __init__(self, widths=(32, 64, 128, 256), last_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else (last_stride if i == len(widths) - 1 else 2)
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]

    def forward(self, x):
        return self.layers(self.stem(x))


class TorchvisionTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier."""

    def __init__(self, net: resnet.ResNet):
        super().__init__()
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)
        self.out_channels = net.fc.in_features

    def forward(self, x):
        return self.body(x)


def _load_pretrained(net: nn.Module, arch: str, pretrained: str) -> None:
    if pretrained == "imagenet":
        weights = TORCHVISION[arch][1].DEFAULT
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as e:  # offline: URLError, socket errors, ...
            raise ReidRayError(f"could not download ImageNet weights for {arch} ({type(e).__name__}); download "
                               f"{weights.url} elsewhere and pass its local path as pretrained") from None
    else:
        if not os.path.isfile(pretrained):
            raise ReidRayError(f"pretrained weights {pretrained!r} not found; pass 'none', 'imagenet' or the path "
                               f"of a torchvision state dict (.pth)")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")]:
        raise ReidRayError(f"{pretrained} does not hold {arch} weights (missing e.g. {missing[0]})")


def build_backbone(arch: str = "resnet50", pretrained: str = "none", last_stride: int = 1) -> nn.Module:
    """A feature trunk with `.out_channels`; last stride 1 keeps 2x the final resolution."""
    if arch == "small":
        if pretrained != "none":
            raise ReidRayError("the 'small' backbone has no pretrained weights; use pretrained=none")
        return SmallResNet(last_stride=last_stride)
    if arch not in TORCHVISION:
        raise ReidRayError(f"unknown backbone {arch!r}; valid: {', '.join(ARCHS)}")
    net = TORCHVISION[arch][0](weights=None)
    if pretrained != "none":
        _load_pretrained(net, arch, pretrained)
    if last_stride == 1:
        block = net.layer4[0]
        block.conv2.stride = (1, 1) if arch == "resnet50" else block.conv2.stride
        block.conv1.stride = (1, 1) if arch != "resnet50" else block.conv1.stride
        block.downsample[0].stride = (1, 1)
    return TorchvisionTrunk(net)
