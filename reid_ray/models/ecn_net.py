"""ECN's network: the BoT ReIDNet plus the target embedding that its exemplar memory holds (methods/ecn.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_ray.models.adabn import frozen_bn_stats
from reid_ray.models.reid_net import ReIDNet
from reid_ray.models.sync_bn import convert_sync_bn


class ECNNet(nn.Module):
    """ReIDNet + ECN's target embedding. Training: (source outputs, target embeddings); eval: f_i."""

    def __init__(self, net: ReIDNet, features: int, dropout: float, sync_bn: bool, device: torch.device,
                 target_bn: bool = True):
        super().__init__()
        self.net, self.target_bn = net, target_bn
        self.embed = nn.Linear(net.feat_dim, features)
        nn.init.kaiming_normal_(self.embed.weight, mode="fan_out")
        nn.init.zeros_(self.embed.bias)
        self.embed_bn = nn.BatchNorm1d(features)
        self.drop = nn.Dropout(dropout)
        if sync_bn:
            self.embed_bn = convert_sync_bn(self.embed_bn, device)
        self.to(device)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        if not self.training:
            return self.net(x)
        # source and target pass separately through BN, as the authors' two calls; with target_bn the
        # running statistics follow the target only
        with frozen_bn_stats(self.net, self.target_bn):
            src = self.net(x)
        return src, self.drop(self.embedding(self.net(target)["feat"]))

    def embedding(self, feat: torch.Tensor) -> torch.Tensor:
        """The authors' `tgt_feat` before dropout: L2-normalised BN(FC(pooled feature))."""
        return F.normalize(self.embed_bn(self.embed(feat)), dim=1)


class TargetEmbedding(nn.Module):
    """Eval-mode view of an ECNNet that returns the target embedding (what the memory holds)."""

    def __init__(self, model: ECNNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(self.model.net.backbone(x).mean((2, 3)))
