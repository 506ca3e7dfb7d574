"""SAN's texture decoder (SA-Dec) and the encoder + decoder pair (Jin et al., "Semantics-Aligned
Representation Learning for Person Re-identification", AAAI 2020, Fig. 2).

The encoder (SA-Enc) is the BoT `ReIDNet` unchanged. The decoder regenerates the person's
densely semantically aligned full texture image from the encoder's last feature map:

    x = ReLU(BN(conv1x1(layer4)))                                   (B, w0, h4, w4)
    block i = 1..4:  x = UpBlock_i(x, size_i) [+ emb_i(layer_{4-i})]  size_i = out_size / 2^(4-i)
    texture = normalise(sigmoid(conv3x3(x)))                        (B, 3, H_t, W_t)

Each UpBlock is a residual block after a bilinear up-sampling; the U-Net skips add 1×1 embeddings
of layer3, layer2, layer1 (resized) to the outputs of blocks 1-3. Its output lies in the range of
normalised images (ImageNet mean/std), the range of the target textures. The decoder is dropped
at inference; it has about a third of the encoder's parameters (the paper's ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_ray.models.backbone import SmallResNet
from reid_ray.models.reid_net import ReIDNet


def backbone_stages(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of layer1..layer4 of a `build_backbone` trunk (the last one is its usual output)."""
    if isinstance(backbone, SmallResNet):
        x, layers = backbone.stem(x), list(backbone.layers)
    else:  # TorchvisionTrunk: conv1, bn1, relu, maxpool, layer1..layer4
        x, layers = backbone.body[:4](x), list(backbone.body[4:])
    out = []
    for layer in layers:
        x = layer(x)
        out.append(x)
    return out


@torch.no_grad()
def stage_channels(backbone: nn.Module) -> list[int]:
    was = backbone.training
    backbone.eval()
    dev = next(backbone.parameters()).device
    chans = [f.shape[1] for f in backbone_stages(backbone, torch.zeros(1, 3, 64, 32, device=dev))]
    backbone.train(was)
    return chans


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class UpBlock(nn.Module):
    """Bilinear up-sampling to `size`, then a residual block (two 3×3 convs, 1×1 shortcut)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3), nn.ReLU(inplace=True), _conv_bn(cout, cout, 3))
        self.shortcut = _conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.relu(self.body(x) + self.shortcut(x))


class SADecoder(nn.Module):
    def __init__(self, enc_channels: list[int], out_size: tuple[int, int] = (256, 256),
                 widths: tuple[int, ...] | None = None):
        super().__init__()
        c1, c2, c3, c4 = enc_channels
        w = widths or (c4 // 4, c4 // 8, c4 // 16, c4 // 32)
        self.out_size = tuple(out_size)
        self.reduce = nn.Sequential(_conv_bn(c4, w[0], 1), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([UpBlock(w[0], w[0]), UpBlock(w[0], w[1]), UpBlock(w[1], w[2]),
                                     UpBlock(w[2], w[3])])
        self.skips = nn.ModuleList([nn.Conv2d(c, wi, 1) for c, wi in ((c3, w[0]), (c2, w[1]), (c1, w[2]))])
        self.head = nn.Conv2d(w[3], 3, 3, padding=1)
        self.block_dims = [w[0], w[1], w[2], w[3]]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """stages: layer1..layer4 maps -> (texture (B, 3, H_t, W_t) normalised, block outputs [(B, w_i, h_i, w_i)])."""
        x = self.reduce(stages[-1])
        h, w = self.out_size
        blocks = []
        for i, block in enumerate(self.blocks):
            size = (max(1, h >> (3 - i)), max(1, w >> (3 - i)))
            x = block(x, size)
            if i < 3:  # U-Net skip from layer3, layer2, layer1
                x = x + F.interpolate(self.skips[i](stages[2 - i]), size=size, mode="bilinear", align_corners=False)
            blocks.append(x)
        # bounded to [0, 1] in pixel space, then normalised like the images: the target's range
        texture = (torch.sigmoid(self.head(x)) - self.mean) / self.std
        return texture, blocks


class SANModel(nn.Module):
    """SA-Enc (the BoT ReIDNet, `net`) + SA-Dec (`decoder`); one module, so DDP wraps both at once."""

    def __init__(self, net: ReIDNet, decoder: SADecoder):
        super().__init__()
        self.net, self.decoder = net, decoder

    def forward(self, x: torch.Tensor) -> dict:
        """ReIDNet's training dict + `texture` and `dec_feats` (the globally pooled block outputs)."""
        stages = backbone_stages(self.net.backbone, x)
        feat = stages[-1].mean((2, 3))
        bn_feat = self.net.bnneck(feat)
        texture, blocks = self.decoder(stages)
        return {"feat": feat, "bn_feat": bn_feat, "logits": self.net.classifier(bn_feat), "texture": texture,
                "dec_feats": [b.mean((2, 3)) for b in blocks]}


def decoder_params(enc_channels: list[int], w: tuple[int, ...]) -> int:
    """SADecoder's parameter count for block widths `w` (without building it)."""
    c1, c2, c3, c4 = enc_channels

    def up(a, b):  # two 3×3 conv+BN, 1×1 shortcut conv+BN
        return 10 * a * b + 9 * b * b + 6 * b
    return (c4 * w[0] + 2 * w[0] + up(w[0], w[0]) + up(w[0], w[1]) + up(w[1], w[2]) + up(w[2], w[3])
            + (c3 + 1) * w[0] + (c2 + 1) * w[1] + (c1 + 1) * w[2] + 27 * w[3] + 3)


def decoder_widths(enc_channels: list[int], enc_params: int, ratio: float = 1 / 3) -> tuple[int, ...]:
    """Block widths (w0, w0/2, w0/4, w0/8), w0 a multiple of 8, whose decoder has ≈ ratio × enc_params."""
    cands = [(w0, w0 // 2, w0 // 4, w0 // 8) for w0 in range(64, 4097, 8)]
    return min(cands, key=lambda w: abs(decoder_params(enc_channels, w) - ratio * enc_params))


def build_san_model(net: ReIDNet, out_size: tuple[int, int], ratio: float = 1 / 3) -> SANModel:
    """SA-Dec sized to `ratio` of the backbone's parameters (the paper: about a third)."""
    chans = stage_channels(net.backbone)
    decoder = SADecoder(chans, out_size, decoder_widths(chans, num_params(net.backbone), ratio))
    return SANModel(net, decoder.to(next(net.parameters()).device))


def num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
