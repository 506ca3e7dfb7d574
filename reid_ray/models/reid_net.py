"""The BoT re-ID network: backbone -> global pooling -> BNNeck -> classifier.

Luo et al., CVPRW 2019, Fig. 3: the triplet loss sees the pooled feature f_t,
the ID loss sees the classifier applied to f_i = BN(f_t) (a BatchNorm1d whose
bias is frozen at 0), and retrieval uses f_i.

The pooling (`model.pooling`): global average pooling (BoT's), or generalized-mean pooling (GeM, Radenović et
al., TPAMI 2019), f_c = (mean over the map of x_c^p)^(1/p) with one learnable p, initialised at 3, over the
activations clamped at 1e-6: Cluster Contrast's pooling (Dai et al., ACCV 2022; the authors' `--pooling-type
gem`). p = 1 is average pooling; p → ∞ max pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reid_ray.models.backbone import build_backbone
from reid_ray.models.sync_bn import convert_sync_bn


@dataclass
class ModelConfig:
    arch: str = "resnet50"         # resnet18 | resnet34 | resnet50 | small
    pretrained: str = "none"       # none | imagenet | /path/to/torchvision_state_dict.pth
    last_stride: int = 1
    sync_bn: bool = True           # BN over the global batch of all workers (SyncBatchNorm on GPU,
                                   # GlobalBatchNorm on CPU): results do not depend on the worker count
    compile: bool = False          # torch.compile the trained networks (GPU; the first steps pay for compiling)
    cuda_graph: bool = False       # the whole training step (forward, backward, fused optimiser, mean nets) captured
                                   # in one CUDA graph and replayed per batch (training/graphs.py): baseline and MMT,
                                   # one worker on a GPU; an error elsewhere
    samples_per_bn: int = 0        # > 0: BN statistics over each run of this many consecutive images of the
                                   # global batch (the authors' 16 per GPU); 0: over the whole global batch
    pooling: str = "avg"           # avg (BoT's global average pooling) | gem (generalized mean, learnable p)


class GeM(nn.Module):
    """Generalized-mean pooling over H×W with one learnable exponent p (the form fast-reid and Cluster Contrast
    train): (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


class ReIDNet(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(cfg.arch, cfg.pretrained, cfg.last_stride)
        self.pool = GeM() if cfg.pooling == "gem" else None  # avg: no module, so older checkpoints load as they are
        dim = self.backbone.out_channels
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)  # BNNeck: no shift, so f_i stays centred for cosine retrieval
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.feat_dim = dim

    def forward(self, x: torch.Tensor):
        """Training: dict(feat=f_t (B, D), bn_feat=f_i (B, D), logits (B, C)). Eval: f_i (B, D)."""
        fmap = self.backbone(x)
        feat = fmap.mean((2, 3)) if self.pool is None else self.pool(fmap)
        bn_feat = self.bnneck(feat)
        if not self.training:
            return bn_feat
        return {"feat": feat, "bn_feat": bn_feat, "logits": self.classifier(bn_feat)}


def build_reid_net(cfg: ModelConfig, num_classes: int, device: torch.device | str = "cpu") -> ReIDNet:
    device = torch.device(device)
    net = ReIDNet(cfg, num_classes)
    if cfg.sync_bn or cfg.samples_per_bn:
        net = convert_sync_bn(net, device, cfg.samples_per_bn)
    return net.to(device)
